"""Multi-turn sampling (sampling.multi_turn driven by tools.turns.run_turns) with a scripted
tool: rows stop on chosen tokens, the "tool" answers with ragged token lists, the rows go
on from their KV cache. Checked against full-sequence recomputation, single-turn decoding,
and across layouts (one device, pmap over 4, a mesh)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import grpo, sampling
from grpo_jax.layouts import mesh, pmap
from grpo_jax.grpo import loss as loss_lib
from grpo_jax.grpo.logprobs import completion_logprobs
from grpo_jax.tools import turns

PROMPTS = np.array([[0, 0, 0, 7, 8, 9], [3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 11],
                    [0, 2, 9, 4, 1, 5]], np.int32)
MASK = (np.arange(6)[None] >= np.array([3, 0, 5, 1])[:, None]).astype(np.int32)
STOPS = (3, 17, 22, 29)  # "tool-call closers": frequent enough in a tiny random model's output
EOS = (31,)


def scripted_tool(turns_seen):
  """Answers every stopped row with a response whose length depends on the row and on how
  many times it was answered (1..7 tokens, ragged); never answers a row a 4th time."""
  def respond(waiting, eos):
    out = {}
    for r, ids in waiting.items():
      turns_seen.setdefault(r, 0)
      if turns_seen[r] >= 3:
        continue
      turns_seen[r] += 1
      out[r] = [(5 * r + 3 * turns_seen[r] + k) % 30 + 1 for k in range(1 + (r + turns_seen[r]) % 7)]
    return out
  return respond


def make_layout(kind, model, cfg):
  step = grpo.GRPOStep(nnx.graphdef(model), None, None,
                       grpo.GRPOConfig(sampling=cfg, num_reward_funcs=1))
  if kind == "one":
    return pmap.pmap_step(step, jax.local_devices()[:1])
  if kind == "pmap":
    return pmap.pmap_step(step, jax.local_devices()[:4])
  return mesh.mesh_step(step, mesh.make_mesh(data=2, fsdp=1, tensor=2))


def rollout_of(kind, model, cfg, respond, max_iterations=3, rng=0):
  layout = make_layout(kind, model, cfg)
  params = layout.place_params(nnx.state(model))
  placed, counts = turns.run_turns(layout, layout.turn_phases(cfg), params, PROMPTS, MASK,
                                   jax.random.key(rng), respond, max_iterations, cfg)
  return jax.tree.map(np.asarray, layout.to_host(placed)), counts


def cfg_of(**kw):
  return sampling.SamplingConfig(**{"max_completion_length": 40, "eos_token_ids": EOS,
                                    "stop_token_ids": STOPS, "num_generations": 2, **kw})


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=3)


@pytest.fixture(scope="module")
def sampled(model):
  seen = {}
  return rollout_of("one", model, cfg_of(), scripted_tool(seen)), seen


def test_the_script_makes_three_tool_turns_with_ragged_responses(sampled):
  (rollout, counts), seen = sampled
  tool = rollout.tool_mask.astype(bool)
  assert max(seen.values()) == 3 and sum(v == 3 for v in seen.values()) >= 2
  assert counts.turns.max() == 4  # 3 responses: 4 model turns
  # every response lands right after a stop token, packed: no holes in the mask
  mask = rollout.completion_mask.astype(bool)
  assert all(np.all(m[:m.sum()]) for m in mask)
  for r in range(len(tool)):
    starts = np.flatnonzero(tool[r] & ~np.roll(tool[r], 1))
    for s in starts:
      assert rollout.completion_ids[r, s - 1] in STOPS + EOS
  lengths = {int(t.sum()) for t in tool}
  assert len(lengths) > 2  # ragged


def full_logprobs(model, rollout, temperature=1.0):
  graphdef, params = nnx.split(model)
  lp, _ = completion_logprobs(graphdef, params, sampling.Rollout(*map(jnp.asarray, rollout[:6])),
                              temperature, 0)
  return np.asarray(lp)


def reordered_logprob_tolerance(model, rollout) -> float:
  """How far two float32 evaluations of the same log-probs may differ when their sums run in
  another order (one token at a time against the KV cache vs one full pass; the CPU's
  kernels differ between AVX2 and AVX-512 machines too).

  Reordering a float32 sum of n terms moves it by at most ~n * 2^-24 of the sum of |terms|.
  A logit is a D-term sum over hidden units that went through `layers` blocks of (D + F)-term
  sums, each term of the logit's own magnitude at most, and a log-softmax carries the
  largest logit's error: (layers * (D + F) + D) * 2^-24 * max|logit|."""
  cfg = model.cfg
  ids = np.concatenate([rollout.prompt_ids, rollout.completion_ids], 1)
  mask = np.concatenate([rollout.prompt_mask, rollout.completion_mask], 1)
  top = float(np.abs(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))).max())
  terms = cfg.num_layers * (cfg.hidden_size + cfg.intermediate_size) + cfg.hidden_size
  return terms * 2.0**-24 * top


