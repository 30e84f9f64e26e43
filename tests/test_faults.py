"""Preemption, kills, corrupt checkpoints, non-finite updates: the run survives or says why.

The CLI runs are real processes (signals, kill -9) on one CPU device; each compares with
an uninterrupted run of the same command: resumed params must be bitwise equal and every
step's metrics identical (timings aside), each step logged exactly once.
"""

import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import grpo, metrics, train
from grpo_jax.layouts import pmap
from test_train import TINY, TINY_MODEL, cli_args, final_params, tiny_config

FAULT_REWARDS = '''
import math, os, signal, time

calls = 0


def faulty(prompts, completions, **columns):
  """A plain reward; on call SIGNAL_AT it signals its own process (SIGNAL, default SIGTERM)
  and then keeps working for SLEEP_AFTER_SIGNAL seconds (a slow reward function)."""
  global calls
  calls += 1
  if calls == int(os.environ.get("SIGNAL_AT", "0")):
    wait_for = os.environ.get("WAIT_FOR_PATH")  # e.g. a checkpoint still being committed
    deadline = time.monotonic() + 120
    while wait_for and not os.path.exists(wait_for) and time.monotonic() < deadline:
      time.sleep(0.05)
    for _ in range(int(os.environ.get("SIGNAL_TIMES", "1"))):
      os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL", "SIGTERM")))
      time.sleep(0.05)
    time.sleep(float(os.environ.get("SLEEP_AFTER_SIGNAL", "0")))
  return [float(len(c) % 3 == 0) + 0.1 * c.count("1") for c in completions]


def nan_after(prompts, completions, **columns):
  """NaN for every completion from call NAN_FROM on (a reward function gone wrong)."""
  global calls
  calls += 1
  if calls >= int(os.environ.get("NAN_FROM", "1")):
    return [math.nan] * len(completions)
  return [float(len(c) % 2) for c in completions]
'''

TIMING = ("step_time", "tokens_per_second", "steps_per_sec", "uptime")


def timing(key: str) -> bool:
  return key in TIMING or key.startswith("time/") or key.endswith("seconds")


@pytest.fixture(scope="module")
def fault_files(tmp_path_factory):
  """The reward module and dataset, shared by the tests (each has its own workdir)."""
  files = tmp_path_factory.mktemp("fault_files")
  (files / "fault_rewards.py").write_text(FAULT_REWARDS)
  rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(7) for b in range(5)]
  (files / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  return files


@pytest.fixture(scope="module")
def straight(fault_files):
  """The uninterrupted run the interrupted ones must reproduce (an eval every 3 steps)."""
  workdir = fault_files / "straight"
  done = run(fault_files, fault_args(fault_files, workdir))
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def fault_args(files, workdir, **overrides):
  config = {**TINY, "model": TINY_MODEL, "dataset": f"json:{files / 'data.jsonl'}",
            "prompt_column": "question", "reward_funcs": "fault_rewards:faulty",
            "max_steps": 7, "checkpoint_every": 3, "eval_every": 3, "eval_size": 8,
            **overrides}
  return [f"--workdir={workdir}", *cli_args(config)]


def cli_env(files, **env):
  out = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **env}
  out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(files), out.get("PYTHONPATH")]))
  return out


def start(files, args, **env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "grpo_jax.train", *args], cwd=files,
                          env=cli_env(files, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def run(files, args, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "grpo_jax.train", *args], cwd=files,
                        env=cli_env(files, **env), capture_output=True, text=True, timeout=600)


def last_line(proc) -> str:
  return proc.stderr.strip().splitlines()[-1]


def assert_same_run(straight: pathlib.Path, resumed: pathlib.Path, max_steps: int):
  """Bitwise equal final params; every step's metrics identical and logged once."""
  (step_a, state_a), (step_b, state_b) = final_params(straight), final_params(resumed)
  assert step_a == step_b == max_steps
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  records = {}
  for name, workdir in (("straight", straight), ("resumed", resumed)):
    rows = metrics.read_metrics(workdir / "grpo_metrics")
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, max_steps + 1)), (name, train_steps)
    records[name] = {(r["step"], k): v for r in rows for k, v in r.items()
                     if k != "step" and not timing(k)}
  assert records["straight"] == records["resumed"]


