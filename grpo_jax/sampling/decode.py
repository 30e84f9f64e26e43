"""Single-turn sampling of G completions per prompt: one prefill, then a KV-cached decode loop.

Pure: arrays in, arrays out. The whole decode runs inside one `lax.while_loop`, which
stops early once every row has emitted EOS. Each prompt is prefilled once and its KV
cache is shared by its G samples.

Random keys are derived per completion row (`fold_in(rng, global_row)`) and per step, so
the samples depend only on the key and the row's global index, not on how the batch is
split across devices.

Log-probs of the sampled tokens are those of `softmax(logits / temperature)` over the
whole vocabulary (top-k / top-p only choose which tokens may be drawn), so they describe
the same distribution the train step scores.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.errors import ConfigError
from grpo_jax.models import sharding
from grpo_jax.models.transformer import positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_completion_length: int
  eos_token_ids: tuple[int, ...]
  pad_token_id: int = 0
  num_generations: int = 1
  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1.0: no nucleus filter
  greedy: bool = False  # argmax decoding (evaluation); log-probs then use temperature 1
  # Multi-turn decoding also pauses a row at these (a tool-call closer, e.g. `</tool_call>`).
  stop_token_ids: tuple[int, ...] = ()
  # Single-turn decoding runs the prompts of a device in this many chunks, one after the
  # other, each with a KV cache for its own rows only (chosen by the memory plan when a
  # cache for every row does not fit). Rows draw the same keys whatever the chunks.
  row_chunks: int = 1

  def __post_init__(self):
    if self.max_completion_length < 1:
      raise ConfigError(f"max_completion_length={self.max_completion_length}; must be >= 1")
    if not self.greedy and self.temperature <= 0:
      raise ConfigError(f"temperature={self.temperature}; must be > 0 (or use greedy decoding)")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k}; must be >= 0 (0 disables it)")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p={self.top_p}; allowed: 0 < top_p <= 1")
    if not self.eos_token_ids:
      raise ConfigError("eos_token_ids is empty; give at least one end-of-sequence id")
    if self.row_chunks < 1:
      raise ConfigError(f"row_chunks={self.row_chunks}; must be >= 1")

  @property
  def logprob_temperature(self) -> float:
    return 1.0 if self.greedy else self.temperature


class Rollout(NamedTuple):
  """Prompts repeated G times (row i*G + g is sample g of prompt i) and their completions."""

  prompt_ids: jax.Array  # [N, P] int32, left-padded
  prompt_mask: jax.Array  # [N, P]
  completion_ids: jax.Array  # [N, L] int32, pad after EOS
  completion_mask: jax.Array  # [N, L], 1 up to and including the first EOS
  sampling_logprobs: jax.Array  # [N, L] float32, 0 where masked
  # [N] bool: the completion ended with EOS (the sampler's own flag). Not derivable from the
  # mask: a completion whose EOS is its last allowed token fills the mask like a truncated one.
  eos_terminated: jax.Array
  # [N, L] 1 where a token came from a tool (multi-turn rollouts): context for the model and
  # text for the rewards, but no part of the loss, the KL, the entropy or any token metric.
  # None: every completion token is the model's (single-turn).
  tool_mask: jax.Array | None = None


def model_token_mask(rollout: Rollout) -> jax.Array:
  """[N, L] 1 for the tokens the model sampled: the completion mask without tool responses.
  The loss and every token metric count these; attention sees all of `completion_mask`."""
  if rollout.tool_mask is None:
    return rollout.completion_mask
  return rollout.completion_mask * (1 - rollout.tool_mask.astype(rollout.completion_mask.dtype))


def trimmed_width(longest: int, bucket: int, max_completion_length: int) -> int:
  """Positions the train passes need for a batch whose longest completion has `longest`
  tokens: one more (so a completion that stopped at EOS stays shorter than the width),
  rounded up to a multiple of `bucket`, at most max_completion_length (bucket 0: always
  that). A batch therefore compiles at most ceil(max_completion_length / bucket) shapes.
  """
  if not bucket:
    return max_completion_length
  return min(max_completion_length, -(-(longest + 1) // bucket) * bucket)


def trim_completions(rollout: Rollout, width: int) -> Rollout:
  """The rollout's completions cut to their first `width` positions (only padding beyond:
  `width` from trimmed_width). NumPy or JAX arrays. `eos_terminated` is kept: it is the
  sampler's, not the trimmed mask's."""
  cut = lambda x: None if x is None else x[..., :width]
  return rollout._replace(completion_ids=cut(rollout.completion_ids),
                          completion_mask=cut(rollout.completion_mask),
                          sampling_logprobs=cut(rollout.sampling_logprobs),
                          tool_mask=cut(rollout.tool_mask))


def filter_logits(scaled_logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets to -inf every logit outside the top-k and the top-p nucleus. [N, V] -> [N, V]."""
  neg_inf = jnp.finfo(scaled_logits.dtype).min
  if top_k:
    kth = jax.lax.top_k(scaled_logits, top_k)[0][:, -1:]
    scaled_logits = jnp.where(scaled_logits < kth, neg_inf, scaled_logits)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-scaled_logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus; the top token is always kept.
    kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    scaled_logits = jnp.where(scaled_logits < threshold, neg_inf, scaled_logits)
  return scaled_logits


