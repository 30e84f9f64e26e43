"""Activation layouts on a device mesh: sharding constraints the model places on itself.

Under `jax.set_mesh(mesh)` (mesh mode, see `grpo_jax.layouts.mesh`) the model pins its activations
at the layer boundaries, so that XLA's partitioner runs FSDP rather than splitting every
matmul's contraction over the chips:

  * full-sequence passes (train, reference, log-probs): token rows split over the batch
    axes ('data', 'fsdp'); each layer's weights are all-gathered where they are used and
    their gradients reduce-scattered back to the shards;
  * decoding: weights stay where they lie (split on their output or input dimension, the
    Megatron pattern) and only the few rows being decoded move, split over 'data' alone;
    the KV cache is split over 'data' (rows), 'tensor' (kv heads) and 'fsdp' (cache slots).

With no mesh set (one device, or under `pmap`) every function here is the identity, so
the model's numbers do not depend on the layout. Which mesh is current is set by the
caller around tracing, like `axis_name` under pmap; nothing is read from global state.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # full-sequence passes: rows of the batch
DECODE_AXES = ("data",)  # decoding: rows; weights stay split over fsdp / tensor

Axes = str | Sequence[str] | None


def fit_axes(axes: Axes, dim: int, mesh) -> str | tuple[str, ...] | None:
  """The mesh axes of `axes` that exist in the mesh, kept only while their sizes divide `dim`."""
  if axes is None:
    return None
  kept, size = [], 1
  for axis in (axes,) if isinstance(axes, str) else axes:
    if axis in mesh.shape and dim % (size * mesh.shape[axis]) == 0:
      kept.append(axis)
      size *= mesh.shape[axis]
  return tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)


def constrain(x: jax.Array, *dims: Axes) -> jax.Array:
  """Pins `x` to PartitionSpec(*dims) on the current mesh (dims that do not divide are left
  whole); the identity when no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = [fit_axes(axes, dim, mesh) for axes, dim in zip(dims, x.shape)]
  return jax.lax.with_sharding_constraint(x, P(*spec))


def rows(x: jax.Array, axes: Axes = BATCH_AXES) -> jax.Array:
  """Leading dimension split over `axes`, every other dimension whole."""
  return constrain(x, axes, *([None] * (x.ndim - 1)))


def rows_per_device(rows: int, axes: Axes = BATCH_AXES) -> int:
  """How many of `rows` (split over `axes` on the current mesh) one device holds."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return rows
  kept = fit_axes(axes, rows, mesh)
  kept = () if kept is None else (kept,) if isinstance(kept, str) else kept
  for axis in kept:
    rows //= mesh.shape[axis]
  return rows


def replicated(x: jax.Array) -> jax.Array:
  return constrain(x, *([None] * x.ndim))


def kv_cache(layer_cache: dict) -> dict:
  """One layer's cache (k [B, kv, hd, S], v [B, kv, S, hd]): rows over 'data', kv heads
  over 'tensor', cache slots over 'fsdp' (attention then reduces small per-row softmax
  statistics over 'fsdp' instead of holding every slot on every chip)."""
  return {"k": constrain(layer_cache["k"], DECODE_AXES, "tensor", None, "fsdp"),
          "v": constrain(layer_cache["v"], DECODE_AXES, "tensor", "fsdp", None)}
