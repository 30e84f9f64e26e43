"""pmap over 4 fake CPU devices computes what one device computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import grpo, sampling
from grpo_jax.layouts import pmap

PROMPTS, G, LENGTH = 8, 4, 6


def make_step(loss_type="grpo", scale_rewards="group", num_iterations=1, beta=0.04):
  model = tiny_model(seed=3)
  graphdef, params = nnx.split(model)
  scfg = sampling.SamplingConfig(max_completion_length=LENGTH, eos_token_ids=(2,),
                                 num_generations=G, temperature=1.0)
  cfg = grpo.GRPOConfig(sampling=scfg, beta=beta, loss_type=loss_type,
                        scale_rewards=scale_rewards, num_iterations=num_iterations,
                        epsilon=0.1, epsilon_high=0.15, num_reward_funcs=2,
                        reward_weights=(1.0, 0.5), logprob_chunk_size=4)
  # Adam's eps bounds how much float noise in near-zero gradients (different reduction
  # order on 1 vs 4 devices) can be amplified into the update; 1e-3 keeps it below 1e-5.
  tx, schedule = grpo.make_optimizer(1e-2, 10, eps=1e-3)
  return grpo.GRPOStep(graphdef, tx, schedule, cfg), params, tx


def prompts(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 32, size=(PROMPTS, 5)).astype(np.int32)
  mask = (np.arange(5)[None] >= rng.integers(0, 4, size=PROMPTS)[:, None]).astype(np.int32)
  return {"prompt_ids": ids, "prompt_mask": mask}


def run_learn(step, params, tx, rollout, rewards, num_devices):
  p = pmap.pmap_step(step, jax.local_devices()[:num_devices])
  state = pmap.replicate(grpo.init_train_state(params, tx), p.devices)
  ref = pmap.replicate(jax.tree.map(lambda x: x * 0.9, params), p.devices)
  state, metrics = p.learn(state, ref, pmap.shard(rollout, num_devices),
                           pmap.shard(rewards, num_devices))
  return pmap.unreplicate(state), pmap.host_metrics(metrics)


def assert_same(a_state, a_metrics, b_state, b_metrics):
  assert a_metrics.keys() == b_metrics.keys()
  for key in a_metrics:
    np.testing.assert_allclose(a_metrics[key], b_metrics[key], rtol=2e-4, atol=1e-6, err_msg=key)
  for x, y in zip(jax.tree.leaves(a_state.params), jax.tree.leaves(b_state.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)  # lr 1e-2: updates ~1e-2


@pytest.mark.parametrize("loss_type, scale_rewards, num_iterations", [
    ("grpo", "group", 1), ("dapo", "batch", 2), ("dr_grpo", "none", 1),
])
def test_learn_on_one_and_four_devices_agree(loss_type, scale_rewards, num_iterations):
  step, params, tx = make_step(loss_type, scale_rewards, num_iterations)
  batch = prompts()
  rollout = jax.jit(step.generate)(params, batch["prompt_ids"], batch["prompt_mask"],
                                   jax.random.key(0))
  rewards = np.random.default_rng(1).normal(size=(PROMPTS * G, 2)).astype(np.float32)
  rewards[3, 1] = np.nan  # one function abstains on one row
  rewards[8:12, 0] = 0.7  # an all-equal group on the first function
  one = run_learn(step, params, tx, rollout, rewards, 1)
  four = run_learn(step, params, tx, rollout, rewards, 4)
  assert_same(*one, *four)
  # The update did something and the metrics are live.
  moved = max(float(jnp.abs(a - b).max())
              for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(params)))
  assert moved > 1e-4
  assert one[1]["kl"] > 0 and one[1]["grad_norm"] > 0
  # Without collectives (plain jit, axis_name=None) the single-device numbers are the same.
  state = grpo.init_train_state(params, tx)
  ref = jax.tree.map(lambda x: x * 0.9, params)
  _, plain = jax.jit(step.learn)(state, ref, rollout, rewards)
  for key in plain:
    np.testing.assert_allclose(plain[key], one[1][key], rtol=2e-4, atol=1e-6, err_msg=key)


def test_fused_train_step_with_sampling_agrees_across_device_counts():
  step, params, tx = make_step("dapo", "batch")

  def reward_fn(rollout):  # jittable: how often token 5 is emitted
    return jnp.sum((rollout.completion_ids == 5) * rollout.completion_mask, -1).astype(
        jnp.float32)

  results = []
  for n in (1, 4):
    p = pmap.pmap_step(step, jax.local_devices()[:n])
    state = pmap.replicate(grpo.init_train_state(params, tx), p.devices)
    ref = pmap.replicate(params, p.devices)
    rollout = p.generate(state.params, *pmap.shard(
        (prompts()["prompt_ids"], prompts()["prompt_mask"]), n), jax.random.key(7))
    state, metrics = p.train_step(reward_fn)(state, ref, pmap.shard(prompts(), n),
                                             jax.random.key(7))
    results.append((pmap.unshard(rollout), pmap.unreplicate(state),
                    pmap.host_metrics(metrics)))
  (r1, s1, m1), (r4, s4, m4) = results
  np.testing.assert_array_equal(r1.completion_ids, r4.completion_ids)
  np.testing.assert_array_equal(r1.completion_mask, r4.completion_mask)
  assert_same(s1, m1, s4, m4)


@pytest.mark.parametrize("num_prompts, num_devices, message", [
    (6, 4, "multiple of the number of devices"), (0, 1, "prompts_per_step"),
])
def test_batch_must_split_over_devices(num_prompts, num_devices, message):
  with pytest.raises(ValueError, match=message):
    pmap.check_batch(num_prompts, 4, num_devices)


def test_rollout_must_hold_whole_groups():
  with pytest.raises(ValueError, match="whole groups"):
    grpo.group_advantages(jnp.zeros(10), (1.0,), 4)


def test_fresh_state_has_the_layout_of_a_trained_one():
  """Otherwise the second `learn` call compiles the step all over again."""
  step, params, tx = make_step()
  p = pmap.pmap_step(step, jax.local_devices())
  fresh = p.init_state(p.place_params(params))
  rollout = p.generate(fresh.params, *p.place_batch((prompts()["prompt_ids"],
                                                     prompts()["prompt_mask"])),
                       jax.random.key(0))
  layout = jax.tree.map(lambda x: x.sharding, fresh)
  rewards = p.place_batch(np.ones((PROMPTS * G, 2), np.float32))
  trained, _ = p.learn(fresh, p.place_params(params), rollout, rewards)
  assert jax.tree.map(lambda x: x.sharding, trained) == layout
