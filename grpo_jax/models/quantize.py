"""QLoRA's frozen base: projection kernels stored quantised with qwix, dequantised where used.

  int8: symmetric absmax per output column (and layer) — 1 byte a weight + a float scale per
        column;
  nf4:  QLoRA's 4-bit NormalFloat (the 16 quantiles of a normal distribution, Dettmers et al.
        2023, appendix E) with an absmax scale per block of NF4_BLOCK input rows of each
        column — half a byte a weight where the storage packs 4-bit values (XLA on TPU);
        CPU buffers hold one uint4 per byte.

A quantised kernel is a `qwix.QArray` (qvalue + scale) in the kernel's place in the model
state; `models.transformer.Linear` dequantises it to the compute dtype at each use (the
QLoRA recipe: storage in 4 or 8 bits, matmuls in bfloat16 / float32). Only the decoder
blocks' projections are quantised; embeddings, the LM head and the norms stay as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

BASE_QUANTIZATIONS = ("none", "int8", "nf4")
NF4_BLOCK = 64  # input rows per nf4 scale (QLoRA's block size)


def is_quantized(x: Any) -> bool:
  """Whether `x` is a qwix QArray (without importing qwix for float models)."""
  return hasattr(x, "qvalue") and hasattr(x, "scale")


def dequantize(x: Any, dtype) -> jax.Array:
  """A kernel as a `dtype` array: dequantised if it is a QArray, else cast."""
  if not is_quantized(x):
    return x.astype(dtype)
  import qwix  # noqa: PLC0415  (only quantised models need it)
  if x.qtype != "nf4":
    return qwix.dequantize(x).astype(dtype)
  # nf4: the code -> level lookup as one gather in the kernel's own shape. qwix's own
  # dequantize flattens the kernel first, which on a mesh all-gathers every layer's whole
  # kernel at each decoded token (a 2-layer plan: 105 GB of gathers per step, int8 2.3 GB).
  from qwix._src.core import numerics, qarray  # noqa: PLC0415
  levels = jnp.take(numerics.get_nf4_buckets(), x.qvalue.astype(jnp.int32)).astype(x.scale.dtype)
  return qarray.call_with_generic_broadcast(jnp.multiply, levels, x.scale).astype(dtype)


def quantize_kernel(kernel: jax.Array, mode: str):
  """A [..., in, out] kernel (stacked layers first) as a qwix QArray (`mode` int8 or nf4).

  Scales are kept per layer and output column, and for nf4 also per block of NF4_BLOCK
  input rows (the whole input dimension where it is not a multiple of the block)."""
  import qwix  # noqa: PLC0415
  lead = tuple(range(kernel.ndim - 2))
  out_axis, in_axis = kernel.ndim - 1, kernel.ndim - 2
  kernel = kernel.astype(jnp.float32)
  if mode == "int8":
    return qwix.quantize(kernel, jnp.int8, channelwise_axes=(*lead, out_axis))
  if mode == "nf4":
    n_in = kernel.shape[in_axis]
    block = NF4_BLOCK if n_in % NF4_BLOCK == 0 else n_in
    return qwix.quantize(kernel, "nf4", channelwise_axes=(*lead, out_axis),
                         tiled_axes={in_axis: block})
  raise ValueError(f"base_quantization={mode!r}; allowed: {', '.join(BASE_QUANTIZATIONS)}")


def _is_block_kernel(path) -> bool:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return "blocks" in names and "kernel" in names


def quantize_base(base, mode: str):
  """The base model state with every decoder-block projection kernel quantised (`mode`
  int8 / nf4); "none" returns `base` unchanged."""
  if mode == "none":
    return base
  quantize = jax.jit(quantize_kernel, static_argnums=1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: quantize(x, mode) if _is_block_kernel(path) else x, base)


def stored_bytes(tree) -> int:
  """Bytes the arrays of `tree` take in storage that packs sub-byte types (TPU HBM):
  4-bit values count half a byte. (`.nbytes` of a CPU uint4 buffer counts one byte each.)"""
  total = 0
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.floating):
      bits = jnp.finfo(x.dtype).bits
    elif jnp.issubdtype(x.dtype, jnp.integer):
      bits = jnp.iinfo(x.dtype).bits
    else:
      bits = 8 * jnp.dtype(x.dtype).itemsize
    total += (x.size * bits + 7) // 8
  return total


__all__ = ["BASE_QUANTIZATIONS", "NF4_BLOCK", "is_quantized", "dequantize", "quantize_kernel",
           "quantize_base", "stored_bytes"]
