"""One trainer per workdir: the lock, a second trainer refused in one line, a dead owner's
lock taken over, and the lone run's files untouched by the refused one."""

import json
import os
import subprocess
import sys
import time

import pytest
from etils import epath

from grpo_jax import workdir as workdir_lib
from grpo_jax.errors import UserError

from test_faults import timing
from test_train import cli_args, final_params, assert_trees_equal, read_metrics, TINY


def test_a_held_workdir_is_refused_in_one_line_naming_its_owner(tmp_path):
  with workdir_lib.WorkdirLock(epath.Path(tmp_path)) as first:
    record = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] and record["started"]
    # flock belongs to an open file: a second open in this same process conflicts too
    with pytest.raises(UserError, match=rf"in use by another trainer: pid {os.getpid()} on "):
      workdir_lib.WorkdirLock(epath.Path(tmp_path)).__enter__()
    assert first.took_over is None
  with workdir_lib.WorkdirLock(epath.Path(tmp_path)):  # released: free again
    pass


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  # A trainer killed with SIGKILL: its flock went with it, its record stayed.
  holder = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, json, os, sys, time\n"
      f"fd = os.open({str(tmp_path / workdir_lib.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
      "fcntl.flock(fd, fcntl.LOCK_EX)\n"
      "os.write(fd, json.dumps({'pid': os.getpid(), 'host': os.uname().nodename,"
      " 'user': 'x', 'started': 'then'}).encode())\n"
      "print('held', flush=True)\n"
      "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(UserError, match=f"pid {holder.pid}"):
    workdir_lib.WorkdirLock(epath.Path(tmp_path)).__enter__()
  holder.kill()
  holder.wait()
  with caplog.at_level("WARNING", logger="grpo_jax"):
    with workdir_lib.WorkdirLock(epath.Path(tmp_path)) as lock:
      assert lock.took_over["pid"] == holder.pid
  assert f"taking over the lock of pid {holder.pid}" in caplog.text
  assert "no longer running" in caplog.text


def cli(workdir, **overrides):
  return [f"--workdir={workdir}", *cli_args({**TINY, **overrides})]


def test_a_second_trainer_on_a_live_workdir_exits_at_once_and_leaves_the_first_alone(tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}
  settings = dict(max_steps=6, eval_every=3, checkpoint_every=3)
  lone = tmp_path / "lone"
  subprocess.run([sys.executable, "-m", "grpo_jax.train", *cli(lone, **settings)], env=env,
                 check=True, capture_output=True, timeout=300)
  shared = tmp_path / "shared"
  first = subprocess.Popen([sys.executable, "-m", "grpo_jax.train", *cli(shared, **settings)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lock_file = shared / workdir_lib.LOCK_FILE
  deadline = time.monotonic() + 120
  while not (lock_file.exists() and str(first.pid) in lock_file.read_text()):
    assert time.monotonic() < deadline and first.poll() is None, first.communicate()
    time.sleep(0.05)
  started = time.monotonic()
  second = subprocess.run([sys.executable, "-m", "grpo_jax.train",
                           *cli(shared, **settings, learning_rate=5e-3)],
                          env=env, capture_output=True, text=True, timeout=120)
  refused_in = time.monotonic() - started
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  assert second.returncode == 1
  lines = [line for line in second.stderr.splitlines() if line.startswith("grpo_jax")]
  assert len(lines) == 1 and "in use by another trainer" in lines[0], second.stderr
  assert f"pid {first.pid}" in lines[0]
  assert refused_in < 30  # before the model, data or any compile (typically ~5 s)
  # The first run is what a lone run is: same metrics (timings aside), hparams, weights.
  strip = lambda rows: [{k: v for k, v in r.items() if not timing(k)} for r in rows]
  assert strip(read_metrics(shared)) == strip(read_metrics(lone))
  hparams = lambda w: json.loads((w / "grpo_metrics" / "hparams.json").read_text())
  assert hparams(shared)["learning_rate"] == hparams(lone)["learning_rate"]
  (step_a, params_a), (step_b, params_b) = final_params(shared), final_params(lone)
  assert step_a == step_b == 6
  assert_trees_equal(params_a, params_b)
