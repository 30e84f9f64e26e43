"""Per-token log-probs and entropies, fused and chunked over the vocabulary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax import sampling
from grpo_jax.models import sharding
from grpo_jax.models.transformer import positions_from_mask

# float32 logits of one chunk when logprob_chunk_size = 0. The update's scratch memory grows
# by ~4x this (150k vocabulary: 538 MiB at 16 MiB, 730 MiB at 64 MiB, for a 5% slower
# update).
LOGITS_CHUNK_BYTES = 16 * 2**20


def vocab_chunk_size(chunk_size: int, tokens: int, vocab_size: int) -> int:
  """Vocabulary entries per chunk: `chunk_size`, or for 0 as many as keep one chunk's
  [tokens, chunk] float32 logits within LOGITS_CHUNK_BYTES (at least 128)."""
  size = chunk_size or max(128, LOGITS_CHUNK_BYTES // (4 * max(tokens, 1)))
  return min(size, vocab_size)


def _vocab_chunks(vocab_size: int, chunk: int):
  """(number of chunks, start of chunk c, mask of the entries chunk c owns).

  The last chunk is moved back to end at V (its start is clamped) rather than padded:
  padding would copy the whole [V, D] head. The entries it shares with the chunk before
  are owned by that chunk, and masked out of this one.
  """
  count = -(-vocab_size // chunk)
  start = lambda c: jnp.minimum(c * chunk, vocab_size - chunk)
  owned = lambda c: start(c) + jnp.arange(chunk) >= c * chunk
  return count, start, owned


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_logprobs(hidden, head, targets, temperature, chunk):
  """(log-prob of each target, entropy) under softmax(hidden @ head.T / temperature).

  hidden [M, D], head [V, D], targets [M] -> ([M], [M]) float32, in one pass over the
  vocabulary `chunk` entries at a time with an online log-sum-exp: [M, V] logits never
  exist. The backward pass (below) recomputes each chunk's logits once and writes that
  chunk's rows of the head gradient in place.
  """
  return _fused_forward(hidden, head, targets, temperature, chunk)[0]


def _chunk_logits(hidden, head, targets, c, temperature, chunk):
  """Chunk c's (logits [M, chunk], head rows, start, owned [chunk], target hits [M, chunk]);
  a hit is an owned entry that is the row's target."""
  _, start, owned = _vocab_chunks(head.shape[0], chunk)
  start, owned = start(c), owned(c)
  w = jax.lax.dynamic_slice_in_dim(head, start, chunk, axis=0)
  logits = jnp.einsum("md,vd->mv", hidden, w.astype(hidden.dtype),
                      preferred_element_type=jnp.float32) / temperature
  hit = ((start + jnp.arange(chunk))[None] == targets[:, None]) & owned[None]
  return logits, w, start, owned, hit


def _fused_forward(hidden, head, targets, temperature, chunk):
  count = _vocab_chunks(head.shape[0], chunk)[0]
  m = hidden.shape[0]

  def body(c, carry):
    top, total, weighted, picked = carry  # running max, sum exp, sum exp * logit, target logit
    logits, _, _, owned, hit = _chunk_logits(hidden, head, targets, c, temperature, chunk)
    logits = jnp.where(owned[None], logits, -jnp.inf)
    new_top = jnp.maximum(top, logits.max(-1))
    scale = jnp.exp(top - new_top)
    e = jnp.exp(logits - new_top[:, None])  # 0 where not owned
    total = total * scale + e.sum(-1)
    weighted = weighted * scale + jnp.sum(e * jnp.where(owned[None], logits, 0.0), -1)
    picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), -1)
    return new_top, total, weighted, picked

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m,), jnp.float32),
          jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32))
  top, total, weighted, picked = jax.lax.fori_loop(0, count, body, init)
  log_z = top + jnp.log(total)
  mean_logit = weighted / total  # sum p * logit
  return (picked - log_z, log_z - mean_logit), (log_z, mean_logit)


def _fused_fwd(hidden, head, targets, temperature, chunk):
  out, (log_z, mean_logit) = _fused_forward(hidden, head, targets, temperature, chunk)
  return out, (hidden, head, targets, log_z, mean_logit)


