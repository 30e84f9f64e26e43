"""Attention kernels behind one function: the causal attention of full-sequence passes.

Every implementation computes the same thing: softmax attention of each query over the keys
at or before its own position whose `key_mask` is set (causal + key padding), grouped-query
(query heads that share a kv head are folded together), scores in float32. They differ in
what they keep in memory and which hardware runs them:

  * "xla": the scores of causal blocks of 128 queries against the keys before the block's
    end, materialised ([B, H, T, T] / 2 in all, saved for the backward pass). Fast on CPU
    for short sequences; quadratic memory.
  * "flash": blocked online softmax (FlashAttention-2) in plain JAX loops, with its own
    backward pass that recomputes each block's scores from the saved log-sum-exp: memory
    linear in T. Any platform; the CPU's choice from 512 positions.
  * "cudnn": `jax.nn.dot_product_attention` on cuDNN's fused flash attention (GPU,
    bfloat16/float16 compute).
  * "splash": Pallas splash attention (TPU), in a `shard_map` over the batch axes on a mesh.

`resolve` picks one per platform ("auto"); `ModelConfig.attention` holds the resolved name,
so nothing is read from the backend while tracing. Decoding (a query or a prefill against a
KV cache) always uses `attend`: it reads the cache where it lies.

Layouts (those of `models.transformer`): q [B, K, G, T, hd] (K kv heads, G query heads per
kv head), k [B, K, hd, S], v [B, K, S, hd]; outputs [B, K, G, T, hd].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from grpo_jax.models import sharding

IMPLEMENTATIONS = ("xla", "flash", "cudnn", "splash")
CHOICES = ("auto",) + IMPLEMENTATIONS
PLATFORM_OF = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}

ATTENTION_BLOCK = 128  # query positions per causal block ("xla")
# Query and key block of "flash". On CPU (benchmarks/attention_kernels.py, the `long`
# model's train pass, 2 rows) 256 ran 1.15x faster than 128 at 1056 positions, and 512
# pads short sequences too far (544 -> 1024).
FLASH_BLOCK = 256
# CPU: "auto" runs "xla" below this many positions (288: 0.43 s against flash's 0.52 s) and
# "flash" from it (544: 0.88 s against 0.92 s; 1056: 1.77 s against 2.14 s; 2080: 4.07 s
# against 5.56 s, with 0.9 GiB of temporaries instead of 2.1).
CPU_FLASH_FROM = 512
_MASKED = -1e30  # finite, so rows with no visible key give a uniform softmax, not NaN


def resolve(name: str, platform: str, compute_dtype: str) -> str:
  """The implementation `name` stands for on `platform` ("cpu", "gpu"/"cuda", "tpu").

  "auto": TPU splash; GPU cuDNN for 16-bit compute (cuDNN has no float32 kernel), flash
  otherwise; CPU stays "auto", decided per pass from its length (`for_length`). An
  explicit name is checked against the platform."""
  platform = "gpu" if platform == "cuda" else platform
  if name not in CHOICES:
    raise ValueError(f"attention={name!r}; allowed: {', '.join(CHOICES)}")
  if name == "auto":
    if platform == "tpu":
      return "splash"
    if platform == "gpu":
      return "cudnn" if compute_dtype in ("bfloat16", "float16") else "flash"
    return "auto"
  if name in PLATFORM_OF and platform not in PLATFORM_OF[name]:
    raise ValueError(f"attention={name!r} runs on {PLATFORM_OF[name][0].upper()} only, not "
                     f"{platform}; 'auto' picks the platform's kernel")
  if name == "cudnn" and compute_dtype == "float32":
    raise ValueError("attention='cudnn' needs dtype='bfloat16' (cuDNN has no float32 "
                     "kernel); 'flash' runs float32 on a GPU")
  return name


def for_length(seq_len: int) -> str:
  """CPU "auto": the materialised causal blocks below CPU_FLASH_FROM positions, flash from
  there (where the scores would dominate the pass's memory)."""
  return "flash" if seq_len >= CPU_FLASH_FROM else "xla"


def causal(q, k, v, key_mask, implementation: str, compute_dtype):
  """Causal attention of a full-sequence pass (queries at slots 0..T-1 of their own keys).

  key_mask: [B, T], nonzero where a key is a real token. `implementation`: a name from
  `resolve` ("auto": the CPU's choice for this pass's length, a static shape)."""
  if implementation == "auto":
    implementation = for_length(q.shape[3])
  key_mask = key_mask.astype(bool)
  if implementation == "xla":
    return _blocked(q, k, v, key_mask, compute_dtype)
  if implementation == "flash":
    return flash(q, k, v, key_mask, compute_dtype)
  if implementation == "cudnn":
    return _dot_product(q, k, v, key_mask, "cudnn")
  if implementation == "splash":
    return _splash(q, k, v, key_mask)
  raise ValueError(f"attention={implementation!r}; allowed: {', '.join(CHOICES)}")


# --- Materialised scores ("xla", and every decoding step) ---------------------------------


def attend(q, k, v, visible, compute_dtype):
  """Softmax attention of q [B, kv, groups, T, hd] over k [B, kv, hd, S], v [B, kv, S, hd].

  visible: [B, T, S]. Query heads that share a kv head are folded with the positions into
  one matmul dimension, so both matmuls are plain batched ones (also for T = 1 while
  decoding) and read the keys and values without transposing them.
  """
  b, n_kv, groups, t, hd = q.shape
  scores = jnp.einsum("bkmd,bkds->bkms", q.reshape(b, n_kv, groups * t, hd), k.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(hd)
  scores = scores.reshape(b, n_kv, groups, t, -1)
  scores = jnp.where(visible[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
  out = jnp.einsum("bkms,bksd->bkmd", probs.reshape(b, n_kv, groups * t, -1),
                   v.astype(probs.dtype))
  return out.reshape(b, n_kv, groups, t, hd)


def _causal_visible(key_mask, q_lo: int, q_len: int, k_len: int):
  """[B, q_len, k_len]: query q_lo + i sees key j when j <= q_lo + i and key j is real."""
  rows = q_lo + jnp.arange(q_len)[:, None]
  return (jnp.arange(k_len)[None, :] <= rows)[None] & key_mask[:, None, :k_len]


def _blocked(q, k, v, key_mask, compute_dtype):
  """Causal blocks: the queries of a block see no key past the block's end, so each block
  is scored against the keys before it only (static slices). That skips the masked upper
  triangle: half the attention FLOPs and memory traffic on long sequences (512-token
  completions: attention 2x faster forward, 1.5x backward on CPU)."""
  t = q.shape[3]
  if t <= ATTENTION_BLOCK:
    return attend(q, k, v, _causal_visible(key_mask, 0, t, t), compute_dtype)
  blocks = []
  for lo in range(0, t, ATTENTION_BLOCK):
    hi = min(lo + ATTENTION_BLOCK, t)
    blocks.append(attend(q[:, :, :, lo:hi], k[..., :hi], v[:, :, :hi],
                         _causal_visible(key_mask, lo, hi - lo, hi), compute_dtype))
  return jnp.concatenate(blocks, axis=3)


# --- Flash: blocked online softmax with a recomputing backward pass -----------------------


def flash(q, k, v, key_mask, compute_dtype, block: int | None = None):
  """FlashAttention-2 in plain JAX: query blocks (outer loop) against the key blocks at or
  before them (inner loop), a running max and sum per query; the backward pass walks key
  blocks (outer) and the query blocks at or after them (inner), recomputing each block's
  probabilities from the saved log-sum-exp. Memory: O(B H T hd), never a [T, T] block set.

  T is padded to a multiple of the block (padded keys are masked; padded queries dropped).
  """
  t = q.shape[3]
  block = min(block or FLASH_BLOCK, t)
  pad = -t % block
  if pad:
    q = jnp.pad(q, [(0, 0)] * 3 + [(0, pad), (0, 0)])
    k = jnp.pad(k, [(0, 0)] * 3 + [(0, pad)])
    v = jnp.pad(v, [(0, 0)] * 2 + [(0, pad), (0, 0)])
    key_mask = jnp.pad(key_mask, [(0, 0), (0, pad)])
  out = _flash(q, k, v, key_mask, block, jnp.dtype(compute_dtype))
  return out[:, :, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, key_mask, block, compute_dtype):
  return _flash_forward(q, k, v, key_mask, block, compute_dtype)[0]


def _block_scores(qi, kj, key_mask, i, j, block):
  """Scaled scores [B, K, G, bq, bk] of query block i against key block j, masked, and the
  visibility [B, 1, 1, bq, bk]."""
  hd = qi.shape[-1]
  s = jnp.einsum("bkgqd,bkds->bkgqs", qi, kj.astype(qi.dtype),
                 preferred_element_type=jnp.float32) / math.sqrt(hd)
  rows = i * block + jnp.arange(block)[:, None]
  cols = j * block + jnp.arange(block)[None, :]
  kmask = jax.lax.dynamic_slice_in_dim(key_mask, j * block, block, axis=1)
  visible = ((cols <= rows)[None] & kmask[:, None, :])[:, None, None]
  return jnp.where(visible, s, _MASKED), visible


def _slice(x, i, block, axis):
  return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _flash_forward(q, k, v, key_mask, block, compute_dtype):
  b, nk, g, t, hd = q.shape
  n = t // block

  def query_block(i, carry):
    out, lse = carry
    qi = _slice(q, i, block, 3)

    def key_block(j, state):
      m, l, acc = state
      s, _ = _block_scores(qi, _slice(k, j, block, 3), key_mask, i, j, block)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(compute_dtype),
                      _slice(v, j, block, 2).astype(compute_dtype),
                      preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((b, nk, g, block), -jnp.inf, jnp.float32),
            jnp.zeros((b, nk, g, block), jnp.float32),
            jnp.zeros((b, nk, g, block, hd), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    out = jax.lax.dynamic_update_slice_in_dim(
        out, (acc / l[..., None]).astype(out.dtype), i * block, axis=3)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * block, axis=3)
    return out, lse

  out, lse = jax.lax.fori_loop(
      0, n, query_block, (jnp.zeros(q.shape, compute_dtype), jnp.zeros((b, nk, g, t),
                                                                         jnp.float32)))
  return out, (q, k, v, key_mask, out, lse)


def _flash_backward(block, compute_dtype, residuals, d_out):
  q, k, v, key_mask, out, lse = residuals
  n = q.shape[3] // block
  # D_i = sum_d dO_i * O_i: the softmax Jacobian's row term, once per query.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_out = d_out.astype(compute_dtype)

  def key_block(j, carry):
    dq, dk, dv = carry
    kj, vj = _slice(k, j, block, 3), _slice(v, j, block, 2)

    def query_block(i, state):
      dq, dkj, dvj = state
      qi, doi = _slice(q, i, block, 3), _slice(d_out, i, block, 3)
      s, visible = _block_scores(qi, kj, key_mask, i, j, block)
      p = jnp.exp(s - _slice(lse, i, block, 3)[..., None])
      dvj = dvj + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(compute_dtype), doi,
                             preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj.astype(compute_dtype),
                      preferred_element_type=jnp.float32)
      ds = jnp.where(visible, p * (dp - _slice(delta, i, block, 3)[..., None]), 0.0)
      ds = (ds / math.sqrt(q.shape[-1])).astype(compute_dtype)
      dqi = jnp.einsum("bkgqs,bkds->bkgqd", ds, kj.astype(compute_dtype),
                       preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, block, 3) + dqi, i * block,
                                               axis=3)
      dkj = dkj + jnp.einsum("bkgqs,bkgqd->bkds", ds, qi.astype(compute_dtype),
                             preferred_element_type=jnp.float32)
      return dq, dkj, dvj

    dq, dkj, dvj = jax.lax.fori_loop(
        j, n, query_block, (dq, jnp.zeros(kj.shape, jnp.float32),
                            jnp.zeros(vj.shape, jnp.float32)))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dkj, j * block, axis=3)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dvj, j * block, axis=2)
    return dq, dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, n, key_block, (zeros(q), zeros(k), zeros(v)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_forward, _flash_backward)


