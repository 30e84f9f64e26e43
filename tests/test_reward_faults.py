"""Hostile reward functions on the host side: inf, float32 overflow, abstaining everywhere.

TRL's signature fn(prompts, completions, **columns) -> list[float | None]; None (or NaN)
means "not applicable". Whatever a function returns, the rewards that reach the train
step are finite or NaN, or the run stops with a one-line UserError naming the function
and the row.
"""

import logging
import types

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import evaluate, grpo, rollouts, sampling
from grpo_jax.errors import UserError
from grpo_jax.rewards import compute_rewards

FLOAT32_MAX = float(np.finfo(np.float32).max)
PROMPTS = ["1+1=", "1+2=", "2+1=", "2+2=", "3+3=", "4+4="]
COMPLETIONS = ["2", "3", "3", "4", "6", "8"]


def returning(name, values):
  """A reward function called `name` returning `values` (one per completion)."""
  def fn(prompts, completions, **columns):
    return list(values)
  fn.__name__ = name
  return fn


def score(*funcs, weights=None, prompts=PROMPTS):
  return compute_rewards([(f.__name__, f) for f in funcs], prompts, COMPLETIONS[:len(prompts)],
                         {}, weights)


def one_line_error(info) -> str:
  message = str(info.value)
  assert "\n" not in message and "\r" not in message, message
  return message


# --- inf and values beyond float32 -------------------------------------------------------

@pytest.mark.parametrize("bad, shown", [
    (float("inf"), "returned inf for completion 3"),
    (-float("inf"), "returned -inf for completion 3"),
    (np.float32("inf"), "returned inf for completion 3"),
    (np.float64("-inf"), "returned -inf for completion 3"),
    (1e39, "returned 1e+39, beyond float32's range"),  # finite in float64, inf in float32
    (-4e38, "returned -4e+38, beyond float32's range"),
    (10**400, "returned 1000000000"),  # float(10**400) itself raises OverflowError
])
def test_infinite_reward_is_a_one_line_user_error_naming_function_and_row(bad, shown):
  values = [1.0, 0.0, None, bad, 0.5, 1.0]
  with pytest.raises(UserError) as info:
    score(returning("my_fn", values))
  message = one_line_error(info)
  assert message.startswith("reward function 'my_fn' returned"), message
  assert shown in message and "completion 3 (prompt '2+2=')" in message, message
  assert "more completion" not in message  # only one row is bad


def test_infinite_reward_error_counts_the_other_bad_rows_and_names_the_right_function():
  good = returning("fine", [1.0] * 6)
  bad = returning("blows_up", [0.0, float("inf"), 1.0, -float("inf"), float("inf"), 2.0])
  with pytest.raises(UserError) as info:
    score(good, bad)
  message = one_line_error(info)
  assert message.startswith("reward function 'blows_up' returned inf for completion 1 "
                            "(prompt '1+2=')"), message
  assert "and for 2 more completion(s)" in message and "'fine'" not in message


def test_long_and_multiline_prompts_are_shown_short_on_one_line():
  prompts = ["line one\nline two " + "x" * 200] * 2
  conversational = [[{"role": "user", "content": "what is\n2+2?" * 30}]] * 2
  for batch in (prompts, conversational):
    with pytest.raises(UserError) as info:
      score(returning("f", [0.0, float("inf")]), prompts=batch)
    message = one_line_error(info)
    assert "completion 1 (prompt " in message and "...)" in message
    assert len(message) < 300, message


def test_largest_finite_float32_reward_is_accepted_exactly():
  rewards = score(returning("edge", [FLOAT32_MAX, -FLOAT32_MAX, 1e30, -1e-30, 0.0, 3e38]))
  assert rewards.dtype == np.float32
  np.testing.assert_array_equal(rewards[:, 0], np.float32(
      [FLOAT32_MAX, -FLOAT32_MAX, 1e30, -1e-30, 0.0, 3e38]))


