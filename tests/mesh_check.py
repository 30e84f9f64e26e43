"""Run by tests/test_mesh.py in a process with 8 fake CPU devices (XLA_FLAGS set first).

One fused GRPO step (sampling with a fixed key -> jittable reward -> update) from the same
start on: 1 device, pmap over 8, and the meshes data=8, fsdp=4 x data=2, tensor=2 x fsdp=4.
Every layout must give the same completions, loss, metrics and updated parameters. Also:
per-device memory of params + AdamW state, and checkpoints restored across topologies.
Prints a JSON summary on the last line.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax import checkpoint, grpo, sampling  # noqa: E402
from grpo_jax.layouts import mesh, pmap  # noqa: E402
from grpo_jax.models import ModelConfig, Transformer  # noqa: E402

G, PROMPTS, LENGTH = 4, 8, 6
CFG = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=64, qkv_bias=True)


def build():
  model = Transformer(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  # Larger weights than the 0.02 init, so that samples and updates are not trivial.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) if x.ndim > 1
                                        else x for x, k in zip(leaves, keys)])
  scfg = sampling.SamplingConfig(max_completion_length=LENGTH, eos_token_ids=(2,),
                                 num_generations=G, temperature=1.0)
  cfg = grpo.GRPOConfig(sampling=scfg, beta=0.04, loss_type="dapo", scale_rewards="batch",
                        logprob_chunk_size=4)
  tx, schedule = grpo.make_optimizer(1e-2, 10, eps=1e-3)
  return grpo.GRPOStep(graphdef, tx, schedule, cfg), params, tx


def reward_fn(rollout):
  return jnp.sum((rollout.completion_ids % 3 == 0) * rollout.completion_mask, -1).astype(
      jnp.float32)


def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 32, size=(PROMPTS, 5)).astype(np.int32)
  mask = (np.arange(5)[None] >= rng.integers(0, 3, size=PROMPTS)[:, None]).astype(np.int32)
  return {"prompt_ids": ids, "prompt_mask": mask}


def run_single(step, params, tx):
  state = grpo.init_train_state(params, tx)
  rollout = jax.jit(step.generate)(params, batch()["prompt_ids"], batch()["prompt_mask"],
                                   jax.random.key(3))
  state, metrics = jax.jit(step.train_step, static_argnums=4)(state, params, batch(),
                                                              jax.random.key(3), reward_fn)
  return rollout.completion_ids, state.params, jax.tree.map(np.asarray, metrics)


def run_pmap(step, params, tx, n):
  p = pmap.pmap_step(step, jax.devices()[:n])
  state = p.init_state(p.place_params(params))
  ref = p.place_params(params)
  b = p.place_batch(batch())
  rollout = p.generate(state.params, b["prompt_ids"], b["prompt_mask"], jax.random.key(3))
  state, metrics = p.train_step(reward_fn)(state, ref, b, jax.random.key(3))
  return (p.to_host(rollout).completion_ids, p.single_copy(state.params),
          p.host_metrics(metrics), state)


def run_mesh(step, params, tx, data, fsdp, tensor):
  m = mesh.mesh_step(step, mesh.make_mesh(data, fsdp, tensor))
  state = m.init_state(m.place_params(params))
  ref = m.place_params(params)
  b = m.place_batch(batch())
  rollout = m.generate(state.params, b["prompt_ids"], b["prompt_mask"], jax.random.key(3))
  state, metrics = m.train_step(reward_fn)(state, ref, b, jax.random.key(3))
  return m.to_host(rollout).completion_ids, state.params, m.host_metrics(metrics), state


def max_param_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  step, params, tx = build()
  ids0, params0, metrics0 = run_single(step, params, tx)
  moved = max_param_diff(params0, params)
  assert moved > 1e-3, f"the reference update did not move the params ({moved})"
  summary = {"moved": moved, "layouts": {}}
  states = {}
  layouts = {"pmap8": lambda: run_pmap(step, params, tx, 8),
             "mesh_data8": lambda: run_mesh(step, params, tx, 8, 1, 1),
             "mesh_fsdp4_data2": lambda: run_mesh(step, params, tx, 2, 4, 1),
             "mesh_tensor2_fsdp4": lambda: run_mesh(step, params, tx, 1, 4, 2)}
  for name, run in layouts.items():
    ids, new_params, metrics, state = run()
    states[name] = state
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids0), err_msg=name)
    for key in metrics0:
      np.testing.assert_allclose(metrics[key], metrics0[key], rtol=2e-4, atol=1e-6,
                                 err_msg=f"{name}: {key}")
    diff = max_param_diff(new_params, params0)
    assert diff < 1e-5, f"{name}: params differ by {diff}"
    summary["layouts"][name] = {"loss": float(metrics["loss"]), "max_param_diff": diff}

  # Per-device bytes of params + optimizer state, read from the arrays' shardings.
  device = jax.devices()[0]
  per_device = {name: mesh.per_device_bytes((s.params, s.opt_state), device)
                for name, s in states.items()}
  summary["per_device_bytes"] = per_device
  ratio = per_device["mesh_fsdp4_data2"] / per_device["pmap8"]
  assert 0.2 < ratio < 0.35, f"fsdp=4 should hold about a quarter of pmap's bytes: {ratio}"
  summary["fsdp4_over_pmap"] = ratio

  # Checkpoints across topologies: saved from pmap over 8, restored on pmap over 2 and on
  # the tensor x fsdp mesh; saved from the mesh, restored on pmap over 4.
  with tempfile.TemporaryDirectory() as tmp:
    p8 = pmap.pmap_step(step, jax.devices())
    single = p8.single_copy(states["pmap8"])
    ckpt = checkpoint.Checkpointer(os.path.join(tmp, "a"), {"arch": "tiny"})
    ckpt.save(1, single, {"data": {"position": 8}})
    ckpt.wait()
    like = grpo.TrainState(jnp.zeros((), jnp.int32), params, jax.eval_shape(tx.init, params))
    restored, meta = ckpt.restore(1, like)
    assert meta["data"] == {"position": 8}
    p2 = pmap.pmap_step(step, jax.devices()[:2])
    on_p2 = p2.single_copy(p2.place_state(restored))
    m = mesh.mesh_step(step, mesh.make_mesh(1, 4, 2))
    on_mesh = m.place_state(restored)
    for tree in (on_p2, on_mesh):
      for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ckpt.close()
    ckpt = checkpoint.Checkpointer(os.path.join(tmp, "b"), {"arch": "tiny"})
    ckpt.save(1, m.single_copy(states["mesh_tensor2_fsdp4"]), {})
    ckpt.wait()
    restored, _ = ckpt.restore(1, like)
    p4 = pmap.pmap_step(step, jax.devices()[:4])
    on_p4 = p4.single_copy(p4.place_state(restored))
    for x, y in zip(jax.tree.leaves(on_p4), jax.tree.leaves(states["mesh_tensor2_fsdp4"])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ckpt.close()
  summary["checkpoint_topologies"] = "pmap8->pmap2, pmap8->mesh(tensor2,fsdp4), mesh->pmap4"
  print(json.dumps(summary))


if __name__ == "__main__":
  sys.exit(main())
