"""LoRA: adapters on a frozen base that is also the reference.

The facts: at step 0 the adapted model is the base exactly; an update changes the adapters
and nothing else (the optimizer holds no state for the base); the adapters' gradients are
the chain rule of the full model's kernel gradients (dL/dB = s A^T dL/dW, dL/dA =
s dL/dW B^T); the reference log-probs are the base model's; the sampler's log-probs are the
train pass's; pmap over 4 devices and a (data, fsdp, tensor) mesh compute what one device
computes; dropout acts in the train pass only and is a function of the update count.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, tiny_model
from grpo_jax import grpo, sampling
from grpo_jax.layouts import mesh, pmap
from grpo_jax.errors import ConfigError
from grpo_jax.models import lora
from grpo_jax.models.transformer import positions_from_mask

PROMPTS, G, LENGTH = 8, 4, 6
SCALE_ALPHA, RANK = 16.0, 4  # scale 4: a wrong scaling cannot pass


def lora_setup(targets=lora.PROJECTIONS, dropout=0.0, seed=3, quantization="none",
               trained_b=True):
  """(plain graphdef, base, adapted graphdef, adapters, LoraConfig): B random (non-zero)
  unless `trained_b` is False (fresh adapters: B = 0)."""
  base_def, base = nnx.split(tiny_model(seed=seed))
  cfg = lora.LoraConfig(rank=RANK, alpha=SCALE_ALPHA, dropout=dropout, targets=targets)
  policy_def, like = lora.adapted_model(TINY, cfg)
  adapters = lora.init_adapters(like, jax.random.key(seed))
  if trained_b:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    adapters = jax.tree_util.tree_unflatten(treedef, [
        0.3 * jax.random.normal(k, x.shape) if "lora_b" in jax.tree_util.keystr(p) else x
        for (p, x), k in zip(leaves, keys)])
  base = lora.prepare_base(base, "float32", quantization)
  return base_def, base, policy_def, adapters, cfg


def make_step(policy_def, base_def, beta=0.04, num_iterations=2, dropout_seed=None):
  scfg = sampling.SamplingConfig(max_completion_length=LENGTH, eos_token_ids=(2,),
                                 num_generations=G, temperature=1.0)
  cfg = grpo.GRPOConfig(sampling=scfg, beta=beta, num_iterations=num_iterations,
                        epsilon=0.1, epsilon_high=0.15, logprob_chunk_size=8,
                        dropout_seed=dropout_seed)
  tx, schedule = grpo.make_optimizer(1e-2, 10, eps=1e-3)
  return grpo.GRPOStep(policy_def, tx, schedule, cfg, reference_def=base_def), tx


def prompts(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 32, size=(PROMPTS, 5)).astype(np.int32)
  mask = (np.arange(5)[None] >= rng.integers(0, 4, size=PROMPTS)[:, None]).astype(np.int32)
  return ids, mask


def logits(graphdef, params, ids, mask):
  return nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask))


def rollout_and_rewards(step, base, adapters):
  ids, mask = prompts()
  rollout = jax.jit(step.generate)(step.policy_params(adapters, base), ids, mask,
                                   jax.random.key(0))
  rewards = np.random.default_rng(1).normal(size=(PROMPTS * G, 1)).astype(np.float32)
  rewards[8:12] = 0.5  # a group whose rewards are all equal
  return rollout, rewards


# -- the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_fresh_adapters_give_the_base_models_logits_exactly(quantization):
  base_def, base, policy_def, adapters, _ = lora_setup(quantization=quantization,
                                                       trained_b=False)
  ids, mask = prompts()
  np.testing.assert_array_equal(logits(policy_def, lora.policy_params(base, adapters), ids, mask),
                                logits(base_def, base, ids, mask))


def test_adapted_logits_are_the_merged_models():
  """y = x W + s x A B, checked against the merged kernel W + s A B (a NumPy product)."""
  base_def, base, policy_def, adapters, cfg = lora_setup(targets=("q_proj", "v_proj", "down_proj"))
  flat_base, flat_ad = dict(nnx.to_flat_state(base)), dict(nnx.to_flat_state(adapters))
  merged = []
  for path, var in nnx.to_flat_state(base):
    a = flat_ad.get(path[:-1] + ("lora_a",))
    if a is not None and path[-1] == "kernel":
      b = flat_ad[path[:-1] + ("lora_b",)]
      w = np.asarray(var.value, np.float64) + cfg.scale * np.einsum(
          "lir,lro->lio", np.asarray(a.value, np.float64), np.asarray(b.value, np.float64))
      var = var.replace(jnp.asarray(w, jnp.float32))
    merged.append((path, var))
  ids, mask = prompts()
  ours = logits(policy_def, lora.policy_params(base, adapters), ids, mask)
  expected = logits(base_def, nnx.from_flat_state(merged), ids, mask)
  np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(
      ours, logits(base_def, lora.merged_kernels(base, adapters, cfg), ids, mask),
      atol=2e-4, rtol=1e-4)
  assert float(jnp.abs(ours - logits(base_def, base, ids, mask)).max()) > 0.1
  assert {p[-2] for p, _ in nnx.to_flat_state(adapters)} == {"q_proj", "v_proj", "down_proj"}


def test_target_modules_and_config_errors():
  assert lora.target_modules("all-linear") == lora.PROJECTIONS
  assert lora.target_modules("v_proj, q_proj") == ("q_proj", "v_proj")
  with pytest.raises(ConfigError, match="lora.target_modules"):
    lora.target_modules("qkv")
  with pytest.raises(ConfigError, match="lora.rank"):
    lora.LoraConfig(rank=-1)
  with pytest.raises(ConfigError, match="lora.dropout"):
    lora.LoraConfig(rank=4, dropout=1.0)


# -- the step -------------------------------------------------------------------------------

def test_an_update_changes_the_adapters_only_and_adam_holds_no_base_state():
  base_def, base, policy_def, adapters, _ = lora_setup(trained_b=False)
  step, tx = make_step(policy_def, base_def)
  rollout, rewards = rollout_and_rewards(step, base, adapters)
  state = grpo.init_train_state(adapters, tx)
  base_before = jax.tree.map(np.array, base)
  new_state, metrics = jax.jit(step.learn)(state, base, rollout, rewards)
  # Only adapter leaves are trainable; the optimizer moments cover exactly their elements.
  names = {p[-1] for p, _ in nnx.to_flat_state(new_state.params)}
  assert names == {"lora_a", "lora_b"}
  adapter_size = lora.num_params(adapters)
  moment_size = sum(x.size for x in jax.tree.leaves(new_state.opt_state) if x.ndim > 0)
  assert moment_size == 2 * adapter_size  # mu and nu, nothing for the base
  # B moved off zero (the base model is where the step started).
  moved = [float(jnp.abs(b.value).max()) for p, b in nnx.to_flat_state(new_state.params)
           if p[-1] == "lora_b"]
  assert min(moved) > 0
  # The base (the reference) is untouched, bit for bit.
  for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])


def test_adapter_gradients_are_the_chain_rule_of_the_kernel_gradients():
  """dL/dB = s A^T dL/dW and dL/dA = s dL/dW B^T, with dL/dW the plain model's gradient at
  the merged kernel W + s A B (NumPy products)."""
  base_def, base, policy_def, adapters, cfg = lora_setup()
  step, _ = make_step(policy_def, base_def, beta=0.0, num_iterations=1)
  rollout, rewards = rollout_and_rewards(step, base, adapters)
  state = grpo.init_train_state(adapters, step.tx)
  scored, _ = step.score(state, base, rollout, rewards)
  norms = grpo.loss_normalizers(grpo.loss.loss_mask(scored, step.cfg), None, LENGTH,
                                scored.rows_in_loss)
  (_, _), adapter_grads = grpo.loss_and_grads(adapters, policy_def, scored, norms, step.cfg,
                                              base=base)
  merged = lora.merged_kernels(base, adapters, cfg)
  (_, _), full_grads = grpo.loss_and_grads(merged, base_def, scored, norms, step.cfg)
  g_full = dict(nnx.to_flat_state(full_grads))
  flat_ad = dict(nnx.to_flat_state(adapters))
  for path, grad in nnx.to_flat_state(adapter_grads):
    gw = np.asarray(g_full[path[:-1] + ("kernel",)].value, np.float64)
    a = np.asarray(flat_ad[path[:-1] + ("lora_a",)].value, np.float64)
    b = np.asarray(flat_ad[path[:-1] + ("lora_b",)].value, np.float64)
    expected = (cfg.scale * np.einsum("lir,lio->lro", a, gw) if path[-1] == "lora_b"
                else cfg.scale * np.einsum("lio,lro->lir", gw, b))
    np.testing.assert_allclose(np.asarray(grad.value), expected, rtol=2e-3,
                               atol=2e-3 * np.abs(expected).max() + 1e-7, err_msg=str(path))
    assert np.abs(expected).max() > 0


def test_reference_is_the_base_with_the_adapters_off_and_old_logprobs_have_them_on():
  base_def, base, policy_def, adapters, _ = lora_setup()
  step, tx = make_step(policy_def, base_def)
  rollout, rewards = rollout_and_rewards(step, base, adapters)
  scored, _ = jax.jit(step.score)(grpo.init_train_state(adapters, tx), base, rollout, rewards)
  plain = grpo.completion_logprobs(base_def, base, rollout, 1.0, 8)[0]
  adapted = grpo.completion_logprobs(policy_def, lora.policy_params(base, adapters), rollout,
                                     1.0, 8)[0]
  np.testing.assert_allclose(scored.ref_logprobs, plain, atol=1e-6)
  np.testing.assert_allclose(scored.old_logprobs, adapted, atol=1e-6)
  mask = np.asarray(rollout.completion_mask) > 0
  assert np.abs(np.asarray(plain - adapted))[mask].max() > 1e-2  # the adapters do matter


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sampling_logprobs_equal_the_train_pass(quantization):
  base_def, base, policy_def, adapters, _ = lora_setup(quantization=quantization)
  step, _ = make_step(policy_def, base_def)
  rollout, _ = rollout_and_rewards(step, base, adapters)
  train_pass = grpo.completion_logprobs(policy_def, lora.policy_params(base, adapters),
                                        rollout, 1.0, 8)[0]
  mask = np.asarray(rollout.completion_mask) > 0
  assert mask.sum() > PROMPTS * G  # more than one token per row to compare
  np.testing.assert_allclose(np.asarray(rollout.sampling_logprobs)[mask],
                             np.asarray(train_pass)[mask], atol=2e-5)


# How far a layout (pmap over 4 devices, a 2x2 mesh) may move a metric by summing in another
# order. A gradient element sums n float32 terms: the batch's tokens (PROMPTS * G rows of
# 5 + LENGTH positions) and the matmul contractions on the way (D and F per layer, D at the
# head); reordering moves the sum by at most ~n * 2^-24 of the sum of |terms|. The terms
# have mixed signs (advantages are zero-mean per group) and cancel like a random walk, so
# the sum is ~sum|terms| / sqrt(n): relative ~n^1.5 * 2^-24 (8e-4 here; seen: 2.1e-4 on an
# AVX-512 Xeon, under 1e-4 on AMD EPYC).
REORDER_TERMS = (PROMPTS * G * (5 + LENGTH)
                 + TINY.num_layers * (TINY.hidden_size + TINY.intermediate_size)
                 + TINY.hidden_size)
REORDERED_RTOL = REORDER_TERMS**1.5 * 2.0**-24


def assert_same(one, other, atol=1e-5):
  (state_a, metrics_a), (state_b, metrics_b) = one, other
  assert metrics_a.keys() == metrics_b.keys()
  for key in metrics_a:
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=REORDERED_RTOL, atol=1e-6,
                               err_msg=key)
  for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol)


def test_pmap_and_mesh_compute_what_one_device_computes():
  base_def, base, policy_def, adapters, _ = lora_setup(quantization="int8")
  step, tx = make_step(policy_def, base_def)
  rollout, rewards = rollout_and_rewards(step, base, adapters)
  single = jax.jit(step.learn)(grpo.init_train_state(adapters, tx), base, rollout, rewards)
  single = (single[0], jax.tree.map(np.asarray, single[1]))

  p = pmap.pmap_step(step, jax.local_devices()[:4])
  state, metrics = p.learn(p.init_state(p.place_params(adapters)), p.place_params(base),
                           p.place_batch(rollout), p.place_batch(rewards))
  assert_same(single, (pmap.unreplicate(state), pmap.host_metrics(metrics)))

  m = mesh.mesh_step(step, mesh.make_mesh(1, 2, 2, devices=jax.devices()[:4]))
  placed_base = m.place_params(base)
  state, metrics = m.learn(m.init_state(m.place_params(adapters)), placed_base,
                           m.place_batch(rollout), m.place_batch(rewards))
  assert_same(single, (jax.device_get(state), m.host_metrics(metrics)))
  # The quantised base and the adapters are split like their matrices, not replicated.
  for name in ("blocks/self_attn/q_proj/kernel/qvalue", "blocks/mlp/gate_proj/lora_b"):
    leaf = dict((mesh._path_name(path), x) for path, x in jax.tree_util.tree_leaves_with_path(
        lora.policy_params(placed_base, state.params)))[name]
    assert leaf.addressable_shards[0].data.size < leaf.size, name


def test_dropout_acts_in_the_train_pass_only_and_repeats_for_the_same_update():
  base_def, base, policy_def, adapters, _ = lora_setup(dropout=0.5)
  with_dropout, tx = make_step(policy_def, base_def, num_iterations=1, dropout_seed=0)
  without, _ = make_step(policy_def, base_def, num_iterations=1)
  rollout, rewards = rollout_and_rewards(with_dropout, base, adapters)
  # Sampling never drops: the same tokens and log-probs with or without dropout configured.
  again, _ = rollout_and_rewards(without, base, adapters)
  np.testing.assert_array_equal(rollout.completion_ids, again.completion_ids)
  state = grpo.init_train_state(adapters, tx)
  learn = lambda step: jax.jit(step.learn)(state, base, rollout, rewards)[1]["loss"]
  dropped, dropped_again, plain = learn(with_dropout), learn(with_dropout), learn(without)
  assert float(dropped) == float(dropped_again)  # a function of the update count alone
  assert abs(float(dropped) - float(plain)) > 1e-6
  key_0 = grpo.dropout_key(with_dropout.cfg, jnp.int32(0))
  key_1 = grpo.dropout_key(with_dropout.cfg, jnp.int32(1))
  assert not np.array_equal(jax.random.key_data(key_0), jax.random.key_data(key_1))
  assert grpo.dropout_key(without.cfg, jnp.int32(0)) is None


def test_the_adapted_model_needs_its_base_in_update():
  base_def, base, policy_def, adapters, _ = lora_setup()
  step, tx = make_step(policy_def, base_def)
  rollout, rewards = rollout_and_rewards(step, base, adapters)
  scored, _ = step.score(grpo.init_train_state(adapters, tx), base, rollout, rewards)
  with pytest.raises(ValueError, match="base"):
    step.update(grpo.init_train_state(adapters, tx), scored)
