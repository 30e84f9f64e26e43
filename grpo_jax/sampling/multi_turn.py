"""Multi-turn sampling: decode until a row stops, let the host append a tool's response,
continue the row from its KV cache. Pure and jit-compiled, like single-turn decoding.

A rollout with tools is a sequence of phases on one `TurnState`:

  begin_turns (prefill the prompts once) -> decode_turn -> [append_turn -> decode_turn]* ->
  finish_turns

`decode_turn` samples every active row until it emits a stop token (EOS, or one of
`SamplingConfig.stop_token_ids`: a tool-call closer such as Qwen's `</tool_call>`) or runs out of
`max_completion_length`; the while loop ends once no row is active. The host then reads the
stopped rows' last turn, runs the tools they called and hands the rendered responses to
`append_turn`, which prefills them into each row's own cache slots (the conversation so far
is never prefilled again) and releases the rows to decode on. A row that called no tool (or
may call no more) is finished there.

Each row keeps its own write position: completion token j of row r sits at cache slot
P + j and at RoPE position (prompt length of r) + j, whatever the other rows do, so the
completions come out packed ([N, L], model and tool tokens in order) and a single full-
sequence pass over them sees exactly what the sampler saw. Token j of a row draws its key
from fold_in(row key, j), as in single-turn decoding: a rollout in which no tool is called
is the single-turn rollout, token for token.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grpo_jax.models import sharding
from grpo_jax.sampling.decode import (Rollout, SamplingConfig, choose_tokens, prefill,
                                      row_keys)

# Tokens of a tool response prefilled per `append_turn` call (the cache keeps this many
# slots beyond max_completion_length). Longer responses take several calls.
APPEND_WIDTH = 64


class TurnState(NamedTuple):
  """A multi-turn rollout between phases. Rows are completions (prompt i's G samples are
  rows i*G .. i*G + G-1); every field is sharded by rows."""

  prompt_ids: jax.Array  # [N, P]
  prompt_mask: jax.Array  # [N, P]
  tokens: jax.Array  # [N, L] model and tool tokens, packed; pad beyond `length`
  logprobs: jax.Array  # [N, L] sampling log-probs of model tokens, 0 elsewhere
  tool_mask: jax.Array  # [N, L] 1 for tool-response tokens
  length: jax.Array  # [N] tokens written so far
  stopped: jax.Array  # [N] emitted a stop token: waiting for the host
  done: jax.Array  # [N] finished for good (no more tokens)
  eos: jax.Array  # [N] the row's last model token is an EOS
  hidden: jax.Array  # [N, D] last hidden state: the next token's logits come from it
  cache: tuple  # per layer {"k", "v"}, P + L + APPEND_WIDTH slots


class TurnPhases(NamedTuple):
  """The phases compiled for one layout (pmap or mesh) and one SamplingConfig:
  begin(params, prompt_ids, prompt_mask), decode(params, state, rng),
  append(params, state, ids, counts, release, finished), finish(state) -> Rollout."""

  begin: Callable
  decode: Callable
  append: Callable
  finish: Callable


def append_width(cfg: SamplingConfig) -> int:
  return min(APPEND_WIDTH, cfg.max_completion_length)


def _model(model_def, params):
  model = nnx.merge(model_def, params)
  head = sharding.replicated(model.head_weight.astype(model.cfg.compute_dtype))
  return model, model.layer_params(), lambda h: model.logits(sharding.rows(h), head)


def _key_mask(state: TurnState) -> jax.Array:
  """Every completion slot counts as valid: slots a row has not written yet sit after its
  own queries, so causality hides them, and they are written before they are read."""
  rows, prompt_len = state.prompt_mask.shape
  slots = state.cache[0]["v"].shape[2]
  return jnp.concatenate([state.prompt_mask.astype(jnp.int32),
                          jnp.ones((rows, slots - prompt_len), jnp.int32)], axis=1)


def begin_turns(model_def: nnx.GraphDef, params: nnx.State, prompt_ids: jax.Array,
                prompt_mask: jax.Array, cfg: SamplingConfig) -> TurnState:
  """Prefills the left-padded prompts [B, P] once; no completion token yet."""
  model = nnx.merge(model_def, params)
  group, length = cfg.num_generations, cfg.max_completion_length
  prompt_mask = prompt_mask.astype(jnp.int32)
  batch, prompt_len = prompt_ids.shape
  rows = batch * group
  cache, hidden, _, _ = prefill(model, prompt_ids, prompt_mask,
                                prompt_len + length + append_width(cfg), group)
  repeat = lambda x: jnp.repeat(x, group, axis=0)
  false = jnp.zeros((rows,), bool)
  return TurnState(repeat(prompt_ids), repeat(prompt_mask),
                   jnp.full((rows, length), cfg.pad_token_id, jnp.int32),
                   jnp.zeros((rows, length), jnp.float32), jnp.zeros((rows, length), jnp.int32),
                   jnp.zeros((rows,), jnp.int32), false, false, false, hidden, cache)


def _write_rows(buffer, values, start, count):
  """buffer [N, L] with values [N, W] written at each row's slots start .. start + count - 1
  (those within L)."""
  offset = jnp.arange(buffer.shape[1])[None] - start[:, None]
  hit = (offset >= 0) & (offset < count[:, None])
  picked = jnp.take_along_axis(values, jnp.clip(offset, 0, values.shape[1] - 1), axis=1)
  return jnp.where(hit, picked.astype(buffer.dtype), buffer)


def _write_token(buffer, value, position, active):
  """buffer [N, L] with value [N] at each active row's `position` (a scatter of one entry
  per row: O(N) per decoded token, where _write_rows' select is O(N L))."""
  rows = jnp.arange(buffer.shape[0])
  position = jnp.minimum(position, buffer.shape[1] - 1)
  return buffer.at[rows, position].set(
      jnp.where(active, value.astype(buffer.dtype), buffer[rows, position]))


