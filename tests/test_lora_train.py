"""LoRA runs end to end: what is checkpointed, exact resume, the mesh layout, the logs."""

import dataclasses
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import train_on_reward_files, write_reward_files
from grpo_jax import config as config_lib
from grpo_jax import build
from grpo_jax.errors import ConfigError, UserError
from test_faults import timing
from test_train import tiny_config


def lora_config(**overrides):
  lora = {"rank": 4, "alpha": 8.0, **overrides.pop("lora", {})}
  fields = dict(prompt_column="question", reward_funcs="my_rewards:stop_at", max_steps=4,
                checkpoint_every=1, eval_every=0, num_iterations=2)
  return tiny_config(**{**fields, **overrides, "lora": lora})


@pytest.fixture
def files(tmp_path):
  files = write_reward_files(tmp_path)
  return files


def with_data(config, files):
  config.dataset = f"json:{files / 'data.jsonl'}"
  return config


def restored_state(workdir):
  step = ocp.CheckpointManager(workdir / "checkpoints").latest_step()
  return step, ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def leaf_names(tree):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("lora", [
    {"dropout": 0.1},  # dropout masks must be redrawn identically after the resume
    {"base_dtype": "bfloat16", "base_quantization": "nf4", "target_modules": "q_proj,down_proj"},
])
def test_checkpoints_hold_the_adapters_only_and_a_crash_resumes_exactly(files, tmp_path, lora,
                                                                        caplog):
  config = with_data(lora_config(lora=lora), files)
  with caplog.at_level(logging.INFO, logger="grpo_jax"):
    straight = train_on_reward_files(files, tmp_path / "straight", config)
  assert "no reference copy is kept or checkpointed" in caplog.text
  with pytest.raises(UserError, match="stopped on purpose"):
    train_on_reward_files(files, tmp_path / "run", config, stop_at=3)  # during step 3
  resumed = train_on_reward_files(files, tmp_path / "run", config)
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
  for step in straight:
    for key, value in straight[step].items():
      if not timing(key):
        assert resumed[step][key] == value, (step, key)
  (step_a, a), (step_b, b) = restored_state(tmp_path / "straight"), restored_state(tmp_path / "run")
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  # The checkpoint: adapters and their AdamW moments, nothing of the base; no reference.
  params = leaf_names(a["params"])
  assert params and all("lora_a" in n or "lora_b" in n for n in params), sorted(params)[:4]
  assert not (tmp_path / "run" / "checkpoints" / "reference").exists()
  assert not (tmp_path / "run" / "checkpoints" / "4" / "reference").exists()
  opt = [x for x in jax.tree.leaves(a["opt_state"]) if np.ndim(x) > 0]
  assert sum(x.size for x in opt) == 2 * sum(x.size for x in jax.tree.leaves(a["params"]))


def test_mesh_layout_trains_what_pmap_trains(files, tmp_path):
  pmapped = with_data(lora_config(lora={"base_quantization": "int8"}, checkpoint_every=0), files)
  meshed = with_data(lora_config(lora={"base_quantization": "int8"}, checkpoint_every=0,
                                 parallelism="mesh", mesh={"data": 1, "fsdp": 2, "tensor": 2}),
                     files)
  a = train_on_reward_files(files, tmp_path / "pmap", pmapped)
  b = train_on_reward_files(files, tmp_path / "mesh", meshed)
  for step in a:
    for key in ("loss", "kl", "grad_norm", "reward"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=2e-4, atol=1e-6,
                                 err_msg=f"{step} {key}")
  assert a[4]["kl"] > 0  # the adapters moved the policy away from the base


def test_the_fingerprint_names_the_base_weights(files, monkeypatch):
  monkeypatch.syspath_prepend(str(files))
  config = with_data(lora_config(), files)
  s = build.setup(config)
  other = dataclasses.replace(s, init_params=jax.tree.map(lambda x: x * 1.01, s.init_params))
  assert build.fingerprint(s)["lora_base_weights"] != build.fingerprint(other)["lora_base_weights"]
  assert build.architecture(s) == build.architecture(other)
  plain = build.setup(with_data(tiny_config(prompt_column="question",
                                            reward_funcs="my_rewards:stop_at"), files))
  assert "lora_base_weights" not in build.fingerprint(plain)


@pytest.mark.parametrize("field, value, message", [
    ("lora.rank", -2, "lora.rank"),
    ("lora.target_modules", "q_proj,attn", "lora.target_modules"),
    ("lora.base_quantization", "int4", "lora.base_quantization"),
    ("lora.base_dtype", "float16", "lora.base_dtype"),
    ("export_format", "gguf", "export_format"),
    ("sync_ref_model", True, "sync_ref_model"),
])
def test_bad_lora_fields_are_one_line_config_errors(field, value, message):
  config = lora_config()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


@pytest.mark.parametrize("export_format", ["merged", "peft"])
def test_the_final_export_loads_in_transformers_with_the_trained_logits(files, tmp_path,
                                                                       monkeypatch,
                                                                       export_format):
  """The CLI's export of a LoRA run (the demo model's base: written beside a PEFT adapter)
  gives, in transformers (+ peft), the logits grpo_jax computes from the final checkpoint."""
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from grpo_jax.models import lora  # noqa: PLC0415
  config = with_data(lora_config(export_hf="export", export_format=export_format,
                                 lora={"target_modules": "q_proj,v_proj,up_proj"}), files)
  train_on_reward_files(files, tmp_path / "run", config)
  monkeypatch.syspath_prepend(str(files))
  s = build.setup(config)
  _, saved = restored_state(tmp_path / "run")
  adapters = jax.tree.unflatten(jax.tree.structure(s.adapters_like),
                                jax.tree.leaves(saved["params"]))
  ids = np.array([[0, 0, 5, 9, 12, 7], [3, 4, 8, 8, 10, 11]], np.int32)
  mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int32)
  ours = np.asarray(nnx.merge(s.model_def, lora.policy_params(s.init_params, adapters))(
      jnp.asarray(ids), jnp.asarray(mask)))
  export = tmp_path / "run" / "export"
  if export_format == "peft":
    import peft  # noqa: PLC0415
    assert (export / "adapter_model.safetensors").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(export / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, export)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
                   ).logits.float().numpy()
  real = mask.astype(bool)
  assert np.abs(ours - theirs)[real].max() < 1e-4
  base_logits = np.asarray(nnx.merge(s.reference_def, s.init_params)(jnp.asarray(ids),
                                                                     jnp.asarray(mask)))
  assert np.abs(ours - base_logits)[real].max() > 1e-3  # the adapters trained