# --- Library kernels: cuDNN (GPU) and splash (TPU) -----------------------------------------


def _dot_product(q, k, v, key_mask, implementation: str):
  """`jax.nn.dot_product_attention` ([B, T, N, hd] layouts; query head n = kv * G + g uses
  kv head n // G, as here); key padding as a boolean mask, causality as `is_causal`. The
  mask is [B, T, S] bytes per layer (not per head): 36 MB for 16 rows of 1056 positions."""
  b, nk, g, t, hd = q.shape
  query = q.transpose(0, 3, 1, 2, 4).reshape(b, t, nk * g, hd)
  key = k.transpose(0, 3, 1, 2).astype(q.dtype)  # [B, S, K, hd]
  value = v.swapaxes(1, 2).astype(q.dtype)
  # cuDNN takes a mask as an additive bias whose last two dims must be [T, S] (it refuses a
  # broadcast [1, S]): the key padding is spelled out per query, [B, 1, T, S].
  mask = jnp.broadcast_to(key_mask[:, None, None, :], (b, 1, t, t))
  out = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=True,
                                     implementation=implementation)
  return out.reshape(b, t, nk, g, hd).transpose(0, 2, 3, 1, 4)


SPLASH_BLOCK = 128  # splash's block sizes: T is padded to a multiple of them