def _last_positive(x: jax.Array) -> jax.Array:
  """Index of the last entry > 0 along the last axis (0 if there is none)."""
  size = x.shape[-1]
  return size - 1 - jnp.argmax(x[..., ::-1] > 0, axis=-1)


def sample_inverse_cdf(probs: jax.Array, uniforms: jax.Array, block: int = 256) -> jax.Array:
  """One draw per row from the categorical `probs` [N, V], given one uniform in [0, 1) per row.

  The token is the first whose cumulative probability exceeds u * total. The cumulative
  sum is taken in two levels (over blocks of `block` tokens, then within the chosen
  block), which keeps it short and accurate in float32 for vocabularies of 150k tokens.
  One random number per row, where the Gumbel-max trick (`jax.random.categorical`) draws
  one per vocabulary entry: for a 150k vocabulary that is most of the sampler's time.
  Zero-probability tokens (filtered by top-k / top-p) are never returned.
  """
  n, v = probs.shape
  probs = jnp.pad(probs, ((0, 0), (0, -v % block))).reshape(n, -1, block)
  block_mass = probs.sum(-1)  # [N, blocks]
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = uniforms * block_cdf[:, -1]
  # float rounding can push the target to the total: stay on a block that has mass
  chosen = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_positive(block_mass))
  mass_before = jnp.where(
      chosen > 0, jnp.take_along_axis(block_cdf, jnp.maximum(chosen - 1, 0)[:, None], 1)[:, 0], 0.)
  within = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [N, block]
  offset = jnp.sum(jnp.cumsum(within, axis=-1) <= (target - mass_before)[:, None], axis=-1)
  return chosen * block + jnp.minimum(offset, _last_positive(within))


