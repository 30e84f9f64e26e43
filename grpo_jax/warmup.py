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
import os
import secrets
import time
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from grpo_jax import checkpoint, grpo, hosts, sampling
from grpo_jax.data import batching

log = logging.getLogger("grpo_jax")


class CompletionEncoder:
  """Right-padded completion ids [B, L] ending with EOS, their mask, and their tool mask.

  A completion is a text, or (text, is_tool_response) segments (tool-using demonstrations:
  the response segments are context, out of the loss). Demonstrations repeat, so each
  distinct text is tokenized once.
  """

  def __init__(self, tokenizer, length: int):
    self.tokenizer, self.length = tokenizer, length
    self._tokens = functools.lru_cache(maxsize=1 << 16)(self._tokenize)

  def _tokenize(self, text: str) -> tuple[int, ...]:
    return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def __call__(self, completions: list):
    ids = np.full((len(completions), self.length), self.tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(completions), self.length), np.int32)
    tool = np.zeros((len(completions), self.length), np.int32)
    for row, completion in enumerate(completions):
      segments = [(completion, False)] if isinstance(completion, str) else completion
      tokens, from_tool = [], []
      for text, is_tool in segments:
        part = self._tokens(text)
        tokens += part
        from_tool += [is_tool] * len(part)
      tokens = tokens[:self.length - 1] + [self.tokenizer.eos_token_id]
      from_tool = from_tool[:self.length - 1] + [False]
      ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
      tool[row, :len(tokens)] = from_tool
    return ids, mask, tool


