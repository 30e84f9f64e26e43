"""Score and update passes on the batch's longest completion (`train_length_bucket`).

The trimmed passes must give the same loss, metrics and update as the full-width ones for
every loss type (dr_grpo still divides by max_completion_length), and a run whose lengths
vary must compile no more shapes than the bucket allows.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import build, grpo, sampling, train
from test_train import tiny_config

PROMPTS, G, LENGTH, PROMPT_LEN = 3, 4, 24, 5
LENGTHS = np.array([3, 1, 7, 2, 5, 6, 1, 4, 7, 2, 3, 5])  # longest 7 (EOS included)


def test_trimmed_width():
  assert sampling.trimmed_width(7, 4, 24) == 8
  assert sampling.trimmed_width(8, 4, 24) == 12  # one spare position: EOS stays visible
  assert sampling.trimmed_width(23, 4, 24) == 24
  assert sampling.trimmed_width(24, 4, 24) == 24  # a truncated row: full width
  assert sampling.trimmed_width(3, 0, 24) == 24  # bucket 0: never trimmed
  assert sampling.trimmed_width(1, 64, 256) == 64


def ragged_rollout(step, params):
  rng = np.random.default_rng(0)
  prompt_ids = jnp.asarray(rng.integers(4, 32, size=(PROMPTS, PROMPT_LEN)), jnp.int32)
  prompt_mask = jnp.asarray(np.arange(PROMPT_LEN)[None] >= np.array([0, 1, 3])[:, None],
                            jnp.int32)
  rollout = jax.jit(step.generate)(params, prompt_ids, prompt_mask, jax.random.key(1))
  mask = (np.arange(LENGTH)[None] < LENGTHS[:, None]).astype(np.int32)
  ids = np.where(mask, np.asarray(rollout.completion_ids), 0)
  # Each shortened completion ends where its mask does, as if at an EOS.
  return rollout._replace(completion_ids=jnp.asarray(ids), completion_mask=jnp.asarray(mask),
                          sampling_logprobs=rollout.sampling_logprobs * mask,
                          eos_terminated=jnp.ones(len(LENGTHS), bool))


@pytest.mark.parametrize("loss_type, beta, iterations", [
    ("grpo", 0.04, 1), ("bnpo", 0.04, 2), ("dr_grpo", 0.0, 2), ("dapo", 0.1, 1)])
def test_trimmed_passes_equal_full_width(loss_type, beta, iterations):
  model_def, params = nnx.split(tiny_model(5))
  reference = jax.tree.map(lambda x: x * 0.97, params)
  cfg = grpo.GRPOConfig(
      sampling=sampling.SamplingConfig(max_completion_length=LENGTH, eos_token_ids=(32,),
                                       num_generations=G, temperature=0.8),
      beta=beta, loss_type=loss_type, num_iterations=iterations, micro_batch_size=4)
  # Plain SGD: parameters then differ exactly as much as the gradients do (Adam would turn
  # float32 rounding of a near-zero gradient entry into a whole step of either sign).
  tx, schedule = optax.sgd(0.02), lambda count: jnp.float32(0.02)
  step = grpo.GRPOStep(model_def, tx, schedule, cfg)
  rollout = ragged_rollout(step, params)
  rewards = jnp.asarray(LENGTHS % 3, jnp.float32)
  width = sampling.trimmed_width(int(LENGTHS.max()), 4, LENGTH)
  assert width == 8

  def run(r):
    state = grpo.init_train_state(params, tx)
    scored, reward_metrics = jax.jit(step.score)(state, reference, r, rewards)
    state, metrics = jax.jit(step.update)(state, scored)
    return state, {**reward_metrics, **metrics}

  full_state, full = run(rollout)
  trimmed = sampling.trim_completions(rollout, width)
  assert trimmed.completion_ids.shape == (PROMPTS * G, width)
  state, got = run(trimmed)
  assert set(got) == set(full)
  for name in full:
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(full[name]), rtol=2e-5,
                               atol=1e-7, err_msg=name)
  assert float(full["completions/clipped_ratio"]) == 0.0  # every row ended with EOS
  assert float(full["loss"]) != 0.0
  moved = 0
  for a, b, p in zip(jax.tree.leaves(state.params), jax.tree.leaves(full_state.params),
                     jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    moved += int(np.any(np.asarray(b) != np.asarray(p)))
  assert moved > 0


class RecordingStep:
  """The loop's compiled step, noting the completion width of every score / update call."""

  def __init__(self, layout):
    self._step_fn, self.widths = layout, {"score": [], "update": []}

  def __getattr__(self, name):
    return getattr(self._step_fn, name)

  def score(self, state, reference, rollout, rewards):
    self.widths["score"].append(rollout.completion_ids.shape[-1])
    return self._step_fn.score(state, reference, rollout, rewards)

  def update(self, state, scored, reference_params=None):
    self.widths["update"].append(scored.rollout.completion_ids.shape[-1])
    return self._step_fn.update(state, scored, reference_params)


def test_a_run_compiles_at_most_the_bounded_number_of_widths(tmp_path, monkeypatch, caplog):
  """Completions that stop at EOS after varied numbers of tokens: bucket 4 over 24
  positions allows at most 6 shapes of the score and update passes, each logged once."""
  steps = []
  original_build, original_model = build.planned_layout, build.build_model

  def recording_step_fn(*args, **kwargs):
    steps.append(RecordingStep(original_build(*args, **kwargs)))
    return steps[-1]

  def digits_end_completions(config):
    tokenizer, _, *rest = original_model(config)
    return (tokenizer, tuple(tokenizer.convert_tokens_to_ids(list("0123456789"))), *rest)

  monkeypatch.setattr(build, "planned_layout", recording_step_fn)
  # An untrained, untied model samples near-uniformly over the 98 demo tokens; with the
  # ten digits as end-of-sequence ids its completions stop after varied numbers of tokens.
  monkeypatch.setattr(build, "build_model", digits_end_completions)
  config = tiny_config(max_steps=8, max_completion_length=24, train_length_bucket=4,
                       eval_every=100, checkpoint_every=100,
                       model=dict(tie_word_embeddings=False))
  with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"), \
      caplog.at_level(logging.INFO, logger="grpo_jax"):
    train.train_and_evaluate(config, tmp_path)
  messages = [r.getMessage() for r in caplog.records]
  logged = [m for m in messages if m.startswith("Score and update passes on")]
  (step,) = steps
  widths = step.widths["score"]
  assert widths == step.widths["update"] and len(widths) == 8
  distinct = sorted(set(widths))
  assert len(distinct) >= 2, widths  # the lengths did vary, and some batches were trimmed
  assert min(distinct) < 24 and all(w % 4 == 0 for w in distinct) and len(distinct) <= 6
  assert len(logged) == len(distinct)
  # pmap programs (jit of a shard_map, `_fun`): the optimizer init, the sampler, the greedy
  # evaluator, and one score and one update per distinct width, no more.
  programs = [m for m in messages if m.startswith("Compiling jit(_fun)")]
  assert len(programs) == 3 + 2 * len(distinct), "\n".join(p[:160] for p in programs)
