"""Hugging Face `config.json` <-> our ModelConfig, for the families we build (Llama 3.x,
Qwen2/2.5, Qwen3): which fields mean what, and which features we refuse."""

from __future__ import annotations

from typing import Any

from grpo_jax.errors import UserError
from grpo_jax.models.transformer import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
  """Our ModelConfig for a Hugging Face config.json dict; rejects what we would get wrong.

  Anything that changes the maths but that our decoder does not implement (sliding-window
  layers, other rope scalings, o_proj/MLP biases, other activations) is an error here,
  rather than a model that loads and silently computes something else.
  """
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UserError(
        f"config.json: model_type={model_type!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 3.x, Qwen2/Qwen2.5, Qwen3)")
  _reject_unsupported_features(hf_config, model_type)
  rope_theta, rope_scaling = _rope_from_hf(hf_config)
  required = _required(hf_config, "vocab_size", "hidden_size", "num_hidden_layers",
                       "num_attention_heads", "intermediate_size")
  heads = required["num_attention_heads"]
  return ModelConfig(
      vocab_size=required["vocab_size"],
      hidden_size=required["hidden_size"],
      num_layers=required["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or heads,
      intermediate_size=required["intermediate_size"],
      head_dim=hf_config.get("head_dim") or required["hidden_size"] // heads,
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      # transformers' default for all three families when the key is absent.
      tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
      qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias; config has no switch
      qk_norm=model_type == "qwen3",
      max_position_embeddings=hf_config.get("max_position_embeddings", 32768))


def _required(hf: dict[str, Any], *keys: str) -> dict[str, Any]:
  missing = [k for k in keys if hf.get(k) is None]
  if missing:
    raise UserError(f"config.json lacks {', '.join(missing)}")
  return {k: hf[k] for k in keys}


def _reject_unsupported_features(hf: dict[str, Any], model_type: str) -> None:
  def reject(what: str):
    raise UserError(f"config.json ({model_type}): {what} is not supported by grpo_jax's decoder")

  if hf.get("hidden_act", "silu") != "silu":
    reject(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
  if hf.get("mlp_bias"):
    reject("mlp_bias=true")
  if hf.get("attention_bias") and model_type != "qwen2":
    # In Llama/Qwen3 this flag also adds an o_proj bias, which our attention lacks.
    reject("attention_bias=true (bias on q/k/v and o_proj)")
  if hf.get("use_sliding_window"):
    reject("use_sliding_window=true (sliding-window attention)")
  other_layers = set(hf.get("layer_types") or ()) - {"full_attention"}
  if other_layers:
    reject(f"layer_types {sorted(other_layers)} (only 'full_attention')")
  if hf.get("quantization_config"):
    reject("a quantized checkpoint (quantization_config)")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
  """(rope_theta, rope_scaling) from either transformers 4 or 5 config layout.

  transformers 4 writes `rope_theta` + `rope_scaling`; transformers 5 writes one
  `rope_parameters` dict holding `rope_theta`, `rope_type` and the scaling keys.
  """
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise UserError(f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)")
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise UserError(f"config.json: rope scaling type {kind!r} is not supported; "
                    "supported: 'default' (none), 'llama3'")
  missing = [k for k in _LLAMA3_ROPE_KEYS if k not in params]
  if missing:
    raise UserError(f"config.json: llama3 rope scaling lacks {', '.join(missing)}")
  scaling = {k: params[k] for k in _LLAMA3_ROPE_KEYS}
  return theta, tuple(sorted({**scaling, "rope_type": "llama3"}.items()))


def hf_model_type(cfg: ModelConfig) -> str:
  """The Hugging Face family whose layout matches `cfg`; the features decide it uniquely.

  Qwen3 is the only family with q/k norm, Qwen2 the only one with q/k/v bias (and it
  always has it); everything else is a Llama.
  """
  if cfg.qk_norm and cfg.qkv_bias:
    raise UserError("a model with both q/k norm and q/k/v bias has no Hugging Face family "
                    f"among {', '.join(SUPPORTED_MODEL_TYPES)}")
  return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """config.json content for `cfg`, readable by transformers 4.x and 5.x.

  Rope settings use the transformers 4 keys (`rope_theta`, `rope_scaling`), which
  transformers 5 still reads and converts to its `rope_parameters`.
  """
  model_type = hf_model_type(cfg)
  out = {
      "architectures": [ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "torch_dtype": dtype,
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
    if model_type == "qwen3":
      out["attention_bias"] = False
  return out


__all__ = ["ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "config_from_hf", "hf_config_dict",
           "hf_model_type"]