def sft_loss(params, model_def, batch: sampling.Rollout, chunk_size: int):
  """Mean negative log-likelihood of the completion tokens (not of tool responses)."""
  logps, _ = grpo.completion_logprobs(model_def, params, batch, 1.0, chunk_size)
  mask = sampling.model_token_mask(batch).astype(jnp.float32)
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
  """Trains on `make_demo(prompt_index, rng)` completions (texts, or (text, is_tool)
  segments: see CompletionEncoder); returns (params, final loss)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.cosine_decay_schedule(learning_rate, steps)))
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  all_prompt_ids, all_prompt_mask = batching.encode_prompts(tokenizer, prompts, max_prompt_length)
  encode = CompletionEncoder(tokenizer, max_completion_length)
  no_logprobs = np.zeros((batch_size, max_completion_length), np.float32)
  ends_with_eos = np.ones(batch_size, bool)  # CompletionEncoder ends every demo with EOS
  losses = []
  for _ in range(steps):
    picks = rng.integers(0, len(prompts), size=batch_size)
    completion_ids, completion_mask, tool_mask = encode([make_demo(int(i), rng) for i in picks])
    batch = sampling.Rollout(all_prompt_ids[picks], all_prompt_mask[picks], completion_ids,
                             completion_mask, no_logprobs, eos_terminated=ends_with_eos,
                             tool_mask=tool_mask if tool_mask.any() else None)
    params, opt_state, loss = sft_step(params, model_def, opt_state, batch, tx, chunk_size)
    losses.append(loss)
  return params, float(np.mean(jax.device_get(losses[-20:])))


# The cache, `<workdir>/warmup/`:
#   params/      the warmed-up params (an Orbax StandardCheckpointer checkpoint)
#   key.json     what produced them (sft settings, data, lengths, seed, model fingerprint)
#   stats.json   {"loss", "seconds", ...} of the run that made them, written last
# It is built whole in a sibling `warmup.tmp-<pid>-<random>/` and then swapped in by renames
# (`warmup/` -> `warmup.old-<pid>-<random>/`, the new one -> `warmup/`, then the old one is
# deleted), so a kill at any moment leaves the old complete cache, no cache, or the new complete
# cache, plus leftovers that the next call deletes. On a POSIX local disk renaming a directory
# is atomic; on gs:// (and other object stores) a "rename" is a copy and a delete, not atomic,
# so there a kill during the swap can leave a partial `warmup/`: loading validates everything
# and rebuilds, with a warning, whatever it cannot use.
# One run owns a workdir: leftovers of another run's unfinished swap are deleted. Under
# jax.distributed every process calls cached_warmup: all save into one temporary directory
# (its name comes from process 0), the primary alone writes the JSON files and renames, between
# barriers, and the processes reuse the cache only if all of them could load it.
_PARAMS, _KEY, _STATS = "params", "key.json", "stats.json"
_TMP, _OLD = ".tmp-", ".old-"


def cached_warmup(cache_dir, like_params, run: Callable[[], tuple[nnx.State, dict]],
                  key: dict | None = None):
  """Returns the warmed-up params from `cache_dir`, or runs `run()` and caches its result.

  `key` (a JSON-able dict: the settings and model that `run()` depends on) is stored with the
  cache; a cache made with another key, or one that is partial or unreadable or whose params do
  not fit `like_params`, is rebuilt after a warning naming why. `None` means `{}`.
  Returns `(params, stats)`: stats has `run()`'s stats plus "seconds" (of the run that made the
  params) and "cached" (whether they came from the cache).
  """
  cache_dir = epath.Path(cache_dir)
  key = _canonical_key(key)  # before run(): a bad key must not cost a warm-up
  if hosts.is_primary():
    _remove_leftovers(cache_dir)
  hosts.barrier("grpo_jax.warmup.cleaned")
  loaded, why = _load(cache_dir, like_params, key) if cache_dir.exists() else (None, None)
  if bool(hosts.agree(loaded is not None, np.all)):
    params, stats = loaded
    log.info("Loaded the supervised warm-up from %s (%s)", cache_dir, stats)
    return params, {**stats, "cached": True}
  if why is not None:
    log.warning("Not reusing the supervised warm-up cached in %s: %s. Running it again.",
                cache_dir, why)
  elif loaded is not None:
    log.warning("Not reusing the supervised warm-up cached in %s: another process could not "
                "load it. Running it again.", cache_dir)
  start = time.perf_counter()
  params, stats = run()
  stats = {**stats, "seconds": round(time.perf_counter() - start, 2)}
  try:
    _write(cache_dir, params, stats, key)
  except Exception as e:  # the cache only saves a rerun's time: train on without it
    if checkpoint.write_errno(e) is None:
      raise
    log.warning("Could not cache the supervised warm-up in %s (%s): training goes on "
                "without the cache", cache_dir,
                os.strerror(checkpoint.write_errno(e)))
  return params, {**stats, "cached": False}


def _reached(point: str) -> None:
  """Marks a step of `_write`; tests/test_warmup.py replaces it to SIGKILL the process there."""


def _canonical_key(key) -> dict:
  if key is None:
    return {}
  if not isinstance(key, Mapping):
    raise TypeError(f"cached_warmup: key must be a dict, got {type(key).__name__}")
  try:
    return json.loads(json.dumps(key, sort_keys=True))
  except (TypeError, ValueError) as e:
    raise TypeError(f"cached_warmup: key must be JSON-able ({e}): {key!r}") from e


def _same(a, b) -> bool:  # on the JSON text: NaN equals NaN, 1 differs from True
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


_ABSENT = object()


def _key_differences(cached, now, prefix: str = "") -> list[str]:
  """`field: cached (cached) vs now (now)` for each field of two keys that differs."""
  def show(value):
    text = "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."

  out = []
  for field in sorted(set(cached) | set(now)):
    a, b = cached.get(field, _ABSENT), now.get(field, _ABSENT)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _key_differences(a, b, f"{prefix}{field}.")
    elif a is _ABSENT or b is _ABSENT or not _same(a, b):
      out.append(f"{prefix}{field}: {show(a)} (cached) vs {show(b)} (now)")
  return out


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_names(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _shape_differences(cached: dict, now: dict) -> list[str]:
  return [f"{'/'.join(path)}: {cached[path]} (cached) vs {now[path]} (now)"
          for path in sorted(set(cached) & set(now)) if cached[path] != now[path]]


def _first_line(e: BaseException) -> str:
  text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
  return text if len(text) <= 300 else text[:297] + "..."


def _load(cache_dir: epath.Path, like_params, key: dict):
  """Returns ((params, stats), None) for a usable cache, else (None, why it is not usable)."""
  if not cache_dir.is_dir():
    return None, "it is not a directory"
  stats_file, key_file, params_dir = cache_dir / _STATS, cache_dir / _KEY, cache_dir / _PARAMS
  if not stats_file.exists():
    return None, (f"it is incomplete: no {_STATS} (a run was interrupted while writing it, or "
                  "an older version of grpo_jax wrote it)")
  if not key_file.exists():
    return None, (f"it has no {_KEY}, so what produced it is unknown (an older version of "
                  "grpo_jax wrote it)")
  try:
    stats, cached_key = json.loads(stats_file.read_text()), json.loads(key_file.read_text())
  except (OSError, ValueError) as e:
    return None, f"its {_STATS} or {_KEY} is unreadable ({_first_line(e)})"
  if not (isinstance(stats, dict) and isinstance(cached_key, dict)
          and all(isinstance(stats.get(k), (int, float)) for k in ("loss", "seconds"))):
    return None, f"its {_STATS} or {_KEY} is malformed"
  if not _same(cached_key, key):
    return None, ("it was made with other settings: "
                  + "; ".join(_key_differences(cached_key, key) or ["(the keys differ)"]))
  if not params_dir.is_dir():
    return None, f"it has no {_PARAMS}/"
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      try:  # names the leaves whose shape differs, which Orbax's error does not
        metadata = ckptr.metadata(params_dir)
        metadata = getattr(metadata, "item_metadata", metadata)
        differences = _shape_differences(_shapes(getattr(metadata, "tree", metadata)),
                                         _shapes(target))
      except Exception:  # pylint: disable=broad-except  # the restore below will say
        differences = []
      if differences:
        return None, ("its params have other shapes than the model's: "
                      + "; ".join(differences[:5])
                      + (f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""))
      params = ckptr.restore(params_dir, target)
  except Exception as e:  # pylint: disable=broad-except  # partial or not this model's
    return None, f"its params could not be restored ({_first_line(e)})"
  differences = _shape_differences(_shapes(params), _shapes(target))
  if differences or _shapes(params).keys() != _shapes(target).keys():
    return None, "its params do not fit the model: " + "; ".join(differences or ["structure"])
  return (params, stats), None


def _write_json(path: epath.Path, value) -> None:
  path.write_text(json.dumps(value, sort_keys=True, indent=1))


def _sibling(cache_dir: epath.Path, kind: str, tag: str) -> epath.Path:
  return cache_dir.parent / f"{cache_dir.name}{kind}{tag}"


def _remove_leftovers(cache_dir: epath.Path) -> None:
  """Deletes the temporary and old directories of swaps that a kill interrupted."""
  if not cache_dir.parent.exists():
    return
  for kind in (_TMP, _OLD):
    for leftover in cache_dir.parent.glob(f"{cache_dir.name}{kind}*"):
      log.info("Deleting %s, left over by an interrupted warm-up cache write", leftover)
      leftover.rmtree()


def _write(cache_dir: epath.Path, params, stats: dict, key: dict) -> None:
  """Builds the cache in a temporary sibling directory, then swaps it in by renames."""
  tag = np.asarray([os.getpid(), secrets.randbits(31)], np.int32)
  tag = hosts.from_primary(tag)  # all processes save into the same directory
  tag = f"{int(tag[0])}-{int(tag[1]):08x}"
  tmp, old = _sibling(cache_dir, _TMP, tag), _sibling(cache_dir, _OLD, tag)
  if hosts.is_primary():
    tmp.mkdir(parents=True)
  hosts.barrier("grpo_jax.warmup.tmp_created")
  if jax.process_count() > 1:  # Orbax cannot save host-local arrays there; NumPy it can
    params = jax.device_get(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / _PARAMS, params)
    ckptr.wait_until_finished()
  hosts.barrier("grpo_jax.warmup.saved")
  _reached("params_saved")
  if hosts.is_primary():
    _write_json(tmp / _KEY, key)
    _write_json(tmp / _STATS, stats)  # last: a directory with it is complete
    _reached("marker_written")
    if cache_dir.exists():
      cache_dir.rename(old)
      _reached("old_moved")
    tmp.rename(cache_dir)
    _reached("new_moved")
    if old.exists():
      old.rmtree()
  hosts.barrier("grpo_jax.warmup.swapped")
