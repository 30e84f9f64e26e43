"""Abstract stand-ins of a run's arrays for the planner: the model's and the reference's
shapes, batches laid out per device (pmap) or with shardings (mesh), their bytes per chip
and the KV cache's. Nothing is allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import config as config_lib
from grpo_jax import grpo
from grpo_jax.models import ModelConfig, Transformer, lora as lora_lib, quantize


def shard_bytes(tree, per_device_axis: bool) -> int:
  """Bytes on one chip of an abstract tree (leading device axis under pmap), 4-bit values
  at half a byte (`quantize.stored_bytes`)."""
  shards = []
  for x in jax.tree.leaves(tree):
    if per_device_axis:
      shape = x.shape[1:]
    elif getattr(x, "sharding", None) is not None:
      shape = x.sharding.shard_shape(x.shape)
    else:
      shape = x.shape
    shards.append(jax.ShapeDtypeStruct(shape, x.dtype))
  return quantize.stored_bytes(shards)


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def per_device(tree, n: int):
  """[N, ...] -> [n, N / n, ...] abstract (the pmap layout of a batch)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, x.shape[0] // n) + x.shape[1:],
                                                     x.dtype), tree)


def replicated(tree, n: int):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), tree)


def abstract_model(cfg: ModelConfig, param_dtype: str):
  """(graphdef, abstract params): the model's shapes, nothing allocated."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  dtype = jnp.dtype(param_dtype)
  return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)


def kv_cache_bytes(cfg: ModelConfig, rows: int, slots: int, mesh_axes: dict[str, int] | None,
                   devices: int) -> int:
  """Per chip: keys + values of every layer, laid out as `models.sharding.kv_cache` pins
  them on a mesh (rows / data, kv heads / tensor, slots / fsdp where they divide), or
  each device's rows under pmap (mesh_axes None)."""
  kv = cfg.num_kv_heads
  if mesh_axes is None:
    rows //= devices
  else:
    rows //= mesh_axes["data"] if rows % mesh_axes["data"] == 0 else 1
    kv //= mesh_axes["tensor"] if kv % mesh_axes["tensor"] == 0 else 1
    slots //= mesh_axes["fsdp"] if slots % mesh_axes["fsdp"] == 0 else 1
  return 2 * cfg.num_layers * rows * kv * cfg.head_dim * slots * jnp.dtype(
      cfg.compute_dtype).itemsize


def abstract_reference(config, cfg: ModelConfig, params):
  """The reference as the loop places it, abstract: the actor's starting params in the
  compute dtype (`grpo.as_reference`), or with LoRA the frozen base `params` cast to
  `lora.base_dtype` and quantised per `lora.base_quantization` first (`lora.prepare_base`);
  None when the run holds none (`config.keeps_reference`)."""
  if lora_lib.from_config(config.lora) is None and not config_lib.keeps_reference(config):
    return None
  prepare = ((lambda p: p) if lora_lib.from_config(config.lora) is None else
             lambda p: lora_lib.prepare_base(p, config.lora.base_dtype,
                                             config.lora.base_quantization))
  return jax.eval_shape(lambda p: grpo.as_reference(prepare(p), cfg.compute_dtype), params)
