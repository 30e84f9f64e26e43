"""A decoder-only transformer with the Llama / Qwen2 / Qwen3 block, in Flax NNX.

Readable top to bottom: RMSNorm -> rotary embeddings -> grouped-query attention
(optional q/k/v bias, optional q/k RMSNorm) -> SwiGLU MLP. Every layer's parameters are
stacked on a leading axis; full-sequence passes run the layers unrolled or under one
`lax.scan` (`scan_layers`), decoding always unrolled.

One module serves both uses:
  * training: the whole sequence at once, causal + key-padding mask;
  * decoding: a KV cache of fixed length; tokens are written at `cache_index`
    and attend to every valid cache slot at or before their own.

Parameters follow the Hugging Face layout (kernels are [in, out]) so that
loading a checkpoint is a transpose and a rename, nothing more.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models import attention, sharding
from grpo_jax.models.lora_config import LoraConfig
from grpo_jax.models.quantize import dequantize, is_quantized

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
Cache = tuple  # per layer {"k": [B, kv_heads, hd, S], "v": [B, kv_heads, S, hd]}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama / Qwen2 / Qwen3 style decoder."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None  # defaults to hidden_size // num_heads
  rope_theta: float = 10000.0
  # Llama 3 rope scaling: a tuple of (key, value) pairs so the config stays hashable.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2 / Qwen2.5
  qk_norm: bool = False  # Qwen3
  max_position_embeddings: int = 32768
  # LoRA adapters on the projections (`models.lora`); None: a plain model. A model built
  # without them reads the same base state (the LoRA run's reference).
  lora: LoraConfig | None = None
  dtype: str = "float32"  # compute dtype of activations; params stay float32
  # Full-sequence passes: one `lax.scan` over the stacked layers (one compiled block: the
  # shortest compile for deep models) or the layers unrolled (default: on CPU the train
  # step ran ~10% faster, for ~2x the compile time of the train step).
  scan_layers: bool = False
  # Full-sequence attention kernel (`models.attention`): "auto" (the CPU's per-length choice)
  # or a name `attention.resolve` gave for the platform: "xla", "flash", "cudnn", "splash".
  attention: str = "auto"

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}; allowed: {sorted(_DTYPES)}")
    if self.attention not in attention.CHOICES:
      raise ValueError(f"ModelConfig.attention={self.attention!r}; allowed: "
                       f"{', '.join(attention.CHOICES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv if self.qkv_bias else 0)
    attn += 2 * hd if self.qk_norm else 0
    block = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * block + d


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
  hd = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  scaling = dict(config.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind in (None, "default"):
    return inv_freq
  if kind != "llama3":
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: 'llama3'")
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  low_wavelen, high_wavelen = old_len / low, old_len / high
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' convention. x: [B, T, H, hd], positions: [B, T]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight.value.astype(self.dtype) * normed.astype(self.dtype)


def fold_key(key: jax.Array | None, i: int) -> jax.Array | None:
  """A sub-key for part i of a pass (dropout), or None where the pass has no key."""
  return None if key is None else jax.random.fold_in(key, i)


class Linear(nnx.Linear):
  """nnx.Linear (same parameters, same numbers), plus what LoRA brings: a frozen kernel
  that may be a quantised qwix QArray (dequantised at each use), and low-rank adapters
  `lora_a` [in, r], `lora_b` [r, out] on targeted projections (`models.lora`)."""

  def __init__(self, cfg: ModelConfig, name: str, n_in: int, n_out: int, bias: bool,
               rngs: nnx.Rngs):
    super().__init__(n_in, n_out, use_bias=bias, dtype=cfg.compute_dtype,
                     param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(0.02),
                     rngs=rngs)
    self.adapter = cfg.lora if cfg.lora and name in cfg.lora.targets else None
    if self.adapter:
      bound = 1.0 / math.sqrt(n_in)  # PEFT: kaiming_uniform(a=sqrt(5)) for A, zeros for B
      self.lora_a = nnx.LoRAParam(jax.random.uniform(
          rngs.params(), (n_in, self.adapter.rank), jnp.float32, -bound, bound))
      self.lora_b = nnx.LoRAParam(jnp.zeros((self.adapter.rank, n_out), jnp.float32))

  def __call__(self, x, dropout_key: jax.Array | None = None):
    kernel = self.kernel.value
    if self.adapter is None and not is_quantized(kernel):
      return super().__call__(x)
    x = x.astype(self.dtype)
    y = jax.lax.dot_general(x, dequantize(kernel, self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      y = y + self.bias.value.astype(self.dtype)
    if self.adapter is None:
      return y
    h, rate = x, self.adapter.dropout
    if rate > 0 and dropout_key is not None:  # the train pass only: sampling has no key
      keep = jax.random.bernoulli(dropout_key, 1.0 - rate, h.shape)
      h = jnp.where(keep, h / (1.0 - rate), 0).astype(self.dtype)
    low = h @ self.lora_a.value.astype(self.dtype)
    return y + (low @ self.lora_b.value.astype(self.dtype)) * jnp.asarray(
        self.adapter.scale, self.dtype)


def _linear(cfg: ModelConfig, name: str, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs):
  return Linear(cfg, name, n_in, n_out, bias, rngs)


def _write_cache(cache, k, v, start):
  """The cache with keys k [B, kv, hd, T] / values v [B, kv, T, hd] written from slot `start`:
  one slot for all rows (a scalar), or each row's own ([B]: multi-turn rows)."""
  k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
  if jnp.ndim(start) == 0:
    return {"k": jax.lax.dynamic_update_slice(cache["k"], k, (0, 0, 0, start)),
            "v": jax.lax.dynamic_update_slice(cache["v"], v, (0, 0, start, 0))}
  row_k = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, 0, s)))
  row_v = jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, s, 0)))
  return {"k": row_k(cache["k"], k, start), "v": row_v(cache["v"], v, start)}


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    hd = cfg.head_dim
    self.q_proj = _linear(cfg, "q_proj", cfg.hidden_size, cfg.num_heads * hd, cfg.qkv_bias, rngs)
    self.k_proj = _linear(cfg, "k_proj", cfg.hidden_size, cfg.num_kv_heads * hd, cfg.qkv_bias, rngs)
    self.v_proj = _linear(cfg, "v_proj", cfg.hidden_size, cfg.num_kv_heads * hd, cfg.qkv_bias, rngs)
    self.o_proj = _linear(cfg, "o_proj", cfg.num_heads * hd, cfg.hidden_size, False, rngs)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.compute_dtype)
      self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.compute_dtype)
    self.cfg = cfg

  def __call__(self, x, positions, inv_freq, key_mask, query_slots, cache, dropout_key=None):
    cfg = self.cfg
    b, t = positions.shape  # x: [B * T, D]
    hd, n_kv = cfg.head_dim, cfg.num_kv_heads
    q = self.q_proj(x, fold_key(dropout_key, 0)).reshape(b, t, cfg.num_heads, hd)
    k = self.k_proj(x, fold_key(dropout_key, 1)).reshape(b, t, n_kv, hd)
    v = self.v_proj(x, fold_key(dropout_key, 2)).reshape(b, t, n_kv, hd)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    # Keys are laid out [B, kv_heads, hd, S] and values [B, kv_heads, S, hd], the layouts
    # the cache is kept in: both attention matmuls then read the cache where it lies, in
    # the order they need it (3x faster per decoded token than [B, S, kv_heads, hd]).
    k, v = k.transpose(0, 2, 3, 1), v.swapaxes(1, 2)
    if cache is not None:  # write this step's keys/values, then attend over the whole cache
      cache = sharding.kv_cache(_write_cache(cache, k, v, query_slots[..., 0]))
      k, v = cache["k"], cache["v"]
    groups = cfg.num_heads // n_kv
    q = q.reshape(b, t, n_kv, groups, hd).transpose(0, 2, 3, 1, 4)  # [B, kv, groups, T, hd]
    if cache is None:  # a full-sequence pass: causal over its own keys (models.attention)
      out = attention.causal(q, k, v, key_mask, cfg.attention, cfg.compute_dtype)
    else:
      # query_slots: [T] (every row at the same slots) or [B, T] (multi-turn rows, each at
      # its own); a query sees the valid cache slots at or before its own.
      row_slots = query_slots if query_slots.ndim == 2 else query_slots[None]
      key_slots = jnp.arange(v.shape[2])
      visible = ((key_slots[None, None, :] <= row_slots[..., None])
                 & key_mask[:, None, :].astype(bool))
      out = attention.attend(q, k, v, visible, cfg.compute_dtype)
    out = out.transpose(0, 3, 1, 2, 4)  # [B, T, kv, groups, hd]
    return self.o_proj(out.reshape(b * t, cfg.num_heads * hd), fold_key(dropout_key, 3)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, "gate_proj", cfg.hidden_size, cfg.intermediate_size, False, rngs)
    self.up_proj = _linear(cfg, "up_proj", cfg.hidden_size, cfg.intermediate_size, False, rngs)
    self.down_proj = _linear(cfg, "down_proj", cfg.intermediate_size, cfg.hidden_size, False, rngs)

  def __call__(self, x, dropout_key=None):
    gate = self.gate_proj(x, fold_key(dropout_key, 0))
    return self.down_proj(jax.nn.silu(gate) * self.up_proj(x, fold_key(dropout_key, 1)),
                          fold_key(dropout_key, 2))


