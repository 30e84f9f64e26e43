"""Bad data caught at the door: reward outputs checked where they enter (type, length,
timeout, a function ending the process), datasets validated at load (every bad row named by
index, or skipped), the data's fingerprint compared on resume, and the config checks that
used to give tracebacks. Each failure is one line and exit 1; the last checkpoint resumes."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from grpo_jax import build, train
from grpo_jax.rewards import registry

from test_faults import exit_line
from test_train import tiny_config, read_metrics

REWARDS = '''
import os, sys, time
calls = 0

def bad_after(prompts, completions, **columns):
  """Good rewards until call BAD_FROM, then what BAD says."""
  global calls
  calls += 1
  if calls < int(os.environ.get("BAD_FROM", "1")):
    return [float(len(c) % 2) for c in completions]
  bad = os.environ["BAD"]
  if bad == "dict":
    return {i: 1.0 for i in range(len(completions))}
  if bad == "string":
    return "1" * len(completions)
  if bad == "strings":
    return ["1.0"] * len(completions)
  if bad == "short":
    return [1.0] * (len(completions) - 1)
  if bad == "2d":
    import numpy as np
    return np.ones((len(completions), 1))
  if bad == "hang":
    time.sleep(600)
  if bad == "exit":
    sys.exit(3)
  if bad == "interrupt":
    raise KeyboardInterrupt
  raise AssertionError(bad)
'''


@pytest.fixture
def files(tmp_path, monkeypatch):
  (tmp_path / "door_rewards.py").write_text(REWARDS)
  monkeypatch.syspath_prepend(str(tmp_path))
  import sys
  sys.modules.pop("door_rewards", None)
  rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(7) for b in range(5)]
  (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  yield tmp_path
  sys.modules.pop("door_rewards", None)


def config_of(files, **overrides):
  return tiny_config(**{"dataset": f"json:{files / 'data.jsonl'}", "prompt_column": "question",
                        "reward_funcs": "door_rewards:bad_after", "max_steps": 4,
                        "checkpoint_every": 2, "eval_every": 0, "eval_size": 0, **overrides})


slow = pytest.mark.slow  # the same path as the two kept in the default run (~13 s each)


@pytest.mark.parametrize("bad, words", [
    ("dict", "returned a dict"), pytest.param("string", "returned a str", marks=slow),
    pytest.param("strings", "returned a non-number", marks=slow),
    pytest.param("short", "returned 7 values for 8", marks=slow),
    pytest.param("2d", r"array of shape \(8, 1\)", marks=slow),
    ("hang", "did not return within reward_timeout_seconds"),
    pytest.param("exit", r"raised SystemExit\(3\)", marks=slow),
    pytest.param("interrupt", "raised KeyboardInterrupt", marks=slow)])
def test_a_bad_reward_output_stops_in_one_line_and_the_checkpoint_resumes(files, tmp_path,
                                                                          monkeypatch, bad,
                                                                          words):
  """Steps 1-2 are good and checkpointed; step 3's reward call goes wrong: one line naming
  the function, exit 1; the rerun with a fixed function resumes from step 2."""
  monkeypatch.setenv("BAD_FROM", "3")
  monkeypatch.setenv("BAD", bad)
  workdir = tmp_path / "run"
  line = exit_line(config_of(files, reward_timeout_seconds=2.0), workdir)
  assert "'bad_after'" in line
  assert re.search(words, line), line
  monkeypatch.setenv("BAD_FROM", "1000")
  import sys
  sys.modules.pop("door_rewards", None)
  train.train_and_evaluate(config_of(files), str(workdir))
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == [1, 2, 3, 4]  # 1-2 from the first run, 3-4 resumed from its checkpoint


def test_reward_outputs_that_are_arrays_or_tuples_are_taken():
  fn = lambda prompts, completions: np.arange(len(completions), dtype=np.float32)
  rewards = registry.compute_rewards([("f", fn)], ["p"] * 3, ["a", "b", "c"], {})
  np.testing.assert_array_equal(rewards[:, 0], [0, 1, 2])
  fn = lambda prompts, completions: (1, None, 2.5)
  rewards = registry.compute_rewards([("f", fn)], ["p"] * 3, ["a", "b", "c"], {})
  assert rewards[0, 0] == 1 and math.isnan(rewards[1, 0]) and rewards[2, 0] == 2.5


def write_rows(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


BAD_ROWS = [{"question": None}, {"question": 12345}, {"answer": "no question"},
            {"question": ""}, {"question": "x" * 500}, {"question": "  "}]


def test_every_kind_of_bad_row_is_refused_at_start_with_the_count_and_first_indices(files,
                                                                                     tmp_path):
  good = [{"question": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10)]
  rows = good[:3] + BAD_ROWS + good[3:]
  write_rows(files / "bad.jsonl", rows)
  line = exit_line(config_of(files, dataset=f"json:{files / 'bad.jsonl'}"), tmp_path / "run")
  assert "train dataset: 6 bad prompt(s) of 16 in column 'question'" in line, line
  assert "row 3: missing (None); row 4: not text (a int" in line
  assert "row 5: missing (None); row 6: empty" in line
  assert re.search(r"row 7: \d+ tokens > max_prompt_length=10", line), line
  assert "(first 5 shown)" in line
  assert not (tmp_path / "run").exists()


def test_text_that_is_not_utf8_names_the_file_and_line(files, tmp_path):
  lines = [json.dumps({"question": f"{a}+1=", "answer": str(a + 1)}) for a in range(5)]
  lines[3] = '{"question": "\\udc80abc", "answer": "1"}'  # a lone surrogate, escaped
  (files / "surrogate.jsonl").write_text("\n".join(lines) + "\n")
  line = exit_line(config_of(files, dataset=f"json:{files / 'surrogate.jsonl'}"),
                   tmp_path / "run")
  assert "surrogate.jsonl: text that is not valid UTF-8 at line 4" in line, line


def test_skip_bad_rows_trains_on_the_rest(files, tmp_path, caplog, monkeypatch):
  monkeypatch.setenv("BAD_FROM", "1000")
  good = [{"question": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10)]
  write_rows(files / "bad.jsonl", good[:3] + BAD_ROWS + good[3:])
  config = config_of(files, dataset=f"json:{files / 'bad.jsonl'}", skip_bad_rows=True,
                     max_steps=2, checkpoint_every=0)
  s = build.setup(config)
  assert sorted(s.train_data["question"]) == sorted(r["question"] for r in good)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "6 bad prompt(s) of 16" in caplog.text and "skipped (skip_bad_rows)" in caplog.text


def test_an_edited_dataset_is_refused_on_resume(files, tmp_path, monkeypatch):
  monkeypatch.setenv("BAD_FROM", "1000")
  workdir = tmp_path / "run"
  train.train_and_evaluate(config_of(files, max_steps=2), str(workdir))
  data = files / "data.jsonl"
  rows = [json.loads(line) for line in data.read_text().splitlines()]
  rows[5]["question"] = "9+9="
  write_rows(data, rows)
  line = exit_line(config_of(files, max_steps=2), workdir)
  assert "the prompts differ from those the checkpoint was trained on" in line
  assert str(data) in line and "allow_config_change" in line
  # the same content written again (a new mtime) is the same data
  rows[5]["question"] = "1+0="
  write_rows(data, rows)
  train.train_and_evaluate(config_of(files, max_steps=2), str(workdir))


@pytest.mark.parametrize("field, value, words", [
    ("seed", 12345, None), ("seed", -5, "from 0 to 2**63 - 1"), ("seed", 2**70, "2**63"), ("beta", math.nan, "a finite number"),
    ("temperature", math.inf, "a finite number"), ("weight_decay", math.inf, "a finite number"),
    ("top_k", 1_000_000, "over the model's vocabulary")])
def test_config_values_are_checked_in_one_line(files, tmp_path, monkeypatch, field, value,
                                                words):
  monkeypatch.setenv("BAD_FROM", "1000")
  config = config_of(files, max_steps=1, checkpoint_every=0)
  config[field] = value
  if words is None:  # any other seed is a seed
    train.train_and_evaluate(config, str(tmp_path / "run"))
    return
  assert words in exit_line(config, tmp_path / "run")


def test_an_empty_workdir_is_refused(files, monkeypatch):
  assert "--workdir is empty" in exit_line(config_of(files), "")


def test_a_rerun_before_the_first_checkpoint_logs_each_step_once(files, tmp_path, monkeypatch):
  """A run that died before its first checkpoint: the rerun starts over and its metrics
  file holds each step once (the dead run's records are dropped)."""
  monkeypatch.setenv("BAD_FROM", "2")
  monkeypatch.setenv("BAD", "dict")
  workdir = tmp_path / "run"
  (workdir / "grpo_metrics").mkdir(parents=True)  # a workdir kept by the user
  (workdir / "grpo_metrics" / "metrics.jsonl").write_text(
      json.dumps({"step": 0, "eval/accuracy": 0.5}) + "\n" + json.dumps({"step": 1, "loss": 1.0}) + "\n")
  monkeypatch.setenv("BAD_FROM", "1000")
  train.train_and_evaluate(config_of(files, max_steps=2, checkpoint_every=2), str(workdir))
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == [1, 2], steps  # the old step 0 and 1 records are gone
  assert not any(r.get("eval/accuracy") == 0.5 for r in read_metrics(workdir))


def test_a_full_disk_while_caching_the_warm_up_is_a_warning(tmp_path, monkeypatch, caplog):
  import errno
  from grpo_jax import warmup

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(warmup, "_write", full)
  train.train_and_evaluate(tiny_config(sft_steps=2, max_steps=1, checkpoint_every=0,
                                       eval_every=0), str(tmp_path / "run"))
  assert "Could not cache the supervised warm-up" in caplog.text
  assert "No space left on device" in caplog.text


DELETER = """
import os, shutil
calls = 0

def delete_workdir(prompts, completions, **columns):
  global calls
  calls += 1
  if calls == 2:
    while os.path.exists(WORKDIR):  # an async checkpoint may still be writing into it
      shutil.rmtree(WORKDIR, ignore_errors=True)
  return [1.0] * len(completions)
"""


def test_a_workdir_deleted_mid_run_stops_in_one_line(files, tmp_path, monkeypatch):
  workdir = tmp_path / "doomed"
  (files / "deleter.py").write_text(f"WORKDIR = {str(workdir)!r}\n" + DELETER)
  line = exit_line(config_of(files, reward_funcs="deleter:delete_workdir", max_steps=4,
                             checkpoint_every=1), workdir)
  assert f"the workdir {workdir} was deleted during the run" in line


def test_a_config_file_with_a_syntax_error_is_one_line_with_file_and_line(tmp_path):
  bad = tmp_path / "bad_config.py"
  bad.write_text("def get_config():\n  c = dict(\n  return c\n")
  done = subprocess.run([sys.executable, "-m", "grpo_jax.train", f"--config={bad}",
                         f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "XLA_FLAGS": ""})
  assert done.returncode == 1
  lines = done.stderr.strip().splitlines()
  assert lines[-1].startswith(f"grpo_jax: error: config file {bad}, line "), done.stderr
  assert "Traceback" not in done.stderr


def test_a_malformed_file_is_reported_once(files, tmp_path, caplog):
  (files / "broken.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n{"question": \n')
  line = exit_line(config_of(files, dataset=f"json:{files / 'broken.jsonl'}"), tmp_path / "r")
  assert "broken.jsonl could not be read as json" in line
  assert not [r for r in caplog.records if r.name.startswith("datasets")]
