"""The KV-cached sampler against a naive full-recompute decoder, plus filters and RNG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import grpo, sampling

PROMPTS = np.array([[0, 0, 0, 7, 8, 9], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 11]], np.int32)
MASK = (np.arange(6)[None] >= np.array([3, 0, 5])[:, None]).astype(np.int32)
NO_EOS = (31,)  # a token the tiny model is not asked to stop on (checked below)


def naive_greedy(model, prompts, mask, steps):
  """Recomputes the whole sequence for every new token: no cache at all."""
  ids, m = jnp.asarray(prompts), jnp.asarray(mask)
  out = []
  for _ in range(steps):
    token = jnp.argmax(model(ids, m)[:, -1], axis=-1)
    out.append(token)
    ids = jnp.concatenate([ids, token[:, None]], axis=1)
    m = jnp.concatenate([m, jnp.ones_like(m[:, :1])], axis=1)
  return np.stack(out, axis=1)


def run(model, cfg, rng=0, prompts=PROMPTS, mask=MASK):
  graphdef, params = nnx.split(model)
  fn = jax.jit(sampling.generate, static_argnums=(0, 5))
  return fn(graphdef, params, prompts, mask, jax.random.key(rng), cfg)


def greedy_cfg(**kw):
  return sampling.SamplingConfig(**{"max_completion_length": 12, "eos_token_ids": NO_EOS,
                                    "greedy": True, **kw})


def test_cached_greedy_equals_full_recompute(model):
  expected = naive_greedy(model, PROMPTS, MASK, 12)
  assert not np.isin(expected, NO_EOS).any()
  out = run(model, greedy_cfg())
  np.testing.assert_array_equal(np.asarray(out.completion_ids), expected)
  assert np.asarray(out.completion_mask).all()
  # Diverse output, so the comparison is not trivially satisfied by a constant token.
  assert len(np.unique(expected)) > 3


def test_bfloat16_cached_greedy_equals_full_recompute():
  model = tiny_model(seed=1, dtype="bfloat16")
  np.testing.assert_array_equal(
      np.asarray(run(model, greedy_cfg()).completion_ids), naive_greedy(model, PROMPTS, MASK, 12))


def test_top_k_one_equals_greedy(model):
  greedy = run(model, greedy_cfg())
  sampled = run(model, greedy_cfg(greedy=False, top_k=1, temperature=1.0), rng=123)
  np.testing.assert_array_equal(sampled.completion_ids, greedy.completion_ids)
  np.testing.assert_allclose(sampled.sampling_logprobs, greedy.sampling_logprobs, atol=1e-6)


def test_eos_stops_each_row_and_masks_the_rest(model):
  free = np.asarray(run(model, greedy_cfg()).completion_ids)
  eos = int(free[0, 2])  # row 0 emits this at step 2; other rows may emit it elsewhere or never
  out = run(model, greedy_cfg(eos_token_ids=(eos,), pad_token_id=30))
  ids, mask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
  for row in range(len(free)):
    hits = np.flatnonzero(free[row] == eos)
    end = hits[0] + 1 if len(hits) else free.shape[1]  # EOS itself is part of the completion
    np.testing.assert_array_equal(mask[row], np.arange(free.shape[1]) < end)
    np.testing.assert_array_equal(ids[row, :end], free[row, :end])
    assert (ids[row, end:] == 30).all()
    assert (np.asarray(out.sampling_logprobs)[row, end:] == 0).all()
  assert mask[0].sum() == 3
  np.testing.assert_array_equal(out.eos_terminated, mask.sum(1) < free.shape[1])


def test_same_key_same_samples_and_groups_differ(model):
  cfg = sampling.SamplingConfig(max_completion_length=10, eos_token_ids=NO_EOS,
                                num_generations=4, temperature=1.5)
  a, b, c = run(model, cfg, rng=5), run(model, cfg, rng=5), run(model, cfg, rng=6)
  np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
  assert not np.array_equal(a.completion_ids, c.completion_ids)
  ids = np.asarray(a.completion_ids).reshape(3, 4, -1)
  assert all(len({tuple(s) for s in group}) > 1 for group in ids)  # siblings differ
  np.testing.assert_array_equal(a.prompt_ids, np.repeat(PROMPTS, 4, axis=0))


def test_sampling_logprobs_match_the_train_forward(model):
  """Log-probs recorded while decoding equal the full-sequence scoring at temperature T."""
  cfg = sampling.SamplingConfig(max_completion_length=10, eos_token_ids=(3,),
                                num_generations=2, temperature=0.7, top_k=20, top_p=0.9)
  out = run(model, cfg, rng=1)
  graphdef, params = nnx.split(model)
  scored, _ = grpo.completion_logprobs(graphdef, params, out, 0.7, chunk_size=4)
  mask = np.asarray(out.completion_mask, bool)
  np.testing.assert_allclose(np.asarray(scored)[mask], np.asarray(out.sampling_logprobs)[mask],
                             atol=2e-5)


def test_empirical_distribution_follows_temperature(model):
  """First tokens drawn from one prompt follow softmax(logits / T)."""
  temperature, n = 2.0, 4000
  cfg = sampling.SamplingConfig(max_completion_length=1, eos_token_ids=NO_EOS,
                                num_generations=n, temperature=temperature)
  out = run(model, cfg, prompts=PROMPTS[1:2], mask=MASK[1:2])
  logits = model(jnp.asarray(PROMPTS[1:2]), jnp.asarray(MASK[1:2]))[0, -1]
  expected = np.asarray(jax.nn.softmax(logits / temperature))
  counts = np.bincount(np.asarray(out.completion_ids)[:, 0], minlength=expected.size) / n
  assert np.abs(counts - expected).max() < 0.03
  assert expected.max() < 0.5  # the check above would be vacuous for a one-hot distribution


def test_inverse_cdf_draws_follow_probs_across_blocks():
  """Frequencies match probs over a vocabulary of several blocks (padded last block);
  zero-probability tokens, including the edges u -> 0 and u -> 1, are never drawn."""
  rng = np.random.default_rng(0)
  v, n = 1000, 200_000
  probs = rng.random(v) ** 4
  probs[rng.random(v) < 0.3] = 0.0  # e.g. removed by top-k / top-p
  probs[[0, v - 1]] = 0.0  # what u = 0 and u -> 1 would land on without the guards
  probs /= probs.sum()
  uniforms = jax.random.uniform(jax.random.key(0), (n,))
  draws = np.asarray(sampling.sample_inverse_cdf(jnp.broadcast_to(probs, (n, v)), uniforms,
                                                 block=64))
  counts = np.bincount(draws, minlength=v) / n
  assert counts[probs == 0].sum() == 0
  assert np.abs(counts - probs).max() < 4 * np.sqrt(probs.max() / n)
  edges = sampling.sample_inverse_cdf(jnp.asarray(np.stack([probs, probs])),
                                      jnp.array([0.0, np.nextafter(1.0, 0.0)], jnp.float32))
  assert probs[np.asarray(edges)].min() > 0


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  keep = lambda f: np.asarray(f > jnp.finfo(jnp.float32).min)
  np.testing.assert_array_equal(keep(sampling.filter_logits(logits, 2, 1.0)),
                                [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(keep(sampling.filter_logits(logits, 0, 0.75)),
                                [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(keep(sampling.filter_logits(logits, 0, 0.4)),
                                [[1, 0, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(keep(sampling.filter_logits(logits, 3, 0.9)),
                                [[1, 1, 1, 0], [0, 1, 1, 1]])


@pytest.mark.parametrize("field, value, message", [
    ("temperature", 0.0, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -1, "top_k"),
    ("max_completion_length", 0, "max_completion_length"), ("eos_token_ids", (), "eos"),
])
def test_bad_sampling_config(field, value, message):
  kwargs = {"max_completion_length": 4, "eos_token_ids": (1,), field: value}
  with pytest.raises(ValueError, match=message):
    sampling.SamplingConfig(**kwargs)
