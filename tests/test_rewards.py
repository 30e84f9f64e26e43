"""Reward functions: number extraction, the built-in math rewards, the registry, compute_rewards."""

import functools
import textwrap

import numpy as np
import pytest

from grpo_jax.data.demo import all_prompts, evaluate, reasoning_completion
from grpo_jax.errors import UserError
from grpo_jax.rewards import (BUILTIN_REWARDS, completion_text, compute_rewards,
                              correctness_reward, extract_final_number, format_reward,
                              resolve_reward_funcs)


def assistant(text):
  return [{"role": "assistant", "content": text}]


# --- extraction --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("3+4=7 7-2=5 #### 5", "5"),
    ("#### -2", "-2"),
    ("1-5=-4 -4+2=-2 #### -2", "-2"),
    ("The total is 1,234 dollars.", "1234"),
    ("#### 1,234,567", "1234567"),
    ("so x = -3.50", "-3.5"),
    ("answer: 7.0", "7"),
    ("0.10", "0.1"),
    ("it costs $.5", "0.5"),
    ("I think \\boxed{42} but then 17", "42"),
    ("\\boxed{-8}", "-8"),
    ("#### 9 even though \\boxed{3}", "9"),
    ("first 3, then 4, finally 12.", "12"),
    ("10-3", "3"),  # a subtraction, not the number -3
    ("no numbers here", None),
    ("", None),
    ("#### -0", "0"),
])
def test_extract_final_number(text, expected):
  assert extract_final_number(text) == expected


def test_completion_text_forms():
  assert completion_text("plain") == "plain"
  assert completion_text(assistant("hi #### 3")) == "hi #### 3"
  parts = [{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}]
  assert completion_text(parts) == "ab"
  with pytest.raises(UserError, match="completion of type int"):
    completion_text(3)


# --- built-in rewards --------------------------------------------------------------------

@pytest.mark.parametrize("completion, answer, expected", [
    ("3+4=7 7-2=5 #### 5", "5", 1.0),  # right
    ("3+4=7 7-2=6 #### 6", "5", 0.0),  # wrong
    ("the answer is 5", "5", 1.0),  # unformatted: the last number counts
    ("5 apples and 3 pears make 8", "8", 1.0),  # several numbers: the last
    ("5 apples and 3 pears make 8", "5", 0.0),
    ("#### 1,234", "1234", 1.0),  # commas
    ("#### 1234", "He paid 1,000 + 234 = 1,234.\n#### 1,234", 1.0),  # GSM8K answer column
    ("1-5=-4 -4+2=-2 #### -2", "-2", 1.0),  # negatives
    ("#### 2", "-2", 0.0),
    ("so \\boxed{12}", "12", 1.0),
    ("#### 7.0", "7", 1.0),
    ("#### 3.5", 3.5, 1.0),  # a numeric answer column
    (assistant("3+4=7 #### 7"), "7", 1.0),  # conversational
    (assistant("#### 8"), "7", 0.0),
    ("no number", "7", 0.0),
    ("#### 7", None, None),  # no answer: not applicable
    ("#### 7", "seven", None),
])
def test_correctness_reward(completion, answer, expected):
  assert correctness_reward(["q"], [completion], answer=[answer], other_column=["x"]) == [expected]


def test_correctness_reward_needs_the_answer_column():
  with pytest.raises(UserError, match="'answer' column"):
    correctness_reward(["q"], ["#### 1"], solution=["1"])


@pytest.mark.parametrize("completion, expected", [
    ("3+4=7 7-2=5 #### 5", 1.0),
    ("Let me think.\nIt is 12.\n#### 12\n", 1.0),
    ("reasoning #### -3.5", 1.0),
    ("#### 5", 0.0),  # a bare guess, no reasoning
    ("   #### 5", 0.0),
    ("##### 5", 0.0),
    ("3+4=7 the answer is 7", 0.0),  # no final "#### N"
    ("3+4=7 #### 7 because", 0.0),  # text after the answer
    ("3+4=7 #### seven", 0.0),
    ("3+4=7 #### 7 #### 8", 1.0),  # the final one counts
    (assistant("3+4=7 #### 7"), 1.0),
    (assistant("#### 7"), 0.0),
])
def test_format_reward(completion, expected):
  assert format_reward(["q"], [completion], answer=["7"]) == [expected]


def test_demo_reasoning_earns_both_rewards_and_a_guess_only_correctness():
  prompts = all_prompts()
  answers = [str(evaluate(p)) for p in prompts]
  reasoned = [reasoning_completion(p) for p in prompts]
  assert correctness_reward(prompts, reasoned, answer=answers) == [1.0] * len(prompts)
  assert format_reward(prompts, reasoned) == [1.0] * len(prompts)
  guesses = [f"#### {a}" for a in answers]
  assert correctness_reward(prompts, guesses, answer=answers) == [1.0] * len(prompts)
  assert format_reward(prompts, guesses) == [0.0] * len(prompts)


# --- registry ----------------------------------------------------------------------------

