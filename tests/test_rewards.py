"""Reward functions: number extraction, the built-in rewards (math, DAPO's soft overlong
punishment), the registry, compute_rewards and the completion_ids reward functions get."""

import functools
import textwrap
import types

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import rollouts, sampling
from grpo_jax.data.demo import all_prompts, evaluate, reasoning_completion
from grpo_jax.errors import UserError
from grpo_jax.rewards import (BUILTIN_REWARDS, CONFIGURED_REWARDS, SoftOverlongPunishment,
                              completion_text, compute_rewards, correctness_reward,
                              extract_final_number, format_reward, resolve_reward_funcs,
                              soft_overlong_punishment)


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
      "correctness": ("not a built-in \\(correctness_reward, format_reward, "
                      "code_execution_reward, soft_overlong_punishment\\)"),
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


def test_builtins_registry_lists_them_all():
  assert set(BUILTIN_REWARDS) == {"correctness_reward", "format_reward", "code_execution_reward"}
  assert set(CONFIGURED_REWARDS) == {"soft_overlong_punishment"}


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
    (1.0, r"returned a float \(1.0\); expected a list of 2 numbers"),
    (["a", "b"], "returned a non-number"),
])
def test_compute_rewards_checks_what_functions_return(returned, message):
  def odd(prompts, completions, **kwargs):
    return returned

  with pytest.raises(UserError, match=f"reward function 'odd' {message}"):
    compute_rewards([("odd", odd)], ["q", "q"], ["c", "d"], {})


# --- completion_ids ----------------------------------------------------------------------

