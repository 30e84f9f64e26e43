"""The optimised train step against a straightforward one written here from the formulas.

Optimised (`GRPOStep.learn`): layers unrolled, causal-block attention (sequences longer than
`ATTENTION_BLOCK`), micro-batched gradient accumulation, the fused vocabulary-chunked
log-prob with its custom VJP (chunks whose last one overlaps), the sampler's log-probs
reused as the old log-probs when num_iterations = 1, no reference pass when beta = 0.

Straightforward (below): one `lax.scan` over the layers, plain attention over the whole
sequence, full [N, T, V] logits and `log_softmax`, a separate old-policy forward pass,
advantages in numpy, the whole batch in one gradient. Both must give the same loss,
metrics and update (up to float32 rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import grpo, sampling
from grpo_jax.models import attention

PROMPTS, G, LENGTH, PROMPT_LEN = 3, 4, 140, 6  # prompt + completion > one attention block
EOS = (32,)  # outside the 32-token vocabulary: rows are cut to chosen lengths below


def straight_logprobs(model, rollout, temperature):
  """(log-probs, entropies) [N, L] from the full logits of one plain forward pass."""
  ids = jnp.concatenate([rollout.prompt_ids, rollout.completion_ids], axis=1)
  mask = jnp.concatenate([rollout.prompt_mask, rollout.completion_mask], axis=1)
  logits = model(ids, mask)[:, PROMPT_LEN - 1:PROMPT_LEN - 1 + LENGTH] / temperature
  log_softmax = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(log_softmax, rollout.completion_ids[..., None], -1)[..., 0]
  return logp, -jnp.sum(jnp.exp(log_softmax) * log_softmax, axis=-1)


def straight_advantages(rewards):
  groups = rewards.reshape(-1, G).astype(np.float64)
  adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
  return adv.reshape(-1).astype(np.float32)


def straight_learn(model_def, params, ref_params, rollout, rewards, cfg, tx, iterations):
  """The textbook GRPO update, `iterations` times on one rollout; metrics averaged."""
  mask = rollout.completion_mask.astype(jnp.float32)
  adv = jnp.asarray(straight_advantages(rewards))[:, None]
  low, high = cfg.clip_range
  temperature = cfg.temperature
  logp_of = lambda p: straight_logprobs(nnx.merge(model_def, p), rollout, temperature)
  old = jax.lax.stop_gradient(logp_of(params)[0])  # a separate pass with the sampling policy
  # beta = 0: no reference model, no KL (TRL likewise logs no KL then).
  ref = jax.lax.stop_gradient(logp_of(ref_params)[0]) if cfg.beta else None

  def loss_fn(p):
    logp, entropy = logp_of(p)
    ratio = jnp.exp(logp - old)
    token_loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, low, high) * adv)
    kl = jnp.exp(ref - logp) - (ref - logp) - 1.0 if ref is not None else 0.0 * logp
    token_loss = token_loss + cfg.beta * kl
    if cfg.loss_type == "grpo":
      loss = jnp.mean(jnp.sum(token_loss * mask, 1) / jnp.sum(mask, 1))
    else:  # "dapo": over every completion token of the batch
      loss = jnp.sum(token_loss * mask) / jnp.sum(mask)
    tokens = jnp.sum(mask)
    is_low = (ratio < low) & (adv < 0)
    is_high = (ratio > high) & (adv > 0)
    metrics = {"kl": jnp.sum(kl * mask) / tokens, "entropy": jnp.sum(entropy * mask) / tokens,
               "clip_ratio/low_mean": jnp.sum(is_low * mask) / tokens,
               "clip_ratio/high_mean": jnp.sum(is_high * mask) / tokens}
    return loss, metrics

  opt_state = tx.init(params)
  history = []
  for _ in range(iterations):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append({**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)})
  metrics = {k: float(np.mean([float(h[k]) for h in history])) for k in history[0]}
  return params, opt_state, metrics, old


@pytest.mark.parametrize("loss_type, beta, iterations, lr", [
    ("grpo", 0.04, 1, 1e-3),  # the default recipe: old log-probs reused, reference pass
    ("dapo", 0.0, 2, 5e-2),  # no reference pass; old log-probs computed; ratios move, clip
])
def test_optimised_step_equals_straightforward(loss_type, beta, iterations, lr, monkeypatch):
  fast_model = tiny_model(3)
  plain_model = tiny_model(3, scan_layers=True)
  fast_def, params = nnx.split(fast_model)
  plain_def, plain_params = nnx.split(plain_model)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ref_params = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                            params)

  sampling_cfg = sampling.SamplingConfig(max_completion_length=LENGTH, eos_token_ids=EOS,
                                         num_generations=G, temperature=0.9)
  cfg = grpo.GRPOConfig(sampling=sampling_cfg, beta=beta, loss_type=loss_type,
                        num_iterations=iterations, micro_batch_size=4, logprob_chunk_size=7)
  tx, schedule = grpo.make_optimizer(lr, 10, schedule="constant", max_grad_norm=1.0)
  step = grpo.GRPOStep(fast_def, tx, schedule, cfg)

  rng = np.random.default_rng(0)
  prompt_ids = jnp.asarray(rng.integers(4, 32, size=(PROMPTS, PROMPT_LEN)), jnp.int32)
  prompt_mask = jnp.asarray(np.arange(PROMPT_LEN)[None] >= np.array([0, 2, 4])[:, None],
                            jnp.int32)
  rollout = jax.jit(step.generate)(params, prompt_ids, prompt_mask, jax.random.key(1))
  # Completions of varied lengths, some reaching past the first attention block, as if
  # they had stopped at an EOS there.
  lengths = np.array([140, 7, 60, 131, 2, 99, 140, 33, 125, 1, 77, 140])
  completion_mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  rollout = rollout._replace(
      completion_mask=jnp.asarray(completion_mask),
      sampling_logprobs=rollout.sampling_logprobs * completion_mask)
  assert PROMPT_LEN + LENGTH > attention.ATTENTION_BLOCK  # the blocked attention runs
  rewards = jnp.asarray(lengths % 5, jnp.float32)

  state, metrics = jax.jit(step.learn)(grpo.init_train_state(params, tx), ref_params, rollout,
                                       rewards)

  monkeypatch.setattr(attention, "ATTENTION_BLOCK", 10**6)  # plain attention from here on
  want_params, want_opt, want, old = straight_learn(
      plain_def, params, ref_params, rollout, np.asarray(rewards), cfg, tx, iterations)

  mask = np.asarray(rollout.completion_mask, bool)
  if iterations == 1:  # the sampler's log-probs are the old log-probs the loss reuses
    np.testing.assert_allclose(np.asarray(rollout.sampling_logprobs)[mask],
                               np.asarray(old)[mask], rtol=1e-4, atol=1e-4)
  else:
    assert want["clip_ratio/low_mean"] + want["clip_ratio/high_mean"] > 0  # clipping exercised
  if beta:
    assert want["kl"] > 1e-4
  else:  # no KL term: TRL leaves the metric out rather than logging 0
    assert "kl" not in metrics and want.pop("kl") == 0
  for name, value in want.items():
    assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
  assert np.any(straight_advantages(np.asarray(rewards)) != 0)
  assert float(metrics["reward"]) == pytest.approx(float(np.mean(rewards)), rel=1e-6)
  assert int(state.step) == iterations
  for got, expected, before in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params),
                                   jax.tree.leaves(params), strict=True):
    got, expected, before = (np.asarray(x, np.float64) for x in (got, expected, before))
    # The update of every weight tensor agrees to 0.1% of its size. (Elementwise, Adam's
    # ~lr-sized step on a weight whose gradient is ~0 amplifies float rounding.)
    assert np.linalg.norm(got - expected) <= 1e-3 * np.linalg.norm(expected - before) + 1e-9
    if iterations == 1:
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-6)
  for got, expected in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want_opt),
                           strict=True):
    expected = np.asarray(expected)  # Adam moments: compare against each leaf's scale
    atol = 1e-4 * float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=atol)
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
  assert moved > 1e-4  # the update did something, so the comparison above is not vacuous
