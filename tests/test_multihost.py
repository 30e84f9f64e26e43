"""A 2-process CPU "pod" (jax.distributed over gloo) trains like one 4-device process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from grpo_jax import metrics, train
from test_train import final_params, tiny_config

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_pod(user_files, workdir, **overrides):
  """Both processes of the pod, to the end; asserts each exited 0."""
  port, data = str(free_port()), user_files / "data.jsonl"
  env = {**os.environ, "PYTHONPATH": str(user_files)}
  workers = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), port,
                               str(workdir), str(data), json.dumps(overrides)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  outputs = [w.communicate(timeout=400)[0] for w in workers]
  for w, out in zip(workers, outputs):
    assert w.returncode == 0, out[-3000:]


def test_two_hosts_match_one_host(user_files):
  workdir, data = user_files / "pod", user_files / "data.jsonl"
  run_pod(user_files, workdir)

  config = tiny_config(dataset=f"json:{data}", prompt_column="question",
                       reward_funcs="my_rewards:stop_at", max_steps=4, checkpoint_every=2,
                       eval_size=4)
  train.train_and_evaluate(config, user_files / "single")  # this process: 4 devices

  pod, single = (metrics.read_metrics(workdir / "grpo_metrics"),
                 metrics.read_metrics(user_files / "single" / "grpo_metrics"))
  for key in ("loss", "reward", "kl", "grad_norm"):
    a = [r[key] for r in pod if key in r]
    b = [r[key] for r in single if key in r]
    assert len(a) == len(b) == 4, key
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=key)
  assert [r["eval/accuracy"] for r in pod if "eval/accuracy" in r] == [
      r["eval/accuracy"] for r in single if "eval/accuracy" in r]
  (step_a, state_a), (step_b, state_b) = final_params(workdir), final_params(user_files / "single")
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  # Only process 0 wrote the metrics: one raw line per step, not one per process.
  lines = (workdir / "grpo_metrics" / "metrics.jsonl").read_text().splitlines()
  assert sum('"loss"' in line for line in lines) == 4


def test_dynamic_sampling_rounds_are_agreed_by_both_hosts(user_files):
  """Each host keeps its own share of informative groups (2 of the 4 per round); rounds
  go on until both have theirs: the hosts' sampler calls must pair up, or the pod hangs."""
  workdir = user_files / "pod"
  run_pod(user_files, workdir, dynamic_sampling=True, max_num_gen_batches=3, max_steps=3,
          eval_size=0, checkpoint_every=3)
  rows = [r for r in metrics.read_metrics(workdir / "grpo_metrics") if "loss" in r]
  rounds = [r["dynamic_sampling/rounds"] for r in rows]
  assert len(rows) == 3 and sum(rounds) > 3  # some steps sampled again
  for row in rows:
    assert 0 <= row["dynamic_sampling/kept_groups"] <= 4
    assert row["dynamic_sampling/kept_groups"] == 4 or row["dynamic_sampling/rounds"] == 3
  meta = json.loads((workdir / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["data"]["position"] == 4 * sum(rounds)


@pytest.mark.slow  # a third 2-process pod (about a minute)
def test_tool_turns_are_agreed_by_both_hosts(user_files):
  """Multi-turn rollouts: a host whose rows made no call still runs every decode and
  append phase the other host needs (each is one collective program), so the pod finishes
  and trains like one process with 4 devices."""
  tools = dict(tools="calculator", tool_call_format="my_rewards:call_at_every_eos",
               max_completion_length=48, max_tool_calling_iterations=2, max_steps=2,
               checkpoint_every=2, eval_size=0)
  workdir, data = user_files / "pod", user_files / "data.jsonl"
  run_pod(user_files, workdir, **tools)
  config = tiny_config(dataset=f"json:{data}", prompt_column="question",
                       reward_funcs="my_rewards:stop_at", **tools)
  train.train_and_evaluate(config, user_files / "single")
  pod, single = ([r for r in metrics.read_metrics(w / "grpo_metrics") if "loss" in r]
                 for w in (workdir, user_files / "single"))
  assert len(pod) == len(single) == 2
  assert sum(r["tools/calls_per_completion"] for r in single) > 0
  for a, b in zip(pod, single):
    for key in ("tools/calls_per_completion", "tools/turns", "completions/mean_length",
                "reward"):
      assert a[key] == b[key], key
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)