def test_completion_ids_reach_functions_that_accept_them_only():
  seen = {}

  def by_parameter(prompts, completions, completion_ids):
    seen["parameter"] = completion_ids
    return [float(len(ids)) for ids in completion_ids]

  def by_kwargs(prompts, completions, **kwargs):
    seen["kwargs"] = sorted(kwargs)
    return [0.0] * len(completions)

  def without(prompts, completions):  # no **kwargs: still called, without the ids
    return [1.0] * len(completions)

  ids = [[4, 5, 1], [6]]
  rewards = compute_rewards([("p", by_parameter), ("k", by_kwargs), ("w", without)],
                            ["q", "q"], ["ab", "c"], {"prompt": ["q", "q"]},
                            completion_ids=ids)
  np.testing.assert_array_equal(rewards, [[3.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
  assert seen == {"parameter": ids, "kwargs": ["completion_ids"]}
  # A dataset column of that name is not passed in their place.
  compute_rewards([("k", by_kwargs)], ["q"], ["c"], {"completion_ids": ["x"]})
  assert seen["kwargs"] == []


# --- soft_overlong_punishment ------------------------------------------------------------

def trl_soft_overlong(max_completion_len, soft_punish_cache, completion_ids):
  """TRL 1.16's _SoftOverlongPunishment.__call__, transcribed."""
  rewards = []
  for ids in completion_ids:
    length = len(ids)
    if length <= max_completion_len - soft_punish_cache:
      rewards.append(0.0)
    elif max_completion_len - soft_punish_cache < length <= max_completion_len:
      rewards.append((max_completion_len - soft_punish_cache - length) / soft_punish_cache)
    else:
      rewards.append(-1.0)
  return rewards


@pytest.mark.parametrize("limit, cache", [(20, 5), (20, 20), (20, 1), (7, 0), (3, 0)])
def test_soft_overlong_punishment_is_trls_formula(limit, cache):
  # Below the window, its first and last tokens, inside it, at the limit, beyond it.
  lengths = sorted({0, 1, limit - cache - 1, limit - cache, limit - cache + 1, limit - 1,
                    limit, limit + 1, limit + 9} - {-1})
  ids = [[7] * n for n in lengths]
  fn = SoftOverlongPunishment(limit, cache)
  got = fn(["p"] * len(ids), ["text"] * len(ids), completion_ids=ids)
  assert got == pytest.approx(trl_soft_overlong(limit, cache, ids), abs=1e-12)
  if cache:
    assert fn.punishment(limit - cache) == 0.0 and fn.punishment(limit) == -1.0
    assert fn.punishment(limit - cache + 1) == pytest.approx(-1.0 / cache)
  assert fn.punishment(limit + 1) == -1.0


def test_soft_overlong_punishment_from_the_config_options():
  [(name, fn)] = resolve_reward_funcs("soft_overlong_punishment", builtin_options={
      "max_completion_length": 100, "soft_punish_cache": 0})
  assert name == "soft_overlong_punishment_reward"  # TRL's metric name
  assert (fn.max_completion_length, fn.soft_punish_cache) == (100, 20)  # 0: a fifth
  assert fn(["p"], ["x"], completion_ids=[[1] * 90]) == [-0.5]  # TRL's docstring example
  [(_, fn)] = resolve_reward_funcs(["soft_overlong_punishment"], builtin_options={
      "max_completion_length": 100, "soft_punish_cache": 40})
  assert fn.soft_punish_cache == 40 and soft_overlong_punishment(100).soft_punish_cache == 20
  with pytest.raises(UserError, match="'soft_overlong_punishment' needs max_completion_length"):
    resolve_reward_funcs("soft_overlong_punishment")
  with pytest.raises(UserError, match="needs completion_ids"):
    fn(["p"], ["x"])
  with pytest.raises(UserError, match="soft_punish_cache=120"):
    SoftOverlongPunishment(100, 120)


class WordTokenizer:
  """Token i decodes to the 3-character word "tNN", EOS to nothing: a completion's text is
  three times as long as its token count, so a character count would show."""

  def __init__(self, eos_ids):
    self.eos_ids = set(eos_ids)

  def batch_decode(self, rows, skip_special_tokens=True):
    return ["".join("" if skip_special_tokens and i in self.eos_ids else f"t{i:02d}"
                    for i in row) for row in rows]


def trl_completion_ids(padded: np.ndarray, eos_ids) -> list[list[int]]:
  """TRL's cut of generated ids (GRPOTrainer._generate_single_turn, transformers path):
  every token up to and including the first EOS; all of them without one."""
  is_eos = np.isin(padded, list(eos_ids))
  eos_idx = np.where(is_eos.any(1), is_eos.argmax(1), padded.shape[1])
  keep = np.arange(padded.shape[1])[None] <= eos_idx[:, None]
  return [row[m].tolist() for row, m in zip(padded, keep)]


def test_sampled_completions_are_punished_by_their_token_count_with_eos():
  """End to end from the sampler: the reward functions get TRL's completion_ids (EOS
  included, padding cut) and the punishment counts those tokens, not the text."""
  limit, cache, eos, prompts_n, g = 10, 4, (3, 9, 17), 8, 4
  graphdef, params = nnx.split(tiny_model(seed=2))
  cfg = sampling.SamplingConfig(max_completion_length=limit, eos_token_ids=eos,
                                pad_token_id=0, num_generations=g, temperature=1.5)
  prompt_ids = np.asarray(jax.random.randint(jax.random.key(0), (prompts_n, 5), 1, 32))
  rollout = jax.device_get(jax.jit(sampling.generate, static_argnums=(0, 5))(
      graphdef, params, prompt_ids, np.ones_like(prompt_ids), jax.random.key(1), cfg))
  padded = np.asarray(rollout.completion_ids)
  want_ids = trl_completion_ids(padded, eos)
  lengths = np.array([len(ids) for ids in want_ids])
  assert (lengths < limit).any() and (lengths == limit).any()  # stopped early, truncated
  assert (lengths > limit - cache).any() and (lengths <= limit - cache).any()

  seen = []

  def record(prompts, completions, completion_ids):
    seen.append(completion_ids)
    return [0.0] * len(completions)

  funcs = resolve_reward_funcs([record, "soft_overlong_punishment"], builtin_options={
      "max_completion_length": limit, "soft_punish_cache": cache})
  host = rollouts.HostRollouts(WordTokenizer(eos), funcs, types.SimpleNamespace(
      prompt_column="prompt", max_prompt_length=8, truncate_prompts=False, system_prompt=None,
      chat_template="auto", reward_weights=None), g)
  rewards, texts = host.score({"prompt": [f"q{i}" for i in range(prompts_n)]}, rollout)
  assert seen == [want_ids]
  np.testing.assert_allclose(rewards[:, 1], trl_soft_overlong(limit, cache, want_ids))
  # Counting characters instead (3 a token here, none for EOS: Tunix's way) punishes
  # other completions.
  by_chars = trl_soft_overlong(limit, cache, texts)
  assert not np.allclose(rewards[:, 1], by_chars)
