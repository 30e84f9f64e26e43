"""The engine learns: proof that the signs of advantage, ratio and KL are right."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax import grpo, sampling
from grpo_jax.layouts import pmap
from grpo_jax.models import ModelConfig, Transformer

TARGET = 5


def target_reward(rollout):
  """Fraction of the completion's positions that hold TARGET (jittable)."""
  hits = (rollout.completion_ids == TARGET) * rollout.completion_mask
  return jnp.sum(hits, -1) / rollout.completion_ids.shape[1]


def test_rewards_rise_on_a_toy_task():
  cfg = ModelConfig(vocab_size=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  scfg = sampling.SamplingConfig(max_completion_length=8, eos_token_ids=(1,),
                                 num_generations=4)
  gcfg = grpo.GRPOConfig(sampling=scfg, beta=0.04, loss_type="grpo")
  tx, schedule = grpo.make_optimizer(5e-3, 150)  # linear decay to 0
  p = pmap.pmap_step(grpo.GRPOStep(graphdef, tx, schedule, gcfg))
  state = pmap.replicate(grpo.init_train_state(params, tx), p.devices)
  ref = pmap.replicate(params, p.devices)
  train_step = p.train_step(target_reward)
  rng = np.random.default_rng(0)
  rewards, kls = [], []
  for i in range(150):
    ids = rng.integers(2, 16, size=(8, 4)).astype(np.int32)
    batch = pmap.shard({"prompt_ids": ids, "prompt_mask": np.ones_like(ids)},
                           p.num_devices)
    state, metrics = train_step(state, ref, batch, jax.random.key(i))
    metrics = pmap.host_metrics(metrics)
    rewards.append(float(metrics["reward"]))
    kls.append(float(metrics["kl"]))
  before, after = np.mean(rewards[:5]), np.mean(rewards[-20:])
  assert before < 0.25, before
  assert after > 0.8, after
  assert np.isfinite(kls).all() and kls[-1] > 0  # the policy moved away from the reference