def test_sampler_logprobs_of_model_tokens_equal_one_full_pass(model, sampled):
  (rollout, _), _ = sampled
  model_tokens = np.asarray(sampling.model_token_mask(rollout)).astype(bool)
  recomputed = full_logprobs(model, rollout)
  np.testing.assert_allclose(rollout.sampling_logprobs[model_tokens], recomputed[model_tokens],
                             atol=reordered_logprob_tolerance(model, rollout), rtol=0)
  assert np.all(rollout.sampling_logprobs[~model_tokens] == 0)


def test_greedy_continuation_equals_reprefilling_the_whole_conversation(model):
  cfg = cfg_of(greedy=True)
  rollout, _ = rollout_of("one", model, cfg, scripted_tool({}))
  assert rollout.tool_mask.sum() > 0
  # Teacher-forced full pass over prompt + completion: the argmax after each position is
  # what re-prefilling the conversation so far and decoding one token would give.
  ids = np.concatenate([rollout.prompt_ids, rollout.completion_ids], 1)
  mask = np.concatenate([rollout.prompt_mask, rollout.completion_mask], 1)
  logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  p = rollout.prompt_ids.shape[1]
  predicted = logits[:, p - 1:-1].argmax(-1)
  model_tokens = np.asarray(sampling.model_token_mask(rollout)).astype(bool)
  np.testing.assert_array_equal(rollout.completion_ids[model_tokens], predicted[model_tokens])


def test_without_tool_calls_it_is_the_single_turn_sampler(model):
  cfg = cfg_of(stop_token_ids=())
  multi, counts = rollout_of("one", model, cfg, lambda waiting, eos: {})
  graphdef, params = nnx.split(model)
  single = jax.jit(sampling.generate, static_argnums=(0, 5))(
      graphdef, params, PROMPTS, MASK, jax.random.key(0), cfg)
  np.testing.assert_array_equal(multi.completion_ids, single.completion_ids)
  np.testing.assert_array_equal(multi.completion_mask, single.completion_mask)
  np.testing.assert_array_equal(multi.eos_terminated, single.eos_terminated)
  np.testing.assert_allclose(multi.sampling_logprobs, single.sampling_logprobs, atol=1e-5)
  assert multi.tool_mask.sum() == 0 and np.all(counts.turns == 1)


@pytest.mark.parametrize("kind", ["pmap", "mesh"])
def test_layouts_sample_the_same_conversations(model, sampled, kind):
  (expected, expected_counts), _ = sampled
  got, counts = rollout_of(kind, model, cfg_of(), scripted_tool({}))
  np.testing.assert_array_equal(got.completion_ids, expected.completion_ids)
  np.testing.assert_array_equal(got.tool_mask, expected.tool_mask)
  np.testing.assert_array_equal(got.completion_mask, expected.completion_mask)
  np.testing.assert_allclose(got.sampling_logprobs, expected.sampling_logprobs, atol=1e-5,
                             rtol=1e-5)
  np.testing.assert_array_equal(counts.turns, expected_counts.turns)


def test_a_response_longer_than_the_append_width_goes_in_several_chunks(model):
  cfg = cfg_of(max_completion_length=200)
  width = sampling.append_width(cfg)
  long = [(7 * k) % 30 + 1 for k in range(width + 9)]
  answered = set()

  def respond(waiting, eos):
    out = {r: long for r in waiting if r not in answered}
    answered.update(out)
    return out

  rollout, counts = rollout_of("one", model, cfg, respond, max_iterations=1)
  tool = rollout.tool_mask.astype(bool)
  row = int(np.argmax(tool.sum(1)))
  assert tool[row].sum() == len(long)
  np.testing.assert_array_equal(rollout.completion_ids[row][tool[row]], long)
  model_tokens = np.asarray(sampling.model_token_mask(rollout)).astype(bool)
  np.testing.assert_allclose(rollout.sampling_logprobs[model_tokens],
                             full_logprobs(model, rollout)[model_tokens], atol=1e-5, rtol=1e-5)


def test_a_response_that_runs_past_the_length_truncates_the_row(model):
  cfg = cfg_of(max_completion_length=24)
  rollout, _ = rollout_of("one", model, cfg, lambda waiting, eos: {r: [5] * 30 for r in waiting},
                          max_iterations=2)
  full = rollout.completion_mask.sum(1) == 24
  ends_in_tool = rollout.tool_mask[:, -1].astype(bool)
  assert ends_in_tool.any()
  assert np.all(full[ends_in_tool]) and not rollout.eos_terminated[ends_in_tool].any()


# ---------------------------------------------------------------------------------------
# Tool-response tokens in the loss: none. Masking them must equal deleting them.

