"""Hugging Face checkpoints against transformers' PyTorch models with random weights.

Every model is built locally (no hub): a tiny config, weights drawn large enough that a
missed bias, norm, transpose or rope detail changes the logits well beyond tolerance.
"""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from grpo_jax import sampling
from grpo_jax.data import demo
from grpo_jax.errors import UserError
from grpo_jax.models import config_from_hf, from_pretrained, hf, save_pretrained

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96)
# A short original context, so Llama 3 scaling changes every regime within 8 positions:
# wavelengths 6.3 (kept), 19.9 and 62.8 (smoothed), >= 198 (divided by the factor).
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=LLAMA3_SCALING)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(tie_word_embeddings=True, head_dim=24)),  # q width 96 != hidden 64
}
IDS = np.array([[0, 0, 0, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17],
                [0, 0, 0, 0, 0, 0, 40, 41]])
MASK = (np.arange(8)[None] >= np.array([3, 0, 6])[:, None]).astype(np.int64)
REAL = MASK.astype(bool)


def build_hf_model(family: str, seed: int = 0):
  """A transformers model whose every weight, norm scale and bias is far from its init."""
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(seed)
  # transformers writes into the rope dict it is given, so give it a copy.
  model = model_cls(config_cls(**COMMON, **copy.deepcopy(extra))).eval()
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim >= 2:
        param.normal_(0.0, 0.5)
      else:  # RMSNorm scales (init 1) and q/k/v biases (init 0)
        param.add_(0.3 * torch.randn_like(param))
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (transformers model, directory it was saved to)."""
  out = {}
  for family in FAMILIES:
    model = build_hf_model(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    out[family] = (model, path)
  return out


def hf_logits(model, ids=IDS, mask=MASK):
  # transformers' forward numbers positions 0..T-1 whatever the mask; give it the
  # padding-aware positions that generation (and our model) use.
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def our_logits(model, ids=IDS, mask=MASK):
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def max_diff(a, b):
  return np.abs(a - b)[REAL].max()


def params_of(model):
  return jax.tree.leaves(nnx.state(model))


def assert_same_params(a, b):
  for x, y in zip(params_of(a), params_of(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- parity with transformers ------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_on_left_padded_batch(checkpoints, family):
  hf_model, path = checkpoints[family]
  model, tokenizer = from_pretrained(path)
  assert tokenizer is None  # the directory holds no tokenizer files
  expected = hf_logits(hf_model)
  assert expected[REAL].std() > 1.0  # non-trivial outputs
  assert max_diff(our_logits(model), expected) <= 1e-4


@pytest.mark.parametrize("scan_layers, kernel", [(False, "xla"), (True, "xla"),
                                                  (False, "flash")])
def test_long_sequences_match_transformers(checkpoints, scan_layers, kernel):
  """Sequences longer than one causal attention block (left padding crossing a block
  edge): the blocked attention and the flash kernel of full-sequence passes match
  transformers."""
  from grpo_jax.models import attention
  t = 2 * attention.ATTENTION_BLOCK + 37
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 128, size=(2, t))
  mask = (np.arange(t)[None] >= np.array([0, attention.ATTENTION_BLOCK + 5])[:, None])
  hf_model, path = checkpoints["qwen2"]
  model, _ = from_pretrained(path, scan_layers=scan_layers, attention=kernel)
  real = mask.astype(bool)
  diff = np.abs(our_logits(model, ids, mask.astype(np.int64))
                - hf_logits(hf_model, ids, mask.astype(np.int64)))[real]
  assert diff.max() <= 5e-4  # logits reach ~20; the unblocked pass differs by 3e-4 too


def test_llama3_rope_scaling_is_applied(checkpoints, tmp_path):
  """Without the scaling the same weights give clearly different logits."""
  hf_model, path = checkpoints["llama"]
  unscaled = tmp_path / "unscaled"
  shutil.copytree(path, unscaled)
  config = json.loads((unscaled / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
  (unscaled / "config.json").write_text(json.dumps(config))
  model, _ = from_pretrained(unscaled)
  assert model.cfg.rope_scaling is None
  assert max_diff(our_logits(model), hf_logits(hf_model)) > 0.1


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_matches_transformers(checkpoints, family):
  hf_model, path = checkpoints[family]
  hf_model.generation_config.eos_token_id = None  # run all 16 steps
  hf_model.generation_config.pad_token_id = 0
  with torch.no_grad():
    out = hf_model.generate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                            do_sample=False, max_new_tokens=16)
  expected = out[:, IDS.shape[1]:].numpy()
  assert expected.shape == (3, 16) and len(np.unique(expected)) > 5
  never_produced = int(np.setdiff1d(np.arange(128), expected)[0])

  model, _ = from_pretrained(path)
  cfg = sampling.SamplingConfig(max_completion_length=16, eos_token_ids=(never_produced,),
                                greedy=True)
  graphdef, params = nnx.split(model)
  generate = jax.jit(sampling.generate, static_argnums=(0, 5))
  rollout = generate(graphdef, params, jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK),
                     jax.random.key(0), cfg)
  np.testing.assert_array_equal(np.asarray(rollout.completion_ids), expected)


# --- saving ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_then_load_is_exact_and_transformers_reads_it(checkpoints, family, tmp_path):
  hf_model, path = checkpoints[family]
  model, _ = from_pretrained(path)
  save_pretrained(model, tmp_path)

  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == family
  with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
    assert ("lm_head.weight" in f.keys()) == (not model.cfg.tie_word_embeddings)
  assert_same_params(from_pretrained(tmp_path)[0], model)

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  assert type(reloaded) is type(hf_model)
  assert max_diff(hf_logits(reloaded), our_logits(model)) <= 1e-4


def test_sharded_checkpoints_load_and_save(checkpoints, tmp_path):
  hf_model, path = checkpoints["qwen3"]
  single, _ = from_pretrained(path)
  hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert_same_params(from_pretrained(tmp_path / "hf")[0], single)

  ours = tmp_path / "ours"
  save_pretrained(single, ours, max_shard_size=20_000)
  index = json.loads((ours / "model.safetensors.index.json").read_text())
  shards = set(index["weight_map"].values())
  assert len(shards) > 2 and not (ours / "model.safetensors").exists()
  assert_same_params(from_pretrained(ours)[0], single)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
  assert max_diff(hf_logits(reloaded), our_logits(single)) <= 1e-4

  save_pretrained(single, ours)  # one file again: the old shards and index must go
  assert sorted(p.name for p in ours.glob("model*")) == ["model.safetensors"]


def test_bfloat16_checkpoint(checkpoints, tmp_path):
  hf_model, path = checkpoints["qwen2"]
  float32_model, _ = from_pretrained(path)
  build_hf_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="np") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"

  model, _ = from_pretrained(tmp_path / "bf16")  # upcast to float32 parameters
  for got, full in zip(params_of(model), params_of(float32_model), strict=True):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, full.astype(jnp.bfloat16).astype(jnp.float32))
  logits = our_logits(model)
  upcast_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16",
                                                                dtype=torch.float32)
  assert max_diff(logits, hf_logits(upcast_hf)) <= 1e-4
  scale = np.abs(hf_logits(hf_model)[REAL]).max()
  rounding_error = np.abs(logits - hf_logits(hf_model))[REAL]  # same model, rounded weights
  assert 0 < rounding_error.mean() < 0.01 * scale and rounding_error.max() < 0.1 * scale

  kept, _ = from_pretrained(tmp_path / "bf16", param_dtype=jnp.bfloat16)
  assert {p.dtype for p in params_of(kept)} == {jnp.dtype(jnp.bfloat16)}
  save_pretrained(kept, tmp_path / "again")
  with safe_open(str(tmp_path / "again" / "model.safetensors"), framework="np") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
  assert_same_params(from_pretrained(tmp_path / "again", param_dtype=jnp.bfloat16)[0], kept)


def test_tokenizer_is_saved_and_loaded(checkpoints, tmp_path):
  model, _ = from_pretrained(checkpoints["qwen2"][1])
  tokenizer = demo.build_demo_tokenizer()
  save_pretrained(model, tmp_path, tokenizer)
  _, reloaded = from_pretrained(tmp_path)
  text = "12+7=19 #### 19"
  assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
  config = json.loads((tmp_path / "config.json").read_text())
  assert (config["eos_token_id"], config["pad_token_id"]) == (tokenizer.eos_token_id,
                                                              tokenizer.pad_token_id)


def test_loading_never_builds_a_concrete_random_model(checkpoints, monkeypatch):
  """The only Transformer built while loading is abstract (traced), so no random copy."""
  traced = []
  real = hf.Transformer

  def spy(cfg, rngs):
    model = real(cfg, rngs)
    traced.append(isinstance(model.embed_tokens[...], jax.core.Tracer))
    return model

  monkeypatch.setattr(hf, "Transformer", spy)
  from_pretrained(checkpoints["llama"][1])
  assert traced == [True]


# --- config and errors -------------------------------------------------------------------

def test_config_reads_both_transformers_rope_layouts():
  base = {"model_type": "llama", **COMMON}
  v4 = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING})
  v5 = config_from_hf({**base, "rope_parameters": {**LLAMA3_SCALING, "rope_theta": 500000.0}})
  assert v4 == v5
  assert v4.rope_theta == 500000.0 and dict(v4.rope_scaling)["factor"] == 8.0
  assert (v4.head_dim, v4.tie_word_embeddings, v4.qkv_bias, v4.qk_norm) == (16, False, False,
                                                                             False)


def test_config_without_a_required_field_names_it():
  with pytest.raises(UserError, match="lacks intermediate_size"):
    config_from_hf({"model_type": "qwen3", **COMMON, "intermediate_size": None})


def test_unsupported_model_type_lists_supported_families(tmp_path):
  with pytest.raises(UserError, match="'mistral'.*llama, qwen2, qwen3"):
    config_from_hf({"model_type": "mistral", **COMMON})
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(UserError, match="'gpt2'.*llama, qwen2, qwen3"):
    from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
     "sliding_attention"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "'linear'"),
    ({"attention_bias": True}, "o_proj"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_features_are_rejected(change, message):
  with pytest.raises(UserError, match=message):
    config_from_hf({"model_type": "llama", **COMMON, **change})


def test_missing_and_unexpected_tensors_are_named(checkpoints, tmp_path):
  _, path = checkpoints["qwen2"]  # tied: a stray lm_head.weight is harmless
  tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
  shutil.copy(path / "config.json", tmp_path / "config.json")
  weights = str(tmp_path / "model.safetensors")

  safetensors.numpy.save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]},
                              weights, metadata={"format": "pt"})
  from_pretrained(tmp_path)

  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(UserError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"
                                      r".*unexpected tensors: model\.layers\.0\.self_attn\.o_proj"):
    from_pretrained(tmp_path)


def test_directory_without_config_or_weights_is_a_user_error(checkpoints, tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    from_pretrained(tmp_path)
  shutil.copy(checkpoints["llama"][1] / "config.json", tmp_path / "config.json")
  with pytest.raises(UserError, match="no model.safetensors"):
    from_pretrained(tmp_path)
