"""Hugging Face checkpoints (Llama 3.x, Qwen2/2.5, Qwen3) in and out of our Transformer.

`path` may also be a `.gguf` file (llama.cpp's format, see `gguf.py`), or `pkg:PACKAGE/FILE`
for one shipped inside an installed Python package; `save_pretrained` writes safetensors.

A checkpoint directory is `config.json` + safetensors (one file, or shards listed in
`model.safetensors.index.json`) + optional tokenizer files. Loading needs no torch: tensors
are read as NumPy arrays, `[out, in]` linear weights are transposed to our `[in, out]`
kernels, and each layer's tensors are stacked into `model.blocks`. The model is built from
its abstract shape (`nnx.eval_shape`) and filled with the loaded arrays, so a large model
never exists twice in memory (once random, once loaded).

Saving writes the same layout back, with a config.json that
`transformers.AutoModelForCausalLM.from_pretrained` maps to the right class.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx
from safetensors import safe_open

from grpo_jax.errors import UserError
from grpo_jax.models import gguf
from grpo_jax.models.hf_config import config_from_hf, hf_config_dict
from grpo_jax.models.transformer import ModelConfig, Transformer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_DEFAULT_SHARD_BYTES = 2 * 1024**3

Path = str | os.PathLike


# --- parameter names ---------------------------------------------------------------------

def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
  """HF tensor name of our parameter at `path` (for one layer when under `blocks`)."""
  if path == ("lm_head",):
    return "lm_head.weight"
  if path == ("embed_tokens",):
    return "model.embed_tokens.weight"
  if path[0] == "blocks":
    parts = ["weight" if p == "kernel" else p for p in path[1:]]
    return f"model.layers.{layer}." + ".".join(parts)
  return "model." + ".".join(path)


def _layers_of(path: tuple[str, ...], num_layers: int) -> list[int | None]:
  return list(range(num_layers)) if path[0] == "blocks" else [None]


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of one HF tensor for our (possibly stacked) parameter shape."""
  per_layer = shape[1:] if path[0] == "blocks" else shape
  return per_layer[::-1] if path[-1] == "kernel" else per_layer