MLP_CHUNK_BYTES = 32 * 2**20  # one [tokens, intermediate] activation per chunk, per device


def mlp_chunks(tokens_per_row: int, rows_per_device: int, intermediate: int, itemsize: int
               ) -> int:
  """Chunks a full-sequence MLP runs in: the fewest that divide the sequence length and
  keep one [tokens, intermediate] activation of a device within MLP_CHUNK_BYTES.

  The MLP's backward pass holds about ten such activations (gate, up, their product and
  gradients, and the collective matmuls' buffers): on a TPU chip with 10k tokens of
  Qwen2.5-0.5B, 0.9 GiB of the update's 2.4 GiB of temporaries. Chunks cut that to the
  chunk's share; on CPU micro-batches already keep them small (one chunk).
  """
  need = rows_per_device * tokens_per_row * intermediate * itemsize / MLP_CHUNK_BYTES
  return next(k for k in range(1, tokens_per_row + 1)
              if tokens_per_row % k == 0 and k >= need) if need > 1 else 1


def _in_row_chunks(fn, x, chunks: int, axes, remat: bool):
  """fn(rows, j) over [N, D] rows, `chunks` at a time (lax.map); chunk j holds rows j, j + chunks,
  ...: with N = rows * tokens and `chunks` dividing tokens, each chunk is spread evenly
  over the devices the rows are split over. With `remat` each chunk is recomputed in the
  backward pass rather than saving its activations (one more MLP forward pass: on a TPU
  chip with Qwen2.5-0.5B, 0.2 GiB less in the update)."""
  n, d = x.shape
  xs = sharding.constrain(x.reshape(n // chunks, chunks, d).swapaxes(0, 1), None, axes, None)
  one = lambda part_and_index: fn(sharding.rows(part_and_index[0], axes), part_and_index[1])
  out = jax.lax.map(jax.checkpoint(one) if remat else one, (xs, jnp.arange(chunks)))
  return out.swapaxes(0, 1).reshape(n, -1)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, inv_freq, key_mask, query_slots, cache, dropout_key=None,
               remat: bool = False):
    """`dropout_key`: LoRA dropout's key in a train pass (None: no dropout); `remat`: the
    MLP's row chunks are recomputed in the backward pass (see `_in_row_chunks`)."""
    # The projections see [B * T, D] rows: with 3-D activations XLA transposes the
    # [B, T, F] gradients before each weight-gradient matmul (the MLP's backward pass ran
    # 1.4x slower on CPU).
    # On a mesh the token rows are pinned at the block's boundaries (`sharding`): split
    # over the batch axes in full-sequence passes, over 'data' only while decoding.
    axes = sharding.BATCH_AXES if cache is None else sharding.DECODE_AXES
    shape = x.shape
    x = sharding.rows(x.reshape(-1, shape[-1]), axes)
    attn, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, key_mask,
                                 query_slots, cache, fold_key(dropout_key, 0))
    x = sharding.rows(x + attn, axes)
    mlp_key = fold_key(dropout_key, 1)
    mlp = lambda h, chunk=0: self.mlp(self.post_attention_layernorm(h), fold_key(mlp_key, chunk))
    chunks = 1 if cache is not None else mlp_chunks(
        shape[1], sharding.rows_per_device(shape[0], axes), self.mlp.up_proj.out_features,
        jnp.dtype(x.dtype).itemsize)
    x = sharding.rows(
        x + (mlp(x) if chunks == 1 else _in_row_chunks(mlp, x, chunks, axes, remat)), axes)
    return x.reshape(shape), cache