def _fused_bwd(temperature, chunk, residuals, cotangents):
  hidden, head, targets, log_z, mean_logit = residuals
  g_logp, g_entropy = cotangents
  count = _vocab_chunks(head.shape[0], chunk)[0]

  def body(c, carry):
    d_hidden, d_head = carry
    logits, w, start, owned, hit = _chunk_logits(hidden, head, targets, c, temperature, chunk)
    probs = jnp.where(owned[None], jnp.exp(logits - log_z[:, None]), 0.0)
    # d logp / d logit_j = 1[j = target] - p_j;  d entropy / d logit_j = -p_j (logit_j - mean)
    d_logits = (g_logp[:, None] * (hit - probs)
                - g_entropy[:, None] * probs * (logits - mean_logit[:, None])) / temperature
    d_logits = jnp.where(owned[None], d_logits, 0.0).astype(hidden.dtype)
    d_hidden = d_hidden + jnp.einsum("mv,vd->md", d_logits, w.astype(hidden.dtype),
                                     preferred_element_type=jnp.float32)
    d_w = jnp.einsum("mv,md->vd", d_logits, hidden, preferred_element_type=jnp.float32)
    # Rows this chunk does not own keep what the chunk before wrote there.
    d_w = jnp.where(owned[:, None], d_w,
                    jax.lax.dynamic_slice_in_dim(d_head, start, chunk, axis=0))
    # On a mesh the chunk's gradient is summed over the batch shards straight into the
    # head's layout (a reduce-scatter), and the [V, D] gradient is never held whole.
    d_w = sharding.constrain(d_w.astype(d_head.dtype), None, "fsdp")
    return sharding.rows(d_hidden), head_layout(
        jax.lax.dynamic_update_slice_in_dim(d_head, d_w, start, axis=0))

  head_layout = lambda x: sharding.constrain(x, "tensor", "fsdp")
  init = (sharding.rows(jnp.zeros(hidden.shape, jnp.float32)),
          head_layout(jnp.zeros(head.shape, head.dtype)))
  d_hidden, d_head = jax.lax.fori_loop(0, count, body, init)
  return d_hidden.astype(hidden.dtype), d_head, None


_fused_logprobs.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array,
                   temperature: float, chunk_size: int, token_shards: int = 1
                   ) -> tuple[jax.Array, jax.Array]:
  """Log-probs of `targets` and entropies under softmax(hidden @ head.T / temperature).

  hidden: [N, T, D], head_weight: [V, D], targets: [N, T] -> ([N, T], [N, T]) float32.
  Fused and chunked over the vocabulary (`_fused_logprobs`): the [N, T, V] logits never
  exist, each chunk's logits are computed once forward and once backward, and the head's
  gradient is written once, chunk by chunk (no [V, D] temporary per chunk).
  `chunk_size`: vocabulary entries per chunk; 0 sizes it from one device's share of the
  tokens (`vocab_chunk_size`; the rows are split `token_shards` ways).
  """
  n, t, d = hidden.shape
  # Token rows [N * T, D], not [N, T, D]: the matmuls and their gradients need no transposes.
  chunk = vocab_chunk_size(chunk_size, n * t // token_shards, head_weight.shape[0])
  logp, entropy = _fused_logprobs(sharding.rows(hidden.reshape(n * t, d)), head_weight,
                                  sharding.rows(targets.reshape(n * t).astype(jnp.int32)),
                                  temperature, chunk)
  return logp.reshape(n, t), entropy.reshape(n, t)


def completion_logprobs(model_def: nnx.GraphDef, params: nnx.State, rollout: sampling.Rollout,
                        temperature: float, chunk_size: int, token_shards: int = 1,
                        dropout_key: jax.Array | None = None, remat: bool = False
                        ) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs and entropies [N, L] of the completion tokens under `params`
  (`dropout_key`: the train pass's LoRA dropout; None: none; `remat`: the train pass
  recomputes each layer in its backward pass)."""
  model = nnx.merge(model_def, params)
  ids = jnp.concatenate([rollout.prompt_ids, rollout.completion_ids], axis=1)
  mask = jnp.concatenate([rollout.prompt_mask, rollout.completion_mask], axis=1)
  hidden, _ = model.hidden_states(ids, positions_from_mask(mask), mask,
                                  dropout_key=dropout_key, remat=remat)
  prompt_len, length = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
  # The hidden state at position p predicts token p + 1: keep only those that predict completions.
  hidden = hidden[:, prompt_len - 1:prompt_len - 1 + length]
  return token_logprobs(hidden, model.head_weight, rollout.completion_ids, temperature,
                        chunk_size, token_shards)