# -- signals -------------------------------------------------------------------------------

@pytest.mark.parametrize("signame, code", [
    ("SIGTERM", 143), pytest.param("SIGINT", 130, marks=pytest.mark.slow)])  # same path
def test_signal_during_rewards_checkpoints_and_the_rerun_matches(fault_files, straight, tmp_path,
                                                                signame, code):
  """The signal lands in the reward function of step 5 (after the checkpoint and the eval
  of step 3; reward calls: eval 0, steps 1-3, eval 3, steps 4, 5): step 5 is abandoned,
  step 4 checkpointed, exit 143/130 with one line; the rerun of the same command ends
  where an uninterrupted run ends, bit for bit."""
  workdir = tmp_path / "run"
  args = fault_args(fault_files, workdir)
  stopped = run(fault_files, args, SIGNAL_AT="7", SIGNAL=signame)
  assert stopped.returncode == code, stopped.stderr[-3000:]
  line = last_line(stopped)
  assert line.startswith(f"grpo_jax: stopped by {signame} after step 4 of 7"), line
  assert str(workdir / "checkpoints") in line and "Traceback" not in stopped.stderr
  assert final_params(workdir)[0] == 4
  done = run(fault_files, args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed from the checkpoint of step 4" in done.stderr
  assert_same_run(straight, workdir, 7)


def test_sigterm_at_a_random_step_loses_no_step(fault_files, straight, tmp_path):
  """SIGTERM from outside, as a preemption notice comes, once a random step is logged."""
  step = random.Random(os.environ.get("GRPO_JAX_FAULT_SEED", "12")).randint(1, 6)
  workdir = tmp_path / "run"
  args = fault_args(fault_files, workdir)
  proc = start(fault_files, args)
  jsonl = workdir / "grpo_metrics" / "metrics.jsonl"
  while proc.poll() is None:
    if jsonl.exists() and any(json.loads(l).get("step") == step and "loss" in json.loads(l)
                              for l in jsonl.read_text().splitlines() if l.endswith("}")):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 143, stderr[-3000:]
  line = stderr.strip().splitlines()[-1]
  assert line.startswith("grpo_jax: stopped by SIGTERM after step "), line
  stopped_after = int(line.split("after step ")[1].split()[0])
  assert stopped_after >= step
  assert final_params(workdir)[0] == stopped_after  # the finished step was checkpointed
  done = run(fault_files, args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_run(straight, workdir, 7)


def test_second_signal_and_grace_expiry_exit_at_once_and_stay_resumable(fault_files, tmp_path):
  workdir = tmp_path / "run"
  args = fault_args(fault_files, workdir)
  # Ctrl-C twice, once step 3's asynchronous save is committed (under load it can still be
  # in flight at step 5, and an exit at once abandons it by design: see the kill -9 tests)
  twice = run(fault_files, args, SIGNAL_AT="7", SIGNAL_TIMES="2", SLEEP_AFTER_SIGNAL="30",
              SIGNAL="SIGINT", WAIT_FOR_PATH=str(workdir / "checkpoints" / "3"))
  assert twice.returncode == 130
  assert "grpo_jax: second SIGINT: exiting at once" in last_line(twice)
  assert final_params(workdir)[0] == 3  # the last periodic checkpoint
  slow = run(fault_files, [*args, "--config.preemption_grace_seconds=1"], SIGNAL_AT="2",
             SLEEP_AFTER_SIGNAL="60")  # a reward function that outlasts the grace period
  assert slow.returncode == 143
  assert "could not stop within preemption_grace_seconds=1" in last_line(slow)
  done = run(fault_files, args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert final_params(workdir)[0] == 7


# -- kill -9 -------------------------------------------------------------------------------

def demo_args(workdir, **overrides):
  config = {**TINY, "model": TINY_MODEL, "sft_steps": 40, "sft_batch_size": 8,
            "max_prompt_length": 8, "max_completion_length": 12, "max_steps": 6,
            "checkpoint_every": 1, "eval_every": 3, **overrides}
  return [f"--workdir={workdir}", *cli_args(config)]


def saving(workdir: pathlib.Path) -> bool:
  """Whether a save is in flight: a warm-up or Orbax temporary directory exists."""
  for parent in (workdir, workdir / "checkpoints"):
    if parent.is_dir() and any("tmp" in p.name for p in parent.iterdir()):
      return True
  return False


def kill_moments(count: int, rng: random.Random):
  """`count` moments to kill -9 at: inside the warm-up save, inside checkpoint saves, and
  after random steps, with a random delay, in random order."""
  saves = max(2, count // 3)
  moments = ["saving"] * saves + [f"step:{rng.randint(1, 6)}" for _ in range(count - saves)]
  rng.shuffle(moments)
  return [(m, rng.uniform(0.0, 0.05)) for m in moments]


def kill_at(proc, workdir: pathlib.Path, moment: str, delay: float) -> bool:
  """Kills `proc` at `moment`; False if it finished first."""
  jsonl = workdir / "grpo_metrics" / "metrics.jsonl"
  while proc.poll() is None:
    if moment == "saving":
      hit = saving(workdir)
    else:
      step = int(moment.split(":")[1])
      hit = jsonl.exists() and f'"step": {step},' in jsonl.read_text()
    if hit:
      time.sleep(delay)
      proc.kill()
      proc.communicate()
      return True
    time.sleep(0.002)
  proc.communicate()
  return False


def kill_nine_many_times(tmp_path, count: int):
  straight = tmp_path / "straight"
  subprocess.run([sys.executable, "-m", "grpo_jax.train", *demo_args(straight)],
                 env=cli_env(tmp_path), check=True, capture_output=True, timeout=600)
  workdir = tmp_path / "run"
  rng = random.Random(int(os.environ.get("GRPO_JAX_FAULT_SEED", "7")))
  killed = 0
  for moment, delay in kill_moments(count, rng):
    proc = subprocess.Popen([sys.executable, "-m", "grpo_jax.train", *demo_args(workdir)],
                            env=cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_at(proc, workdir, moment, delay):
      killed += 1
    else:  # it finished: the next kill must land in a fresh run of the same command
      assert proc.returncode == 0
      assert_same_run(straight, workdir, 6)
      shutil.rmtree(workdir)
  assert killed >= count // 2
  done = subprocess.run([sys.executable, "-m", "grpo_jax.train", *demo_args(workdir)],
                        env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_run(straight, workdir, 6)


@pytest.mark.slow  # the default run kills -9 once in test_train.py's resume test
def test_kill_9_at_random_moments_leaves_a_resumable_workdir(tmp_path):
  kill_nine_many_times(tmp_path, 3)


@pytest.mark.slow
def test_kill_9_at_twenty_random_moments(tmp_path):
  kill_nine_many_times(tmp_path, 20)


# -- non-finite updates --------------------------------------------------------------------

def placed_step(num_devices=4):
  from test_parallel import make_step, prompts  # noqa: PLC0415
  step, params, tx = make_step()
  p = pmap.pmap_step(step, jax.local_devices()[:num_devices])
  batch = prompts()
  rollout = jax.jit(step.generate)(params, batch["prompt_ids"], batch["prompt_mask"],
                                   jax.random.key(0))
  state = pmap.replicate(grpo.init_train_state(params, tx), p.devices)
  ref = pmap.replicate(jax.tree.map(lambda x: x * 0.9, params), p.devices)
  return p, state, ref, pmap.shard(rollout, num_devices), rollout.prompt_ids.shape[0]


def assert_unchanged_on_every_device(before, after):
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(x, y)


def test_a_non_finite_gradient_on_one_device_skips_the_update_on_all():
  p, state, ref, rollout, rows = placed_step()
  before = jax.device_get(state)
  rewards = np.random.default_rng(0).normal(size=(rows, 2)).astype(np.float32)
  scored, _ = p.score(state, ref, rollout, pmap.shard(rewards, 4))
  advantages = np.array(scored.advantages)
  advantages[2, 0] = np.inf  # one row of device 2: inf * 0-ratio terms -> NaN loss and grads
  state, step_metrics = p.update(state, scored._replace(advantages=jnp.asarray(advantages)))
  step_metrics = pmap.host_metrics(step_metrics)
  assert not np.isfinite(step_metrics["loss"]) or not np.isfinite(step_metrics["grad_norm"])
  assert step_metrics["nonfinite_skipped"] == 1
  assert_unchanged_on_every_device(before, jax.device_get(state))  # step, params, AdamW


def test_a_batch_without_any_reward_leaves_the_params_alone():
  p, state, ref, rollout, rows = placed_step()
  before = jax.device_get(state)
  nan = np.full((rows, 2), np.nan, np.float32)
  state, step_metrics = p.learn(state, ref, rollout, pmap.shard(nan, 4))
  assert pmap.host_metrics(step_metrics)["nonfinite_skipped"] == 1
  assert_unchanged_on_every_device(before, jax.device_get(state))
  # The guard lets an ordinary batch through: the next update moves the params.
  rewards = np.random.default_rng(0).normal(size=(rows, 2)).astype(np.float32)
  state, step_metrics = p.learn(state, ref, rollout, pmap.shard(rewards, 4))
  assert pmap.host_metrics(step_metrics)["nonfinite_skipped"] == 0
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(before.params), jax.tree.leaves(jax.device_get(state.params)))]
  assert max(moved) > 1e-4


@pytest.fixture
def importable(fault_files, monkeypatch):
  """The fault reward module importable in this process, with fresh call counters."""
  monkeypatch.syspath_prepend(str(fault_files))
  sys.modules.pop("fault_rewards", None)
  yield fault_files
  sys.modules.pop("fault_rewards", None)


def fault_config(files, **overrides):
  return tiny_config(**{"dataset": f"json:{files / 'data.jsonl'}", "prompt_column": "question",
                        "reward_funcs": "fault_rewards:faulty", "max_steps": 7,
                        "checkpoint_every": 3, "eval_every": 3, "eval_size": 8, **overrides})


def exit_line(config, workdir) -> str:
  """The line `python -m grpo_jax.train` ends with, asserting its exit status is 1."""
  with pytest.raises(SystemExit) as exited:
    train.train_command(config, workdir)
  line = exited.value.code
  assert isinstance(line, str), line  # SystemExit(str): printed to stderr, exit status 1
  assert "\n" not in line and line.startswith("grpo_jax: error: "), line
  return line


def test_nan_rewards_skip_updates_then_stop_the_run_in_one_line(importable, tmp_path,
                                                                monkeypatch, caplog):
  """From step 3 on every reward is NaN: those updates are skipped (a warning each), and
  after max_nonfinite_steps=2 in a row the run stops with exit 1 and one line."""
  monkeypatch.setenv("NAN_FROM", "3")
  workdir = tmp_path / "run"
  config = fault_config(importable, reward_funcs="fault_rewards:nan_after",
                        max_nonfinite_steps=2, max_steps=6, checkpoint_every=2, eval_every=0)
  line = exit_line(config, workdir)
  assert line.startswith("grpo_jax: error: 2 updates in a row were skipped (steps 3-4"), line
  assert "no reward function scored any completion" in line
  assert "Step 3: update skipped" in caplog.text
  step, state = final_params(workdir)
  assert step == 2  # the last checkpoint before the stop is left as it was
  rows = {r["step"]: r for r in metrics.read_metrics(workdir / "grpo_metrics") if "loss" in r}
  assert [rows[s]["nonfinite_skipped"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert rows[2]["reward"] is not None
  assert rows[3]["reward"] is None  # NaN (no reward, not a reward of 0): JSON null
  for leaf in jax.tree.leaves(state["params"]):
    assert np.isfinite(np.asarray(leaf)).all()


# -- one-line errors for bad input ---------------------------------------------------------

def workdir_is_a_file(directory):
  (directory / "afile").write_text("x")
  return directory / "afile"


BAD_INPUT = [
    (dict(max_grad_norm=-1.0), "config.max_grad_norm=-1.0; allowed: a number >= 0"),
    (dict(adam_beta1=1.5), "config.adam_beta1=1.5; allowed: 0 <= x < 1"),
    (dict(adam_beta2=-0.1), "config.adam_beta2=-0.1; allowed: 0 <= x < 1"),
    (dict(weight_decay=-1.0), "config.weight_decay=-1.0; allowed: a number >= 0"),
    (dict(model={"num_heads": 5, "num_kv_heads": 2}),
     "config.model.num_kv_heads=2; allowed: a divisor of model.num_heads=5"),
    (dict(eval_every=-1), "config.eval_every=-1; allowed: an integer >= 0 (0: never)"),
    (dict(preemption_grace_seconds=0.0), "config.preemption_grace_seconds=0.0"),
    ("file", "is a file, not a directory"),
    ("under_file", "its parent"),
]


def bad_workdir(tmp_path, case):
  if case == "file":
    return workdir_is_a_file(tmp_path)
  if case == "under_file":
    return workdir_is_a_file(tmp_path) / "run"
  return tmp_path / "run"


@pytest.mark.parametrize("case, message", BAD_INPUT)
def test_bad_input_is_exit_1_and_one_line(importable, tmp_path, case, message):
  config = fault_config(importable, **case) if isinstance(case, dict) else fault_config(importable)
  assert message in exit_line(config, bad_workdir(tmp_path, case))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case, message", [BAD_INPUT[0], BAD_INPUT[4], BAD_INPUT[7]])
def test_bad_input_on_the_command_line(fault_files, tmp_path, case, message):
  """The same, through a real process: exit status 1, one line, no traceback."""
  overrides = case if isinstance(case, dict) else {}
  failed = run(fault_files, fault_args(fault_files, bad_workdir(tmp_path, case), **overrides))
  assert failed.returncode == 1
  assert "Traceback" not in failed.stderr
  line = last_line(failed)
  assert line.startswith("grpo_jax: error: ") and message in line, line
  assert not (tmp_path / "run").exists()


def test_a_changed_config_is_refused_on_resume_unless_allowed(importable, tmp_path, caplog):
  workdir = tmp_path / "run"
  train.train_and_evaluate(fault_config(importable, max_steps=3), workdir)
  changed = dict(max_steps=5, learning_rate=0.002, num_generations=4, log_every=2)
  line = exit_line(fault_config(importable, **changed), workdir)
  assert "the config differs from the one the checkpoint of step 3" in line, line
  for difference in ("learning_rate: 0.001 -> 0.002", "max_steps: 3 -> 5",
                     "num_generations: 2 -> 4"):
    assert difference in line
  assert "log_every" not in line  # a logging field may change freely
  train.train_and_evaluate(fault_config(importable, **changed, allow_config_change=True),
                           workdir)
  assert "Resuming with a changed config (allow_config_change): max_steps: 3 -> 5" in \
      caplog.text
  assert final_params(workdir)[0] == 5


def test_never_evaluate_or_checkpoint_and_warm_up_only_the_demo(importable, tmp_path, caplog):
  """eval_every=0 / checkpoint_every=0 mean never; sft_steps is ignored for other data."""
  workdir = tmp_path / "run"
  caplog.set_level(logging.INFO, logger="grpo_jax")
  train.train_and_evaluate(fault_config(importable, eval_every=0, checkpoint_every=0,
                                        sft_steps=50, max_steps=2), workdir)
  assert "sft_steps=50 is the demo's warm-up" in caplog.text
  assert not (workdir / "checkpoints").exists() and not (workdir / "warmup").exists()
  rows = metrics.read_metrics(workdir / "grpo_metrics")
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert not any(k.startswith("eval/") for r in rows for k in r)