def _splash(q, k, v, key_mask):
  """Pallas splash attention: one kernel per row (vmap), query heads [N, T, hd] over kv heads
  [K, T, hd] (grouped-query natively), causal mask, key padding as segment ids (real tokens
  1, padding 0: a padded query sees only padding, never a real row's keys). On a mesh the
  kernel runs in a `shard_map` over the batch axes (Mosaic kernels are not partitioned
  automatically)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, nk, g, t, hd = q.shape
  pad = -t % SPLASH_BLOCK
  query = (q / math.sqrt(hd)).reshape(b, nk * g, t, hd)
  key = k.swapaxes(2, 3).astype(q.dtype)  # [B, K, T, hd]
  value = v.astype(q.dtype)
  segments = key_mask.astype(jnp.int32)
  if pad:
    query = jnp.pad(query, [(0, 0), (0, 0), (0, pad), (0, 0)])
    key = jnp.pad(key, [(0, 0), (0, 0), (0, pad), (0, 0)])
    value = jnp.pad(value, [(0, 0), (0, 0), (0, pad), (0, 0)])
    segments = jnp.pad(segments, [(0, 0), (0, pad)])
  length = t + pad
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * (nk * g))
  kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                  block_sizes=splash.BlockSizes.get_default())

  def rows(query, key, value, segments):
    ids = splash.SegmentIds(q=segments, kv=segments)
    return jax.vmap(lambda qq, kk, vv, s: kernel(qq, kk, vv, segment_ids=s))(
        query, key, value, ids)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    spec = jax.sharding.PartitionSpec(sharding.fit_axes(sharding.BATCH_AXES, b, mesh))
    rows = jax.shard_map(rows, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=spec,
                         check_vma=False)
  out = rows(query, key, value, segments)[:, :, :t]
  return out.reshape(b, nk, g, t, hd).astype(q.dtype)
