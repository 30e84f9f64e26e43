"""`python -m grpo_jax.plan`: compile a run for a TPU slice that is not here, and size it.

  python -m grpo_jax.plan --topology=v5e-8 [--config=configs/gsm8k.py] [--config.FIELD=VALUE ...]
      [--suggest] [--json=plan.json]

Builds the run's model, batch and step from the same config as `grpo_jax.train` (with
`--config.model_path=preset:qwen2.5-7b`, or a checkpoint directory whose config.json is
read, no weights), compiles the sampler, the reference pass and the update for the slice
with libtpu (no TPU needed: `pip install -e ".[tpu]"`) in the configured `parallelism`,
and prints per phase and per chip the HBM each needs, whether it fits, the collectives it
runs and a roofline estimate of its time. `--suggest` compiles other layouts (mesh
splits, remat, parameter dtype) and names the fastest one that fits.
"""

from __future__ import annotations

import json
import os
import sys

# libtpu looks for the TPU it runs on (hostnames, accelerator type, the GCE metadata
# server); on a machine without one that only costs time and warnings.
# JAX itself runs on the CPU: planning never takes the chips of a TPU VM it runs on.
for _key, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TF_CPP_MIN_LOG_LEVEL", "3"),
                     ("JAX_PLATFORMS", "cpu")):
  os.environ.setdefault(_key, _value)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from grpo_jax import cli  # noqa: E402
from grpo_jax import config as config_lib  # noqa: E402
from grpo_jax.errors import UserError  # noqa: E402
from grpo_jax.plan import programs, report, suggest, topology  # noqa: E402

FLAGS = flags.FLAGS


def plan_for(config, slice_: topology.Slice, devices=None) -> dict:
  """Compiles `config` for the slice; the plan as a dict (report.plan_dict)."""
  config_lib.validate(config)
  plan = programs.compile_plan(config, devices or slice_.devices(),
                               limit=slice_.memory_limit(config.memory_limit_gib))
  return report.plan_dict(plan, slice_, config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    slice_ = topology.parse(FLAGS.topology)
    config = FLAGS.config
    result = plan_for(config, slice_)
    print(report.format_plan(result))
    if FLAGS.suggest:
      best, tried = suggest.suggest(config, slice_)
      print("\n" + suggest.format_suggestion(best, tried))
      result = {"plan": result, "suggestion": best, "tried": tried}
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump(result, f, indent=1)
  except UserError as e:
    sys.exit(f"grpo_jax.plan: error: {e}")


def run():
  flags.DEFINE_string("topology", None, "TPU slice: v4-32, v5litepod-16 (v5e-16), v5p-8, "
                      "v6e-8, or libtpu's v5e:2x4.", required=True)
  flags.DEFINE_bool("suggest", False, "Also try other layouts; print the fastest that fits.")
  flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
  cli.errors_in_one_line(lambda: config_flags.DEFINE_config_file(
      "config", str(cli.DEFAULT_CONFIG), "Training config file.", lock_config=True))
  app.run(main, flags_parser=lambda argv: cli.errors_in_one_line(
      lambda: FLAGS(argv)))


if __name__ == "__main__":
  run()