def test_nan_and_none_still_abstain():
  rewards = score(returning("sometimes", [None, float("nan"), np.float32("nan"), 1.0, 0.0, 2.0]),
                  returning("always", [1.0] * 6))
  assert np.isnan(rewards[:3, 0]).all() and not np.isnan(rewards[3:, 0]).any()
  np.testing.assert_array_equal(rewards[:, 1], 1.0)
  assert not np.isinf(rewards).any()


# --- the weighted total --------------------------------------------------------------------

def _device_total(rewards, weights):
  return np.asarray(grpo.combine_rewards(jnp.asarray(rewards), weights))


def test_weighted_total_overflow_is_a_user_error_naming_the_functions():
  a = returning("big_a", [2e38, 1.0, 1.0, 1.0, 1.0, 2e38])
  b = returning("big_b", [2e38, 1.0, 1.0, None, 1.0, 2e38])
  c = returning("small", [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  # The check is not vacuous: in float32 the train step's weighted sum is inf here.
  rows = np.array([[2e38, 2e38, 0.0]], np.float32)
  assert np.isinf(_device_total(rows, (1.0, 1.0, 1.0))).all()
  with pytest.raises(UserError) as info:
    score(a, b, c)
  message = one_line_error(info)
  assert message.startswith("reward functions 'big_a' (2e+38 x weight 1), 'big_b' (2e+38 x "
                            "weight 1) give completion 0 (prompt '1+1=')"), message
  assert "'small'" not in message  # contributes 0 to that row
  assert "float32" in message and "1 more completion(s)" in message


def test_weight_that_overflows_one_reward_names_that_function():
  f = returning("scaled", [1.0, 3e38, 0.0, 0.0, 0.0, 0.0])
  g = returning("other", [None] * 6)
  assert np.isinf(_device_total(np.array([[3e38, np.nan]], np.float32), (2.0, 1.0))).all()
  with pytest.raises(UserError) as info:
    score(f, g, weights=(2.0, 1.0))
  message = one_line_error(info)
  assert message.startswith("reward function 'scaled' (3e+38 x weight 2) gives completion 1 "
                            "(prompt '1+2=')"), message
  score(f, g, weights=(1.0, 1.0))  # weight 1: 3e38 is a finite float32 total


def test_accepted_rewards_have_finite_weighted_totals():
  """Whatever passes the host check gives finite (or NaN) totals in the train step."""
  rng = np.random.default_rng(0)
  weights = (1.0, -0.5, 2.0)
  for trial in range(20):
    magnitudes = 10.0 ** rng.uniform(30, 38.5, size=(6, 3)) * rng.choice([-1, 1], size=(6, 3))
    magnitudes[rng.random((6, 3)) < 0.3] = np.nan
    funcs = [returning(f"f{j}", [None if np.isnan(v) else float(v) for v in magnitudes[:, j]])
             for j in range(3)]
    try:
      rewards = score(*funcs, weights=weights)
    except UserError as e:
      assert "\n" not in str(e) and ("beyond float32" in str(e))
      continue
    total = _device_total(rewards, weights)
    assert not np.isinf(total).any(), (trial, rewards, total)


def test_reward_weights_must_match_the_functions():
  with pytest.raises(UserError, match="reward_weights=.* has 1 entries for 2 reward functions"):
    score(returning("a", [1.0] * 6), returning("b", [1.0] * 6), weights=(1.0,))


# --- HostRollouts: weights from the config, warnings ---------------------------------------

class CharTokenizer:
  """Token i decodes to the letter chr(ord('a') + i)."""

  def batch_decode(self, rows, skip_special_tokens=True):
    return ["".join(chr(ord("a") + i) for i in row) for row in rows]


def host_config(**changes):
  return types.SimpleNamespace(**{
      "prompt_column": "prompt", "max_prompt_length": 8, "truncate_prompts": False,
      "system_prompt": None, "chat_template": "auto", "reward_weights": None,
      "prompts_per_step": 2, "num_generations": 2, "accuracy_reward": "a",
      "num_sample_texts": 1, "eval_batch_size": 4, **changes})


def host_rollout(n, length=3):
  ids = np.arange(n * length).reshape(n, length) % 26
  return sampling.Rollout(prompt_ids=np.zeros((n, 2), np.int32),
                          prompt_mask=np.ones((n, 2), np.int32),
                          completion_ids=ids.astype(np.int32),
                          completion_mask=np.ones((n, length), np.int32),
                          sampling_logprobs=np.zeros((n, length), np.float32),
                          eos_terminated=np.zeros(n, bool))


ROWS = {"prompt": ["2+2=", "3+3="], "answer": ["4", "6"]}


def test_host_rollouts_use_the_configured_weights():
  funcs = [("a", returning("a", [1e38] * 4)), ("b", returning("b", [1e38] * 4))]
  unweighted = rollouts.HostRollouts(CharTokenizer(), funcs, host_config(), 2)
  rewards, texts = unweighted.score(ROWS, host_rollout(4))
  np.testing.assert_array_equal(rewards, np.float32(1e38))
  assert texts == ["abc", "def", "ghi", "jkl"]
  weighted = rollouts.HostRollouts(CharTokenizer(), funcs,
                                   host_config(reward_weights=(1.0, 3.0)), 2)
  with pytest.raises(UserError) as info:
    weighted.score(ROWS, host_rollout(4))
  message = one_line_error(info)
  assert "'a' (1e+38 x weight 1), 'b' (1e+38 x weight 3)" in message
  assert "completion 0 (prompt '2+2=')" in message


def test_host_rollouts_reject_inf_naming_the_prompt_of_the_row():
  funcs = [("my_fn", returning("my_fn", [0.0, 0.0, -float("inf"), 0.0]))]
  host = rollouts.HostRollouts(CharTokenizer(), funcs, host_config(), 2)
  with pytest.raises(UserError) as info:
    host.score(ROWS, host_rollout(4))
  assert one_line_error(info).startswith(
      "reward function 'my_fn' returned -inf for completion 2 (prompt '3+3=')")


def grpo_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "grpo_jax" and r.levelno == logging.WARNING]


class Switchable:
  """A reward function whose return values the test sets before each call."""

  def __init__(self, name):
    self.__name__, self.values = name, None

  def __call__(self, prompts, completions, **columns):
    return list(self.values)


def test_a_function_abstaining_on_a_whole_batch_is_warned_about_once(caplog):
  a, b = Switchable("judge_a"), Switchable("judge_b")
  host = rollouts.HostRollouts(CharTokenizer(), [("judge_a", a), ("judge_b", b)],
                               host_config(), 2)
  caplog.set_level(logging.WARNING, logger="grpo_jax")
  a.values, b.values = [1.0, None, 0.0, None], [None, 1.0, 1.0, 0.0]  # partly None: quiet
  host.score(ROWS, host_rollout(4))
  assert grpo_warnings(caplog) == []

  a.values = [None] * 4  # judge_a abstains on every completion, three batches running
  for _ in range(3):
    host.score(ROWS, host_rollout(4))
  [message] = grpo_warnings(caplog)
  assert "reward function 'judge_a' returned None" in message and "all 4 completions" in message
  assert "batch 2 of this run" in message and "judge_b" not in message

  caplog.clear()
  a.values, b.values = [1.0] * 4, [None] * 4  # now judge_b: its own (single) warning
  host.score(ROWS, host_rollout(4))
  host.score(ROWS, host_rollout(4))
  [message] = grpo_warnings(caplog)
  assert "'judge_b'" in message and "'judge_a'" not in message


def test_a_batch_without_any_applicable_reward_is_warned_about_with_a_count(caplog):
  a, b = Switchable("judge_a"), Switchable("judge_b")
  host = rollouts.HostRollouts(CharTokenizer(), [("judge_a", a), ("judge_b", b)],
                               host_config(), 2)
  caplog.set_level(logging.WARNING, logger="grpo_jax")
  a.values, b.values = [None, 1.0, None, None], [None, None, 2.0, None]
  host.score(ROWS, host_rollout(4))  # rows 0 and 3 have no reward, the batch still has some
  assert not any("no reward function applied" in m for m in grpo_warnings(caplog))

  a.values = b.values = [None] * 4
  rewards, _ = host.score(ROWS, host_rollout(4))
  assert np.isnan(rewards).all()
  total = [m for m in grpo_warnings(caplog) if "no reward function applied" in m]
  assert total == ["step rewards: no reward function applied to any completion (all 4 "
                   "completions of the batch got None from every function); the update is "
                   "skipped"]
  named = [m for m in grpo_warnings(caplog) if "returned None" in m]
  assert len(named) == 2 and "'judge_a'" in named[0] and "'judge_b'" in named[1]

  caplog.clear()
  for _ in range(20):  # 21 such batches in all: one more warning, at the 10th
    host.score(ROWS, host_rollout(4))
  [message] = grpo_warnings(caplog)
  assert "no reward function applied" in message
  assert "(10 such batches so far, of 11)" in message


# --- the evaluator ------------------------------------------------------------------------

class Rows:
  """A dataset slice-able like `datasets.Dataset`: data[a:b] -> {column: values}."""

  def __init__(self, columns):
    self.columns = columns

  def __len__(self):
    return len(next(iter(self.columns.values())))

  def __getitem__(self, part):
    return {k: v[part] for k, v in self.columns.items()}


def fake_evaluator(reward_funcs, num_prompts=5):
  cfg = sampling.SamplingConfig(max_completion_length=3, eos_token_ids=(1,), num_generations=2)
  setup = types.SimpleNamespace(
      tokenizer=CharTokenizer(), reward_funcs=reward_funcs,
      grpo_config=types.SimpleNamespace(sampling=cfg),
      eval_data=Rows({"prompt": [f"{i}+{i}=" for i in range(num_prompts)],
                      "answer": [str(2 * i) for i in range(num_prompts)]}))
  layout = types.SimpleNamespace(
      sampler=lambda greedy_cfg: (lambda params, ids, mask, key: host_rollout(len(ids))),
      batch_divisor=1, to_host=lambda x: x, place_batch=lambda x: x)
  evaluator = evaluate.Evaluator(setup, host_config(), layout, rollouts.SingleTurnSampler(
      layout, evaluate.greedy_config(cfg)))
  evaluator.host.encode = lambda rows: (np.zeros((len(rows["prompt"]), 2), np.int32),
                                        np.ones((len(rows["prompt"]), 2), np.int32))
  return evaluator


def test_evaluator_warns_once_per_function_over_whole_evaluations(caplog, recwarn):
  def a(prompts, completions, **columns):
    return [1.0] * len(completions)
  evaluator = fake_evaluator([("a", a), ("never", lambda p, c, **k: [None] * len(c))])
  assert evaluator.batch_size == 4  # 5 prompts: two batches per evaluation
  caplog.set_level(logging.WARNING, logger="grpo_jax")
  for _ in range(3):
    result = evaluator(None)
  assert result.metrics["eval/rewards/a/mean"] == 1.0
  assert np.isnan(result.metrics["eval/rewards/never/mean"])
  [message] = grpo_warnings(caplog)
  assert message.startswith("evaluation rewards: reward function 'never' returned None "
                            "(not applicable) for all 5 held-out completions (evaluation 1")
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_evaluator_without_any_applicable_reward(caplog):
  evaluator = fake_evaluator([("a", lambda p, c, **k: [None] * len(c))], num_prompts=3)
  caplog.set_level(logging.WARNING, logger="grpo_jax")
  evaluator(None)
  evaluator(None)
  messages = grpo_warnings(caplog)
  assert len(messages) == 2, messages  # the function once, the empty evaluation once
  assert messages[1] == ("evaluation rewards: no reward function applied to any completion "
                         "(all 3 held-out completions got None from every function); the "
                         "eval/ reward metrics are NaN")
  # The training host of the same run warns independently (its own batches).
  host = rollouts.HostRollouts(CharTokenizer(), evaluator.host.reward_funcs, host_config(), 2)
  host.score(ROWS, host_rollout(4))
  assert sum("step rewards" in m for m in grpo_warnings(caplog)) == 2
