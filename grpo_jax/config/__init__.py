"""The run's config: its schema and defaults (`defaults`), one validation pass (`checks`),
what a resume may change (`resume`), and the config as the pure step's settings (`step`).
"""

from grpo_jax.config.checks import (check_known_fields, unknown_field, unknown_override,
                                    validate)
from grpo_jax.config.defaults import (DEMO_DATASET, EXPORT_FORMATS, LR_SCHEDULES, PARALLELISM,
                                      base_config, from_file)
from grpo_jax.config.resume import RESUME_FREE_FIELDS, as_json, trajectory_changes
from grpo_jax.config.step import (grpo_config, keeps_reference, lora_dropout,
                                  reward_func_specs, sampling_config)


__all__ = ["DEMO_DATASET", "EXPORT_FORMATS", "LR_SCHEDULES", "PARALLELISM",
           "RESUME_FREE_FIELDS", "as_json", "base_config", "check_known_fields", "from_file",
           "grpo_config", "keeps_reference", "lora_dropout", "reward_func_specs",
           "sampling_config", "trajectory_changes", "unknown_field", "unknown_override",
           "validate"]
