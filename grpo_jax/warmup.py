"""Supervised warm-up: a short stage of next-token training on demonstrations.

The demo's tiny model starts from random weights and would never sample a right answer,
so GRPO would have no signal. A few hundred steps of supervised training on *imperfect*
demonstrations give it a starting policy that answers sometimes; GRPO must add its gain
by itself. The stage reuses the train step's log-prob function (one definition of
"log-prob of a completion"), and its result is cached in the workdir.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from grpo_jax import grpo, sampling
from grpo_jax.data import batching

log = logging.getLogger("grpo_jax")


class CompletionEncoder:
  """Right-padded completion ids [B, L] ending with EOS, and their mask.

  Demonstrations repeat, so each distinct text is tokenized once.
  """

  def __init__(self, tokenizer, length: int):
    self.tokenizer, self.length = tokenizer, length
    self._tokens = functools.lru_cache(maxsize=1 << 16)(self._tokenize)

  def _tokenize(self, text: str) -> tuple[int, ...]:
    tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.length - 1]
    return tuple(tokens) + (self.tokenizer.eos_token_id,)

  def __call__(self, completions: list[str]):
    ids = np.full((len(completions), self.length), self.tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(completions), self.length), np.int32)
    for row, text in enumerate(completions):
      tokens = self._tokens(text)
      ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    return ids, mask


def sft_loss(params, model_def, batch: sampling.Rollout, chunk_size: int):
  """Mean negative log-likelihood of the completion tokens."""
  logps, _ = grpo.completion_logprobs(model_def, params, batch, 1.0, chunk_size)
  mask = batch.completion_mask.astype(jnp.float32)
  return -jnp.sum(logps * mask) / jnp.maximum(mask.sum(), 1.0)


@functools.partial(jax.jit, static_argnums=(1, 4, 5), donate_argnums=(0, 2))
def sft_step(params, model_def, opt_state, batch, tx, chunk_size):
  loss, grads = jax.value_and_grad(sft_loss)(params, model_def, batch, chunk_size)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def supervised_warmup(model_def: nnx.GraphDef, params: nnx.State, tokenizer, prompts: list[str],
                      make_demo: Callable[[int, np.random.Generator], str], *, steps: int,
                      batch_size: int, learning_rate: float, max_prompt_length: int,
                      max_completion_length: int, seed: int, chunk_size: int = 256):
  """Trains on `make_demo(prompt_index, rng)` completions; returns (params, final loss)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.cosine_decay_schedule(learning_rate, steps)))
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  all_prompt_ids, all_prompt_mask = batching.encode_prompts(tokenizer, prompts, max_prompt_length)
  encode = CompletionEncoder(tokenizer, max_completion_length)
  no_logprobs = np.zeros((batch_size, max_completion_length), np.float32)
  losses = []
  for _ in range(steps):
    picks = rng.integers(0, len(prompts), size=batch_size)
    completion_ids, completion_mask = encode([make_demo(int(i), rng) for i in picks])
    batch = sampling.Rollout(all_prompt_ids[picks], all_prompt_mask[picks], completion_ids,
                             completion_mask, no_logprobs)
    params, opt_state, loss = sft_step(params, model_def, opt_state, batch, tx, chunk_size)
    losses.append(loss)
  return params, float(np.mean(jax.device_get(losses[-20:])))


def cached_warmup(cache_dir, like_params, run: Callable[[], tuple[nnx.State, dict]]):
  """Returns the warmed-up params from `cache_dir`, or runs `run()` and caches its result."""
  cache_dir = epath.Path(cache_dir)
  params_dir, stats_file = cache_dir / "params", cache_dir / "stats.json"
  if stats_file.exists():
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                      like_params))
    stats = json.loads(stats_file.read_text())
    log.info("Loaded the supervised warm-up from %s (%s)", cache_dir, stats)
    return params, {**stats, "cached": True}
  start = time.perf_counter()
  params, stats = run()
  stats = {**stats, "seconds": round(time.perf_counter() - start, 2)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, params)
  stats_file.write_text(json.dumps(stats))  # written last: its presence marks a complete cache
  return params, {**stats, "cached": False}
