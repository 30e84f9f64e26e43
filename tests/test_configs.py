"""Every config in configs/ loads as the command line loads it and passes validation; the
recipes change exactly the fields their docstrings name."""

import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from grpo_jax import config as config_lib
from grpo_jax.rewards import resolve_reward_funcs

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
RECIPES = {  # field -> value, against configs/gsm8k.py
    "dapo": {"epsilon_high": 0.28, "beta": 0.0, "dynamic_sampling": True,
             "max_num_gen_batches": 10,
             "reward_funcs": "correctness_reward,format_reward,soft_overlong_punishment",
             "learning_rate": 1e-6, "lr_scheduler_type": "constant", "warmup_ratio": 0.02,
             "weight_decay": 0.1},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.0},
    "gspo": {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4,
             "beta": 0.0, "loss_type": "grpo", "num_iterations": 4},
    "gsm8k_lora": {"lora.rank": 16, "lora.alpha": 32.0, "lora.base_dtype": "bfloat16",
                   "learning_rate": 1e-5},
}


def load(name: str) -> ml_collections.ConfigDict:
  """configs/<name>.py through ml_collections' config_flags, as `--config=` reads it."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values)
  values(["prog", f"--config={CONFIGS / name}.py"])
  return values.config


def flat(config) -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f"{key}.{k}": v for k, v in flat(value).items()})
    else:
      out[key] = value
  return out


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_config_loads_and_validates(name):
  config = load(name)
  config_lib.validate(config)
  assert set(flat(config)) == set(flat(config_lib.base_config()))  # no unknown field


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_change_what_they_say_against_gsm8k(name, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # the recipe finds gsm8k.py beside itself, from anywhere
  recipe, base = flat(load(name)), flat(load("gsm8k"))
  changed = {k: recipe[k] for k in recipe if recipe[k] != base[k]}
  assert changed == pytest.approx(RECIPES[name]), sorted(changed)
  assert recipe["model_path"] == base["model_path"] and recipe["dataset"] == "openai/gsm8k:main"


def test_dapo_recipe_keeps_its_window_a_fifth_of_an_overridden_length():
  config = load("dapo")
  config.max_completion_length = 1000  # as --config.max_completion_length=1000 sets it
  config_lib.validate(config)
  funcs = dict(resolve_reward_funcs(config_lib.reward_func_specs(config), builtin_options={
      "max_completion_length": config.max_completion_length,
      "soft_punish_cache": config.soft_punish_cache}))
  punishment = funcs["soft_overlong_punishment_reward"]
  assert (punishment.max_completion_length, punishment.soft_punish_cache) == (1000, 200)
  assert config.loss_type == "dapo" and config.epsilon == 0.2
  assert not config.mask_truncated_completions