def _loss_inputs(rollout, seed=0):
  """Current / old / reference log-probs and entropies for a rollout, random but fixed;
  advantages with a zero one (degenerate group)."""
  rng = np.random.default_rng(seed)
  shape = rollout.completion_ids.shape
  logp = -rng.uniform(0.05, 3.0, shape)
  old = logp + rng.normal(0, 0.3, shape)  # ratios != 1 (num_iterations = 2)
  ref = logp + rng.normal(0, 0.5, shape)
  entropy = rng.uniform(0.1, 2.5, shape)
  adv = rng.normal(0, 1, shape[0])
  adv[:2] = 0.0
  return logp, old, ref, entropy, adv


def _loss(rollout, logp, old, ref, entropy, adv, cfg):
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  scored = grpo.ScoredRollout(sampling.Rollout(*map(jnp.asarray, rollout)), f32(adv), f32(old),
                              f32(ref))
  norms = grpo.loss_normalizers(loss_lib.loss_mask(scored, cfg), None,
                                cfg.sampling.max_completion_length)
  fn = lambda lp: loss_lib.loss_from_logprobs(lp, f32(entropy), scored, norms, cfg)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(f32(logp))
  return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)


def _without_tool_tokens(rollout, *arrays):
  """The rollout and per-token arrays with the tool tokens deleted (model tokens packed
  to the left), as if the model had never read them."""
  keep = ~rollout.tool_mask.astype(bool) & rollout.completion_mask.astype(bool)
  width = rollout.completion_ids.shape[1]

  def pack(x, fill=0):
    out = np.full_like(x, fill)
    for r in range(x.shape[0]):
      kept = x[r][keep[r]]
      out[r, :len(kept)] = kept
    return out

  mask = pack(rollout.completion_mask)
  packed = rollout._replace(completion_ids=pack(rollout.completion_ids),
                            completion_mask=mask,
                            sampling_logprobs=pack(rollout.sampling_logprobs),
                            tool_mask=np.zeros((len(mask), width), np.int32))
  return packed, [pack(a) for a in arrays]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_tool_tokens_change_neither_loss_nor_gradient_nor_token_metrics(sampled, loss_type):
  (rollout, _), _ = sampled
  assert rollout.tool_mask.sum() > 20
  cfg = grpo.GRPOConfig(sampling=cfg_of(), num_reward_funcs=1, loss_type=loss_type, beta=0.04,
                        num_iterations=2, top_entropy_quantile=0.5, epsilon_high=0.28)
  logp, old, ref, entropy, adv = _loss_inputs(rollout)
  loss, metrics, grad = _loss(rollout, logp, old, ref, entropy, adv, cfg)
  tool = rollout.tool_mask.astype(bool)
  assert np.all(grad[tool] == 0.0) and np.abs(grad).max() > 1e-4

  # Anything at the tool positions: the same loss, gradient and metrics.
  noise = np.random.default_rng(7).normal(0, 5, logp.shape)
  changed = [np.where(tool, x + noise, x) for x in (logp, old, ref)]
  changed.append(np.where(tool, 9.0, entropy))  # high entropy: would pass any threshold
  loss2, metrics2, grad2 = _loss(rollout, *changed, adv, cfg)
  assert loss2 == loss and metrics2 == metrics
  np.testing.assert_array_equal(grad2, grad)

  # Deleting the tool tokens gives the same numbers: they count for nothing.
  packed, (p_logp, p_old, p_ref, p_entropy) = _without_tool_tokens(rollout, logp, old, ref,
                                                                   entropy)
  loss3, metrics3, grad3 = _loss(packed, p_logp, p_old, p_ref, p_entropy, adv, cfg)
  assert loss3 == pytest.approx(loss, rel=1e-6)
  assert metrics3.keys() == metrics.keys()
  for k in metrics:
    assert metrics3[k] == pytest.approx(metrics[k], rel=1e-6, abs=1e-7), k
  model_tokens = ~tool & rollout.completion_mask.astype(bool)
  np.testing.assert_allclose(_without_tool_tokens(rollout, grad)[1][0][packed.completion_mask > 0],
                             grad[model_tokens], rtol=1e-6)
  del grad3

  # ... and counting them (no tool mask) would not: the test can fail.
  as_model_tokens = rollout._replace(tool_mask=np.zeros_like(rollout.tool_mask))
  assert _loss(as_model_tokens, logp, old, ref, entropy, adv, cfg)[0] != pytest.approx(loss)


def test_length_metrics_count_model_tokens_only(sampled):
  (rollout, _), _ = sampled
  placed = sampling.Rollout(*map(jnp.asarray, rollout))
  cfg = grpo.GRPOConfig(sampling=cfg_of(), num_reward_funcs=1)
  rewards = jnp.arange(len(rollout.completion_ids), dtype=jnp.float32)[:, None]
  adv = grpo.group_advantages(rewards, (1.0,), cfg.sampling.num_generations)
  metrics = grpo.reward_metrics(rewards, adv, placed, cfg.sampling.num_generations)
  model_tokens = sampling.model_token_mask(rollout).sum(1)
  assert float(metrics["completions/mean_length"]) == pytest.approx(model_tokens.mean())
  assert model_tokens.mean() < rollout.completion_mask.sum(1).mean()
