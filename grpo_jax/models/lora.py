"""LoRA: low-rank adapters on a frozen base, with PEFT's names and formula.

Each targeted projection y = x W (+ b) becomes

    y = x W (+ b) + (alpha / rank) * dropout(x) A B

A [in, rank] starts uniform in +-1/sqrt(in) (PEFT's kaiming-uniform with a = sqrt(5)) and
B [rank, out] at zero, so at step 0 the adapted model is the base model exactly. The
adapters are `nnx.LoRAParam` variables named `lora_a` / `lora_b` next to the projection's
`kernel` (stacked over layers like every block parameter), so one model state splits by
variable type into

  * the adapters: the only trainable parameters (the optimizer state covers them alone);
  * the base: every other parameter, frozen, possibly in bfloat16 or quantised
    (`models.quantize`). The base is also the reference: the same network with the
    adapters switched off (`reference_def`, the model without them), so no second copy
    exists.

Everything here is pure: states in, states out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models.lora_config import (ALL_LINEAR, BASE_DTYPES, PROJECTIONS, LoraConfig,
                                          from_config, target_modules)
from grpo_jax.models.quantize import dequantize, is_quantized, quantize_base
from grpo_jax.models.transformer import Transformer

def split(state: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(adapters, base) of a LoRA model's state."""
  adapters, base = nnx.split_state(state, nnx.LoRAParam, ...)
  return adapters, base


def policy_params(base: nnx.State, adapters: nnx.State) -> nnx.State:
  """The adapted model's whole state (for `nnx.merge` with the LoRA graphdef): a pytree
  union of the two, no array is copied."""
  return nnx.merge_state(base, adapters)


def init_adapters(abstract_adapters: nnx.State, key: jax.Array) -> nnx.State:
  """Fresh adapters shaped like `abstract_adapters` (e.g. from `nnx.eval_shape`): every
  `lora_a` [..., in, r] uniform in +-1/sqrt(in) (PEFT's kaiming_uniform(a=sqrt(5))), every
  `lora_b` zero. Each leaf draws from its own key (fold_in of its index)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_adapters)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if _leaf_name(path) == "lora_a":
      bound = 1.0 / jnp.sqrt(leaf.shape[-2])
      out.append(jax.random.uniform(jax.random.fold_in(key, i), leaf.shape, jnp.float32,
                                    -bound, bound))
    else:
      out.append(jnp.zeros(leaf.shape, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def adapted_model(cfg, adapters: LoraConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef of the model `cfg` with `adapters`, abstract adapter state): shapes only,
  nothing is allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: Transformer(cfg.replace(lora=adapters), nnx.Rngs(0))))
  return graphdef, split(state)[0]


def prepare_base(base: nnx.State, base_dtype: str, quantization: str) -> nnx.State:
  """The frozen base as the run stores it: floating leaves in `base_dtype`, and with
  `quantization` int8 / nf4 the block projections quantised (from the float32 values)."""
  dtype = jnp.dtype(base_dtype)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  quantized = quantize_base(base, quantization)
  return jax.tree.map(lambda x: x if is_quantized(x) else cast(x), quantized,
                      is_leaf=is_quantized)


def weights_digest(state: nnx.State, samples: int = 4096) -> str:
  """A short fingerprint of a model's weights (the base a LoRA checkpoint's adapters were
  trained on): SHA-256 over each parameter's path, shape, dtype, sum and a strided
  sample of `samples` values, so it costs one pass over the weights, not a host copy."""
  import hashlib  # noqa: PLC0415
  digest = hashlib.sha256()
  for path, var in sorted(nnx.to_flat_state(state), key=lambda item: str(item[0])):
    x = jnp.asarray(var.value)
    flat = x.reshape(-1)
    picked = flat[::max(1, flat.size // samples)].astype(jnp.float32)
    digest.update(repr((tuple(str(k) for k in path), x.shape, str(x.dtype))).encode())
    digest.update(jax.device_get(jnp.sum(flat.astype(jnp.float32))).tobytes())
    digest.update(jax.device_get(picked).tobytes())
  return digest.hexdigest()[:16]


def num_params(state) -> int:
  """Parameters in a state (a QArray counts its weights, not its scales)."""
  return sum(x.qvalue.size if is_quantized(x) else x.size
             for x in jax.tree.leaves(state, is_leaf=is_quantized))


def _leaf_name(path) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return [n for n in names if n != "value"][-1]


def merged_kernels(base: nnx.State, adapters: nnx.State, cfg: LoraConfig,
                   dtype=jnp.float32) -> nnx.State:
  """The base state with each adapted kernel replaced by W + (alpha / r) A B, in `dtype`
  (quantised kernels dequantised first): a plain model's state, for the base model's
  graphdef (a merged export, or sampling from merged weights)."""
  flat_base = nnx.to_flat_state(base)
  flat_adapters = dict(nnx.to_flat_state(adapters))
  merged = []
  for path, var in flat_base:
    a = flat_adapters.get(path[:-1] + ("lora_a",))
    if path[-1] == "kernel" and a is not None:
      b = flat_adapters[path[:-1] + ("lora_b",)]
      delta = jnp.einsum("...ir,...ro->...io", a.value, b.value) * cfg.scale
      var = var.replace((dequantize(var.value, jnp.float32) + delta).astype(dtype))
    elif path[-1] == "kernel":
      var = var.replace(dequantize(var.value, dtype))
    merged.append((path, var))
  return nnx.from_flat_state(merged)


# The settings (the first six) live in `models.lora_config`; LoRA's public face is here.
__all__ = ["PROJECTIONS", "ALL_LINEAR", "BASE_DTYPES", "LoraConfig", "target_modules",
           "from_config", "split", "policy_params", "init_adapters", "merged_kernels",
           "adapted_model", "prepare_base", "weights_digest", "num_params"]