def _is_ignorable(name: str, tied: bool) -> bool:
  """Tensors a checkpoint may carry that we do not need: a tied head, rope buffers."""
  return (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


# --- reading safetensors -----------------------------------------------------------------

class _SafetensorsCheckpoint:
  """Tensor name -> array over a single-file or sharded safetensors checkpoint.

  Tensors come from the safetensors NumPy API. Only bfloat16 ones are read from the raw
  bytes (with ml_dtypes), because safetensors' NumPy path could not return bfloat16 before
  recent releases and bf16 is how most checkpoints are published.
  """

  def __init__(self, path: Path, stack: ExitStack):
    files = self._files(path)
    self._handles = {f: stack.enter_context(safe_open(f, framework="np")) for f in set(files)}
    self._file_of = {name: f for f in self._handles for name in self._handles[f].keys()}
    self._headers = {}  # file -> (data start, header), read only for files with BF16 tensors

  @staticmethod
  def _files(path: Path) -> list[str]:
    index = os.path.join(path, _INDEX_FILE)
    if os.path.exists(index):
      with open(index) as fh:
        return [os.path.join(path, f) for f in json.load(fh)["weight_map"].values()]
    single = os.path.join(path, _SINGLE_FILE)
    if os.path.exists(single):
      return [single]
    raise UserError(f"{path}: no {_SINGLE_FILE} or {_INDEX_FILE} (only safetensors "
                    "checkpoints are supported, not pytorch_model.bin)")

  def names(self) -> set[str]:
    return set(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._file_of[name]
    if self._handles[file].get_slice(name).get_dtype() == "BF16":
      return self._read_bfloat16(file, name)
    return self._handles[file].get_tensor(name)

  def _read_bfloat16(self, file: str, name: str) -> np.ndarray:
    """One BF16 tensor, memory-mapped (layout: an 8-byte header length, a JSON header, data)."""
    if file not in self._headers:
      with open(file, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        self._headers[file] = (8 + header_len, json.loads(fh.read(header_len)))
    data_start, header = self._headers[file]
    offset = data_start + header[name]["data_offsets"][0]
    return np.memmap(file, dtype=ml_dtypes.bfloat16, mode="r", offset=offset,
                     shape=tuple(header[name]["shape"]))


def _check_tensor_names(ckpt: _SafetensorsCheckpoint, expected: set[str], tied: bool,
                        path: Path) -> None:
  available = ckpt.names()
  missing = sorted(expected - available)
  unexpected = sorted(n for n in available - expected if not _is_ignorable(n, tied))
  problems = []
  if missing:
    problems.append(f"missing tensors: {_short_list(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_short_list(unexpected)}")
  if problems:
    raise UserError(f"{path}: checkpoint does not match its config.json; "
                    + "; ".join(problems))


def _short_list(names: list[str], limit: int = 10) -> str:
  more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _load_param(ckpt: _SafetensorsCheckpoint, path: tuple[str, ...], shape: tuple[int, ...],
                num_layers: int, dtype: np.dtype) -> np.ndarray:
  """Our parameter at `path`: the HF tensor(s) transposed, stacked and cast to `dtype`.

  Filled layer by layer into one preallocated array, so the host holds at most one
  extra copy of a single stacked parameter.
  """
  out = np.empty(shape, dtype)
  for layer in _layers_of(path, num_layers):
    name = _hf_name(path, layer)
    if ckpt.shape(name) != _hf_shape(path, shape):
      raise UserError(f"tensor {name} has shape {ckpt.shape(name)}; config.json implies "
                      f"{_hf_shape(path, shape)}")
    tensor = ckpt[name]
    tensor = tensor.T if path[-1] == "kernel" else tensor
    if layer is None:
      out[...] = tensor
    else:
      out[layer] = tensor
  return out  # host memory: the caller places it (replicated or sharded) on devices


# --- public API --------------------------------------------------------------------------

def read_config(path: Path) -> dict[str, Any]:
  """config.json of a checkpoint directory, or the same dict from a GGUF file's metadata."""
  path = gguf.resolve_path(path)
  if gguf.is_gguf(path):
    return gguf.hf_config(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise UserError(f"model_path {os.fspath(path)!r}: no config.json there (expected a local "
                    "Hugging Face checkpoint directory)")
  with open(config_file) as fh:
    return json.load(fh)


def from_pretrained(path: Path, dtype: str = "float32", *, param_dtype=jnp.float32,
                    scan_layers: bool = False, attention: str = "auto"
                    ) -> tuple[Transformer, Any]:
  """(model, tokenizer) from a local Hugging Face checkpoint directory.

  dtype: compute dtype of activations ("float32", "bfloat16", "float16"); `scan_layers`,
  `attention`: as in ModelConfig.
  param_dtype: dtype the parameters are stored in (checkpoint tensors are cast to it).
  The tokenizer is None when the directory has no tokenizer files.
  `path`: a checkpoint directory, a `.gguf` file, or `pkg:PACKAGE/FILE` (see gguf.py).
  """
  path = gguf.resolve_path(path)
  cfg = config_from_hf(read_config(path)).replace(dtype=dtype, scan_layers=scan_layers,
                                                       attention=attention)
  model, _ = _load(path, cfg, param_dtype, extra_tensors=())
  return model, load_tokenizer(path)


def sequence_classifier_from_pretrained(path: Path, dtype: str = "float32", *,
                                        param_dtype=jnp.float32):
  """(backbone, score [num_labels, D], tokenizer) of a *ForSequenceClassification checkpoint.

  The Qwen2 / Llama / Qwen3 reward-model layout: the decoder under `model.` and a linear
  `score` head (no bias) applied to the final hidden states. The backbone's LM head is
  never used, so it is treated as tied (no `lm_head` tensor expected).
  """
  hf = read_config(path)
  cfg = config_from_hf(hf).replace(dtype=dtype, tie_word_embeddings=True)
  model, extras = _load(path, cfg, param_dtype, extra_tensors=("score.weight",))
  return model, extras["score.weight"], load_tokenizer(path)


def _load(path, cfg: ModelConfig, param_dtype, extra_tensors: tuple[str, ...]):
  """Our model filled from the checkpoint, without a random-initialised copy first."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(abstract_state))
  target = np.dtype(jnp.dtype(param_dtype))
  with ExitStack() as stack:
    ckpt = (gguf.GGUFCheckpoint(path, read_config(path)) if gguf.is_gguf(path)
            else _SafetensorsCheckpoint(path, stack))
    expected = {_hf_name(p, layer) for p, _ in flat for layer in _layers_of(p, cfg.num_layers)}
    _check_tensor_names(ckpt, expected | set(extra_tensors), cfg.tie_word_embeddings, path)
    loaded = [(p, var.replace(_load_param(ckpt, p, var.shape, cfg.num_layers, target)))
              for p, var in flat]
    extras = {name: jnp.asarray(np.asarray(ckpt[name], target)) for name in extra_tensors}
  return nnx.merge(graphdef, nnx.from_flat_state(loaded)), extras


def eos_token_ids(path: Path, tokenizer) -> tuple[int, ...]:
  """Every id that ends a completion: generation_config.json's eos ids and the tokenizer's.

  Chat models stop on an end-of-turn token (Qwen's <|im_end|>, Llama 3's <|eot_id|>) that
  generation_config.json lists beside the plain end-of-text token. A GGUF file declares
  one in its metadata.
  """
  path = gguf.resolve_path(path)
  if gguf.is_gguf(path):
    declared = list(gguf.eos_token_ids(path))
  else:
    declared = _read_json_or_empty(os.path.join(path, "generation_config.json")).get(
        "eos_token_id")
  ids = list(declared) if isinstance(declared, list) else [declared]
  ids.append(getattr(tokenizer, "eos_token_id", None))
  ids = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
  if not ids:
    raise UserError(f"{path}: no eos token id in generation_config.json or the tokenizer")
  return ids


def load_tokenizer(path: Path):
  """The checkpoint's tokenizer, or None if the directory holds no tokenizer files.

  A tokenizer saved as a generic fast tokenizer is loaded as one: transformers 5's
  AutoTokenizer would otherwise swap in the model family's class for some families
  (qwen2), which rebuilds the pre-tokenizer and changes the ids of a custom tokenizer.
  A GGUF file's tokenizer is built by transformers from the file.
  """
  path = gguf.resolve_path(path)
  if gguf.is_gguf(path):
    return gguf.load_tokenizer(path)
  if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    return None
  import transformers  # heavy import, only needed when there is a tokenizer
  declared = _read_json_or_empty(os.path.join(path, "tokenizer_config.json"))
  if declared.get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES:
    return transformers.PreTrainedTokenizerFast.from_pretrained(os.fspath(path))
  return transformers.AutoTokenizer.from_pretrained(os.fspath(path))


def _read_json_or_empty(file: str) -> dict[str, Any]:
  if not os.path.isfile(file):
    return {}
  with open(file) as fh:
    return json.load(fh)


def save_pretrained(model: Transformer, path: Path, tokenizer=None, *,
                    max_shard_size: int = _DEFAULT_SHARD_BYTES) -> None:
  """Writes `model` (and `tokenizer`) as a Hugging Face checkpoint directory.

  Tensors keep the parameters' dtype. Above `max_shard_size` bytes the weights are split
  into `model-0000k-of-0000n.safetensors` shards plus an index, as transformers does.
  Earlier weight files in `path` are removed first, so a stale index cannot shadow them.
  """
  os.makedirs(path, exist_ok=True)
  cfg = model.cfg
  tensors = list(_hf_tensors(model))
  _remove_old_weights(path)
  shards = _plan_shards(tensors, max_shard_size)
  weight_map = {}
  for k, shard in enumerate(shards):
    file = _shard_file_name(k, len(shards))
    # transformers refuses safetensors files whose metadata lacks a known "format".
    safetensors.numpy.save_file({n: get() for n, _, get in shard}, os.path.join(path, file),
                                metadata={"format": "pt"})
    weight_map.update({n: file for n, _, _ in shard})
  if len(shards) > 1:
    total = sum(nbytes for _, nbytes, _ in tensors)
    _write_json(os.path.join(path, _INDEX_FILE),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  config = hf_config_dict(cfg, str(np.dtype(model.embed_tokens[...].dtype)))
  if tokenizer is not None:
    config.update(_special_token_ids(tokenizer))
    tokenizer.save_pretrained(os.fspath(path))
  _write_json(os.path.join(path, "config.json"), config)


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, int, Callable[[], np.ndarray]]]:
  """(HF name, byte size, getter) for every tensor; getters copy one layer to host."""
  _, state = nnx.split(model)
  for path, var in nnx.to_flat_state(state):
    value = var[...]
    for layer in _layers_of(path, model.cfg.num_layers):
      nbytes = value.nbytes // (value.shape[0] if layer is not None else 1)
      yield _hf_name(path, layer), nbytes, _host_getter(value, layer, path[-1] == "kernel")


def _host_getter(value: jax.Array, layer: int | None, transpose: bool):
  def get() -> np.ndarray:
    x = np.asarray(value if layer is None else value[layer])
    return np.ascontiguousarray(x.T if transpose else x)
  return get


def _plan_shards(tensors: list, max_bytes: int) -> list[list]:
  """Greedy split in order; a tensor larger than max_bytes gets a shard of its own."""
  shards, size = [[]], 0
  for entry in tensors:
    _, nbytes, _ = entry
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  return shards


def _shard_file_name(k: int, count: int) -> str:
  """transformers' names: one `model.safetensors`, or `model-0000k-of-0000n.safetensors`."""
  return _SINGLE_FILE if count == 1 else f"model-{k + 1:05d}-of-{count:05d}.safetensors"


def _remove_old_weights(path: Path) -> None:
  patterns = (_SINGLE_FILE, _INDEX_FILE, "model-*-of-*.safetensors")
  for pattern in patterns:
    for old in glob.glob(os.path.join(glob.escape(os.fspath(path)), pattern)):
      os.remove(old)


def _special_token_ids(tokenizer) -> dict[str, int]:
  ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.pad_token_id}
  return {k: v for k, v in ids.items() if v is not None}


def _write_json(file: str, content: dict) -> None:
  with open(file, "w") as fh:
    json.dump(content, fh, indent=2, sort_keys=True)
    fh.write("\n")


# `config_from_hf` lives in `models.hf_config`; it is part of loading's public face here.
__all__ = ["config_from_hf", "read_config", "from_pretrained",
           "sequence_classifier_from_pretrained", "eos_token_ids", "load_tokenizer",
           "save_pretrained"]