class Transformer(nnx.Module):
  """Decoder-only LM. `blocks` holds every layer's parameters stacked on axis 0."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size)))
    layers = [nnx.split(Block(cfg, rngs)) for _ in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in layers])
    self.blocks = nnx.merge(layers[0][0], stacked)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compute_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size)))

  @property
  def head_weight(self) -> jax.Array:
    """[V, D] output projection (the embedding itself when tied)."""
    return (self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head).value

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> Cache:
    """Per layer: keys [B, kv_heads, head_dim, max_length], values [B, kv_heads, max_length,
    head_dim]."""
    cfg = self.cfg
    kv, hd = cfg.num_kv_heads, cfg.head_dim
    dtype = dtype or cfg.compute_dtype
    return tuple({"k": jnp.zeros((batch_size, kv, hd, max_length), dtype),
                  "v": jnp.zeros((batch_size, kv, max_length, hd), dtype)}
                 for _ in range(cfg.num_layers))

  def layer_params(self) -> tuple[nnx.State, ...]:
    """Each layer's parameters on their own (sliced out of the stacked `blocks`)."""
    _, stacked = nnx.split(self.blocks)
    return tuple(jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(self.cfg.num_layers))

  def hidden_states(self, input_ids, positions, key_mask, cache: Cache | None = None,
                    cache_index=0, layer_params: tuple[nnx.State, ...] | None = None,
                    dropout_key: jax.Array | None = None, remat: bool = False):
    """Final-norm hidden states [B, T, D] (and the updated cache, or None).

    key_mask: [B, S] validity of every key slot: S = T without a cache, the cache length
    with one. Input token t sits at slot `cache_index + t`; `cache_index` is one slot for
    all rows or [B], each row's own.

    Without a cache the layers run unrolled, or under one `lax.scan` with
    `cfg.scan_layers`. With one they are always unrolled: each layer then reads its
    weights and writes its own cache buffers in place, where a scan would copy the layer's
    weights and cache slice out of the stacked arrays at every decoded token. A decode loop
    should slice the weights once, before the loop, with `layer_params()` and pass them in.

    `dropout_key`: a train pass's key for LoRA dropout (full-sequence passes only; None,
    the default, is every other pass: sampling, old and reference log-probs).
    `remat`: a train pass that recomputes each layer in its backward pass instead of
    saving its activations (only the layer inputs are kept: one more forward pass, for a
    fraction of the memory; chosen by the memory plan, `grpo_jax.memory`).
    """
    cfg = self.cfg
    x = jnp.take(self.embed_tokens.value, input_ids, axis=0).astype(cfg.compute_dtype)
    x = sharding.rows(x, sharding.BATCH_AXES if cache is None else sharding.DECODE_AXES)
    # cache_index: a slot for every row, or [B] (each row's own: multi-turn continuation)
    query_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(input_ids.shape[1])
    inv_freq = rope_inverse_frequencies(cfg)
    block_def, block_params = nnx.split(self.blocks)

    if cache is None:
      def layer(x, params_and_key):
        params, key = params_and_key
        block = nnx.merge(block_def, params)
        return block(x, positions, inv_freq, key_mask, query_slots, None, key, remat)[0], None

      if remat:
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
      keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
      x, _ = jax.lax.scan(layer, x, (block_params, keys), unroll=1 if cfg.scan_layers else True)
      return self.norm(x), None

    new_cache = []
    for params, layer_cache in zip(layer_params or self.layer_params(), cache):
      block = nnx.merge(block_def, params)
      x, layer_cache = block(x, positions, inv_freq, key_mask, query_slots, layer_cache)
      new_cache.append(layer_cache)
    return self.norm(x), tuple(new_cache)

  def logits(self, hidden: jax.Array, head: jax.Array | None = None) -> jax.Array:
    """[..., V] float32 logits; `head` overrides `head_weight` (e.g. a copy laid out for
    decoding)."""
    head = self.head_weight if head is None else head
    return jnp.einsum("...d,vd->...v", hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, input_ids, attention_mask=None, positions=None):
    """Full-sequence logits [B, T, V] (float32) for a (left- or right-) padded batch."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    hidden, _ = self.hidden_states(input_ids, positions, attention_mask)
    return self.logits(hidden)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids that skip padding: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