def _write_module(tmp_path, name, body):
  path = tmp_path / f"{name}.py"
  path.write_text(textwrap.dedent(body))
  return path


LENGTH_REWARD = """
    def length_reward(prompts, completions, **kwargs):
      return [float(len(c)) for c in completions]

    not_a_function = 3
"""


def test_resolve_builtins_from_a_comma_separated_string():
  resolved = resolve_reward_funcs(" correctness_reward, format_reward ")
  assert resolved == [("correctness_reward", correctness_reward), ("format_reward", format_reward)]


def test_resolve_module_import_path(tmp_path, monkeypatch):
  _write_module(tmp_path, "rewards_mod_a", LENGTH_REWARD)
  monkeypatch.syspath_prepend(str(tmp_path))
  for spec in ("rewards_mod_a:length_reward", "rewards_mod_a.length_reward"):
    [(name, fn)] = resolve_reward_funcs([spec])
    assert name == "length_reward" and fn(["p"], ["abc"]) == [3.0]


def test_resolve_file_path(tmp_path):
  path = _write_module(tmp_path, "my_file_rewards", LENGTH_REWARD)
  resolved = resolve_reward_funcs([f"{path}:length_reward", "format_reward"])
  assert [name for name, _ in resolved] == ["length_reward", "format_reward"]
  assert resolved[0][1](["p"], ["ab"]) == [2.0]


def test_resolve_callables_use_their_names():
  def custom(prompts, completions, **kwargs):
    return [0.0] * len(completions)

  partial = functools.partial(custom)
  assert resolve_reward_funcs([custom])[0][0] == "custom"
  assert resolve_reward_funcs([partial])[0][0] == "custom"


def test_resolve_errors(tmp_path, monkeypatch):
  _write_module(tmp_path, "rewards_mod_b", LENGTH_REWARD)
  _write_module(tmp_path, "rewards_mod_broken", "import no_such_package_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cases = {
      "no_such_module_xyz:f": "'no_such_module_xyz' does not import: ModuleNotFoundError",
      "rewards_mod_broken:f": "No module named 'no_such_package_xyz'",
      "rewards_mod_b:missing": "has no attribute 'missing'",
      "rewards_mod_b:not_a_function": "is a int, not callable",
      "correctness": "not a built-in \\(correctness_reward, format_reward\\)",
      f"{tmp_path}/absent.py:f": "file not found: .*absent.py",
      "": "reward_funcs is empty",
  }
  for spec, message in cases.items():
    with pytest.raises(UserError, match=message):
      resolve_reward_funcs(spec)
  with pytest.raises(UserError, match="several functions named format_reward"):
    resolve_reward_funcs(["format_reward", "format_reward"])


def test_resolve_file_that_fails_to_import(tmp_path):
  path = _write_module(tmp_path, "bad_file_rewards", "raise RuntimeError('boom')\n")
  with pytest.raises(UserError, match="bad_file_rewards.py does not import: RuntimeError: boom"):
    resolve_reward_funcs(f"{path}:f")


def test_builtins_registry_lists_both():
  assert set(BUILTIN_REWARDS) == {"correctness_reward", "format_reward"}


# --- compute_rewards ---------------------------------------------------------------------

def test_compute_rewards_passes_columns_and_maps_none_to_nan():
  seen = {}

  def uses_columns(prompts, completions, answer, level, **kwargs):
    seen.update(kwargs, prompts=prompts)
    return [None if lv == "skip" else float(a) for a, lv in zip(answer, level)]

  funcs = resolve_reward_funcs([uses_columns, "correctness_reward"])
  rewards = compute_rewards(funcs, ["q1", "q2", "q3"], ["#### 1", "#### 5", "#### 3"],
                            {"prompt": ["q1", "q2", "q3"], "answer": ["1", "2", "3"],
                             "level": ["a", "skip", "b"]})
  assert rewards.dtype == np.float32 and rewards.shape == (3, 2)
  np.testing.assert_array_equal(rewards, [[1.0, 1.0], [np.nan, 0.0], [3.0, 1.0]])
  assert seen == {"prompts": ["q1", "q2", "q3"]}  # the prompt column is not passed twice


def test_compute_rewards_wraps_errors():
  def broken(prompts, completions, **kwargs):
    raise ValueError("bad completion")

  with pytest.raises(UserError, match="reward function 'broken' raised ValueError: bad completion"
                     ) as info:
    compute_rewards([("broken", broken)], ["q"], ["c"], {})
  assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("returned, message", [
    ([1.0], "returned 1 values for 2 completions"),
    (1.0, "returned a float; expected a list of 2 numbers"),
    (["a", "b"], "returned a non-number"),
])
def test_compute_rewards_checks_what_functions_return(returned, message):
  def odd(prompts, completions, **kwargs):
    return returned

  with pytest.raises(UserError, match=f"reward function 'odd' {message}"):
    compute_rewards([("odd", odd)], ["q", "q"], ["c", "d"], {})