def decode_turn(model_def: nnx.GraphDef, params: nnx.State, state: TurnState, rng: jax.Array,
                cfg: SamplingConfig, axis_name: str | None = None) -> TurnState:
  """Samples every row that is neither stopped nor done until it stops or is full."""
  model, layers, next_logits = _model(model_def, params)
  rows, length = state.tokens.shape
  prompt_len = state.prompt_ids.shape[1]
  key_mask = _key_mask(state)
  first_position = state.prompt_mask.sum(-1)
  keys = row_keys(rng, rows, axis_name)
  eos_ids = jnp.asarray(cfg.eos_token_ids, jnp.int32)
  stop_ids = jnp.asarray(tuple(cfg.eos_token_ids) + tuple(cfg.stop_token_ids), jnp.int32)

  def keep_going(carry):
    return jnp.any(carry[0])

  def decode_one(carry):
    active, s = carry
    step_keys = jax.vmap(jax.random.fold_in)(keys, s.length)
    token, logprob = choose_tokens(next_logits(s.hidden), step_keys, cfg)
    token = jnp.where(active, token, cfg.pad_token_id)
    written = jnp.where(active, 1, 0)
    tokens = _write_token(s.tokens, token, s.length, active)
    logprobs = _write_token(s.logprobs, logprob, s.length, active)
    # Inactive rows feed a pad at their next free slot: after all their queries, and
    # overwritten before it is ever read.
    hidden, cache = model.hidden_states(
        token[:, None], (first_position + s.length)[:, None], key_mask, s.cache,
        prompt_len + s.length, layers)
    new_length = s.length + written
    stop = jnp.isin(token, stop_ids)
    eos = jnp.where(active, jnp.isin(token, eos_ids), s.eos)
    stopped = s.stopped | (active & stop)
    done = s.done | (active & ~stop & (new_length >= length))
    hidden = jnp.where(active[:, None], hidden[:, 0], s.hidden)
    s = s._replace(tokens=tokens, logprobs=logprobs, length=new_length, stopped=stopped,
                   done=done, eos=eos, hidden=hidden, cache=cache)
    return active & ~stop & (new_length < length), s

  active = ~state.stopped & ~state.done & (state.length < length)
  return jax.lax.while_loop(keep_going, decode_one, (active, state))[1]


def append_turn(model_def: nnx.GraphDef, params: nnx.State, state: TurnState,
                ids: jax.Array, counts: jax.Array, release: jax.Array, finished: jax.Array
                ) -> TurnState:
  """Appends tool-response tokens to stopped rows and prefills them into the rows' caches.

  ids [N, W] (W = append_width), counts [N]: row r's next counts[r] response tokens (0: none
  in this call). release [N]: the row's response is complete: it decodes again in the next
  `decode_turn`. finished [N]: the row stopped without calling a tool (or may call no
  more): it is done. A response that reaches max_completion_length truncates its row.
  """
  model, layers, _ = _model(model_def, params)
  rows, length = state.tokens.shape
  prompt_len = state.prompt_ids.shape[1]
  width = ids.shape[1]
  first_position = state.prompt_mask.sum(-1)
  extend = (counts > 0) & state.stopped & ~state.done & ~finished
  counts = jnp.where(extend, jnp.minimum(counts, length - state.length), 0)
  hidden, cache = model.hidden_states(
      ids, (first_position + state.length)[:, None] + jnp.arange(width), _key_mask(state),
      state.cache, prompt_len + state.length, layers)
  last = jnp.take_along_axis(hidden, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]
  new_length = state.length + counts
  full = extend & (new_length >= length)
  done = state.done | finished | full
  return state._replace(
      tokens=_write_rows(state.tokens, ids, state.length, counts),
      tool_mask=_write_rows(state.tool_mask, jnp.ones_like(ids), state.length, counts),
      length=new_length, done=done, stopped=state.stopped & ~release & ~done,
      eos=jnp.where(extend, False, state.eos),
      hidden=jnp.where(extend[:, None], last, state.hidden), cache=cache)


def finish_turns(state: TurnState) -> Rollout:
  """The rollout: every token written so far; rows still stopped end there."""
  mask = (jnp.arange(state.tokens.shape[1])[None] < state.length[:, None]).astype(jnp.int32)
  return Rollout(state.prompt_ids, state.prompt_mask, state.tokens, mask,
                 state.logprobs * mask, state.eos, state.tool_mask)
