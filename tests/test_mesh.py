"""Mesh mode (jit + Mesh(data, fsdp, tensor)) against pmap and one device, on 8 fake devices.

The comparison runs in its own process (tests/mesh_check.py) because the device count is
fixed when JAX starts and the rest of the suite uses 4.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from grpo_jax import metrics, train
from grpo_jax.layouts import mesh
from test_train import tiny_config

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def summary():
  proc = subprocess.run([sys.executable, str(HERE / "mesh_check.py")], capture_output=True,
                        text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_layout_computes_the_same_step(summary):
  assert set(summary["layouts"]) == {"pmap8", "mesh_data8", "mesh_fsdp4_data2",
                                     "mesh_tensor2_fsdp4"}
  assert summary["moved"] > 1e-3
  for name, result in summary["layouts"].items():
    assert result["max_param_diff"] < 1e-5, name


def test_fsdp_holds_a_quarter_of_the_bytes(summary):
  per_device = summary["per_device_bytes"]
  assert per_device["mesh_data8"] == per_device["pmap8"]  # both fully replicated
  assert 0.2 < per_device["mesh_fsdp4_data2"] / per_device["pmap8"] < 0.3
  assert per_device["mesh_tensor2_fsdp4"] < per_device["mesh_fsdp4_data2"]


def test_checkpoints_restore_across_topologies(summary):
  assert summary["checkpoint_topologies"].count("->") == 3


def test_partition_rules():
  layout = mesh.make_mesh(1, 2, 2, devices=__import__("jax").devices()[:4])
  spec = lambda name, shape: tuple(mesh.partition_spec(name, shape, layout))
  # column-parallel kernels split their output, row-parallel ones their input, over
  # tensor x fsdp (tensor-major); axes that do not divide are dropped one by one
  assert spec("blocks/self_attn/q_proj/kernel", (2, 32, 64)) == (None, None, ("tensor", "fsdp"))
  assert spec("blocks/mlp/down_proj/kernel", (2, 64, 32)) == (None, ("tensor", "fsdp"), None)
  assert spec("blocks/self_attn/k_proj/kernel", (2, 32, 6)) == (None, None, "tensor")
  assert spec("blocks/self_attn/k_proj/bias", (2, 6)) == (None, "tensor")
  assert spec("embed_tokens", (100, 32)) == ("tensor", "fsdp")
  assert spec("embed_tokens", (101, 32)) == (None, "fsdp")  # 101 does not split in 2
  assert spec("blocks/input_layernorm/weight", (2, 32)) == ()


@pytest.mark.parametrize("sizes, message", [((3, 1, 1), "multiply"), ((-1, -1, 1), "-1")])
def test_bad_mesh_is_a_config_error(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh.make_mesh(*sizes)


def test_train_loop_in_mesh_mode_resumes_under_pmap(user_files):
  common = dict(dataset=f"json:{user_files / 'data.jsonl'}", prompt_column="question",
                reward_funcs="my_rewards:stop_at", checkpoint_every=2)
  sharded = tiny_config(parallelism="mesh", mesh={"data": 2, "fsdp": 2, "tensor": 1},
                        max_steps=2, **common)
  train.train_and_evaluate(sharded, user_files / "run")
  train.train_and_evaluate(tiny_config(max_steps=4, allow_config_change=True, **common), user_files / "run")
  train.train_and_evaluate(tiny_config(max_steps=4, **common), user_files / "pmap_only")
  a = metrics.read_metrics(user_files / "run" / "grpo_metrics")
  b = metrics.read_metrics(user_files / "pmap_only" / "grpo_metrics")
  losses = lambda rows: [r["loss"] for r in rows if "loss" in r]
  np.testing.assert_allclose(losses(a), losses(b), rtol=1e-4, atol=1e-6)


def test_adamw_moments_are_sharded_like_their_params():
  import jax
  from conftest import tiny_model
  from flax import nnx
  from grpo_jax import grpo, sampling
  graphdef, params = nnx.split(tiny_model())
  tx, schedule = grpo.make_optimizer(1e-3, 10)
  cfg = grpo.GRPOConfig(sampling=sampling.SamplingConfig(4, (1,), num_generations=2))
  fn = mesh.mesh_step(grpo.GRPOStep(graphdef, tx, schedule, cfg), mesh.make_mesh(1, 4, 1))
  state = fn.init_state(fn.place_params(params))
  total = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  on_one = mesh.per_device_bytes(state.opt_state, jax.devices()[0])
  assert on_one < 0.3 * total  # about a quarter (norm scales and counters stay whole)
  for restored in (fn.place_state(jax.device_get(state)),):
    assert mesh.per_device_bytes(restored.opt_state, jax.devices()[0]) == on_one
