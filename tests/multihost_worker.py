"""One process of a 2-process CPU "pod" (2 devices each), started by tests/test_multihost.py.

  python tests/multihost_worker.py PROCESS_ID PORT WORKDIR DATASET [OVERRIDES_JSON]

Runs the main job with jax.distributed over gloo CPU collectives: pmap then spans the 4
devices of both processes, each process feeds its 2 with its share of the prompts.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
  process_id, port, workdir, dataset = sys.argv[1:5]
  overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_train import tiny_config  # the same tiny config as the single-process runs

  from grpo_jax import train
  config = tiny_config(**{
      "dataset": f"json:{dataset}", "prompt_column": "question",
      "reward_funcs": "my_rewards:stop_at", "max_steps": 4, "checkpoint_every": 2,
      "eval_size": 4, "distributed": "no", **overrides})  # (initialised above, explicitly)
  train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  main()