def choose_tokens(logits, keys, cfg: SamplingConfig):
  """One token per row and its log-prob under softmax(logits / T). logits: [N, V] float32."""
  scaled = logits / cfg.logprob_temperature
  logprobs = jax.nn.log_softmax(scaled, axis=-1)
  if cfg.greedy:
    tokens = jnp.argmax(logits, axis=-1)
  else:
    if cfg.top_k or cfg.top_p < 1.0:
      probs = jax.nn.softmax(filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
    else:  # nothing filtered: the distribution whose log-probs are already computed
      probs = jnp.exp(logprobs)
    tokens = sample_inverse_cdf(probs, jax.vmap(jax.random.uniform)(keys))
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(logprobs, tokens[:, None], -1)[:, 0]


def prefill(model, prompt_ids: jax.Array, prompt_mask: jax.Array, cache_length: int,
            num_generations: int):
  """Runs the prompts through the model once and shares each prompt's KV cache with its G
  samples. (cache [B*G rows], last hidden state [B*G, D], per-layer params, LM head).

  On a mesh the LM head is gathered once, before any decoding, and each chip scores only
  its own rows against the whole vocabulary: the [rows, V] logits never cross chips (a head
  split on its hidden dimension would all-reduce them at every token).
  """
  batch, prompt_len = prompt_ids.shape
  key_mask = jnp.concatenate(
      [prompt_mask, jnp.ones((batch, cache_length - prompt_len), jnp.int32)], axis=1)
  cache = model.init_cache(batch, cache_length)
  layers = model.layer_params()  # sliced once here, not at every decoded token
  head = sharding.replicated(model.head_weight.astype(model.cfg.compute_dtype))
  hidden, cache = model.hidden_states(
      prompt_ids, positions_from_mask(prompt_mask), key_mask, cache, 0, layers)
  repeat = lambda x: jnp.repeat(x, num_generations, axis=0)
  cache = tuple(sharding.kv_cache(jax.tree.map(repeat, c)) for c in cache)
  return cache, repeat(hidden[:, -1]), layers, head


def row_keys(rng: jax.Array, rows: int, axis_name: str | None) -> jax.Array:
  """One key per completion row, by its global index (pmap: offset by the device's rows)."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * rows
  return keys_of_rows(rng, offset + jnp.arange(rows))


def keys_of_rows(rng: jax.Array, global_rows: jax.Array) -> jax.Array:
  """One key per completion row from its global index."""
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, global_rows)


def generate(model_def: nnx.GraphDef, params: nnx.State, prompt_ids: jax.Array,
             prompt_mask: jax.Array, rng: jax.Array, cfg: SamplingConfig,
             axis_name: str | None = None) -> Rollout:
  """Samples `cfg.num_generations` completions for each left-padded prompt.

  prompt_ids, prompt_mask: [B, P]; every row holds at least one real token.
  axis_name: the pmap device axis, if any: rows then draw keys by their global index,
  so the samples do not depend on how the batch is split over devices, nor on
  `cfg.row_chunks` (prompts decoded in that many chunks, one after the other: chunk c
  holds prompts c, c + chunks, ..., so on a mesh each chunk spreads over every shard).
  """
  batch, group = prompt_ids.shape[0], cfg.num_generations
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch * group
  global_rows = offset + jnp.arange(batch * group)
  chunks = cfg.row_chunks
  if chunks == 1:
    return _generate(model_def, params, prompt_ids, prompt_mask, rng, cfg, global_rows)
  if batch % chunks:
    raise ConfigError(f"row_chunks={chunks} must divide the {batch} prompts of a device")
  split = lambda x: x.reshape((batch // chunks, chunks) + x.shape[1:]).swapaxes(0, 1)
  rows_of = split(global_rows.reshape(batch, group))  # [chunks, B / chunks, G]
  parts = jax.lax.map(
      lambda part: _generate(model_def, params, part[0], part[1], rng, cfg, part[2].reshape(-1)),
      (split(prompt_ids), split(prompt_mask), rows_of))
  # [chunks, B / chunks * G, ...] back to prompt order: prompt c + chunks * i is row block i
  unsplit = lambda x: x.reshape((chunks, batch // chunks, group) + x.shape[2:]).swapaxes(
      0, 1).reshape((batch * group,) + x.shape[2:])
  return jax.tree.map(unsplit, parts)


def _generate(model_def: nnx.GraphDef, params: nnx.State, prompt_ids: jax.Array,
              prompt_mask: jax.Array, rng: jax.Array, cfg: SamplingConfig,
              global_rows: jax.Array) -> Rollout:
  """`generate` for one chunk of prompts whose completion rows have these global indices."""
  model = nnx.merge(model_def, params)
  batch, prompt_len = prompt_ids.shape
  length, group = cfg.max_completion_length, cfg.num_generations
  rows = batch * group
  prompt_mask = prompt_mask.astype(jnp.int32)

  cache, hidden, layers, head = prefill(model, prompt_ids, prompt_mask, prompt_len + length,
                                        group)
  next_logits = lambda h: model.logits(sharding.rows(h), head)
  logits = next_logits(hidden)
  repeat = lambda x: jnp.repeat(x, group, axis=0)
  key_mask = repeat(jnp.concatenate([prompt_mask, jnp.ones((batch, length), jnp.int32)], axis=1))
  first_position = repeat(prompt_mask.sum(-1))
  keys = keys_of_rows(rng, global_rows)
  eos_ids = jnp.asarray(cfg.eos_token_ids, jnp.int32)

  def step_keys(t):
    return jax.vmap(jax.random.fold_in, (0, None))(keys, t)

  token, logprob = choose_tokens(logits, step_keys(0), cfg)
  tokens = jnp.full((rows, length), cfg.pad_token_id, jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((rows, length), jnp.float32).at[:, 0].set(logprob)
  mask = jnp.zeros((rows, length), jnp.int32).at[:, 0].set(1)
  done = jnp.isin(token, eos_ids)

  def keep_going(carry):
    t, _, _, _, done, _, _ = carry
    return (t < length) & ~jnp.all(done)

  def decode_one(carry):
    t, tokens, logprobs, mask, done, token, cache = carry
    hidden, cache = model.hidden_states(
        token[:, None], (first_position + t - 1)[:, None], key_mask, cache, prompt_len + t - 1,
        layers)
    token, logprob = choose_tokens(next_logits(hidden[:, 0]), step_keys(t), cfg)
    token = jnp.where(done, cfg.pad_token_id, token)
    tokens = tokens.at[:, t].set(token)
    logprobs = logprobs.at[:, t].set(jnp.where(done, 0.0, logprob))
    mask = mask.at[:, t].set(~done)
    done = done | jnp.isin(token, eos_ids)
    return t + 1, tokens, logprobs, mask, done, token, cache

  carry = (jnp.int32(1), tokens, logprobs, mask, done, token, cache)
  _, tokens, logprobs, mask, done, _, _ = jax.lax.while_loop(keep_going, decode_one, carry)
  return Rollout(repeat(prompt_ids), repeat(prompt_mask), tokens, mask, logprobs, done)
