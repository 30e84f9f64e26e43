"""The pieces FSDP is made of: activation constraints (identities off a mesh), the chunked
MLP, and sizes taken from the compiled-for platform and one shard's rows."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import tiny_model
from grpo_jax import grpo, sampling
from grpo_jax.layouts import mesh
from grpo_jax.models import sharding, transformer


def test_mlp_chunks_divide_the_sequence_and_fit_the_budget():
  assert transformer.mlp_chunks(640, 16, 4864, 2) == 4  # Qwen2.5-0.5B on a v5e-8 chip
  assert transformer.mlp_chunks(146, 4, 1408, 4) == 1  # a CPU micro-batch: no chunks
  k = transformer.mlp_chunks(90, 64, 4096, 4)
  assert 90 % k == 0 and 64 * 90 // k * 4096 * 4 <= transformer.MLP_CHUNK_BYTES


def test_chunked_mlp_gives_the_same_logits_and_gradients(monkeypatch):
  model = tiny_model()
  graphdef, params = nnx.split(model)
  ids = jax.random.randint(jax.random.key(1), (4, 12), 0, 32)
  mask = jnp.ones_like(ids).at[0, :3].set(0)

  def loss(p):
    logits = nnx.merge(graphdef, p)(ids, mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

  want, want_grads = jax.value_and_grad(loss)(params)
  monkeypatch.setattr(transformer, "MLP_CHUNK_BYTES", 4 * 12 * 64 * 4 // 3)  # 3 chunks
  assert transformer.mlp_chunks(12, 4, 64, 4) == 3
  got, got_grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # grads up to ~10


def test_constraints_are_identities_off_a_mesh_and_pin_rows_on_one():
  x = jnp.arange(24.0).reshape(8, 3)
  assert sharding.rows(x) is x and sharding.rows_per_device(8) == 8
  layout = mesh.make_mesh(2, 2, 1, devices=jax.devices()[:4])
  with jax.set_mesh(layout):
    assert sharding.rows_per_device(8) == 2  # split over data x fsdp
    assert sharding.rows_per_device(8, sharding.DECODE_AXES) == 4
    assert sharding.rows_per_device(6) == 3  # fsdp does not divide 3: data only
    pinned = jax.jit(lambda a: sharding.rows(a * 2))(x)
  assert pinned.sharding.spec[0] == ("data", "fsdp") and pinned.sharding.is_fully_replicated is False
  np.testing.assert_array_equal(pinned, x * 2)


def test_mesh_step_sizes_chunks_from_one_shard():
  graphdef, _ = nnx.split(tiny_model())
  tx, schedule = grpo.make_optimizer(1e-3, 10)
  cfg = grpo.GRPOConfig(sampling=sampling.SamplingConfig(4, (1,), num_generations=2))
  step = mesh.mesh_step(grpo.GRPOStep(graphdef, tx, schedule, cfg),
                        mesh.make_mesh(2, 2, 1, devices=jax.devices()[:4]))
  assert step.step.cfg.token_shards == 4 and step.step.axis_name is None
  # 64k tokens over 4 shards: each shard's 16k tokens set the chunk, not the global 64k
  assert grpo.vocab_chunk_size(0, 65536 // 4, 151936) == grpo.LOGITS_CHUNK_BYTES // (4 * 16384)
