"""The main job end to end: custom data and rewards, resume, kill + rerun, bad input."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grpo_jax import build, metrics, train
from grpo_jax import config as config_lib
from grpo_jax.errors import ConfigError, UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent



def load_default_config():
  spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs/default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


TINY = dict(sft_steps=0, max_steps=4, prompts_per_step=4, num_generations=2,
            max_completion_length=6, max_prompt_length=10, eval_every=2, checkpoint_every=2,
            learning_rate=1e-3, log_every=1)
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1)


def tiny_config(**overrides):
  config = load_default_config()
  model = {**TINY_MODEL, **overrides.pop("model", {})}
  mesh = overrides.pop("mesh", {})
  config.update({**TINY, **overrides})
  config.model.update(model)
  config.mesh.update(mesh)
  return config


def cli_args(config_overrides: dict) -> list[str]:
  args = []
  for key, value in config_overrides.items():
    if isinstance(value, dict):
      args += [f"--config.{key}.{k}={v}" for k, v in value.items()]
    else:
      args.append(f"--config.{key}={value}")
  return args


def run_cli(args, env_extra=None, cwd=None):
  env = {**os.environ, "XLA_FLAGS": "", **(env_extra or {})}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd or ""), env.get("PYTHONPATH")]))
  return subprocess.run([sys.executable, "-m", "grpo_jax.train", *args], capture_output=True,
                        text=True, env=env, cwd=cwd, timeout=300)


def final_params(workdir):
  step = ocp.CheckpointManager(workdir / "checkpoints").latest_step()
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  return step, restored


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def step_metrics(workdir, key):
  return {r["step"]: r[key] for r in metrics.read_metrics(workdir / "grpo_metrics") if key in r}


def test_default_config_is_valid_and_demo_metrics_are_written(tmp_path, monkeypatch):
  config = tiny_config(sft_steps=3, max_steps=2)
  monkeypatch.chdir(tmp_path)  # a relative workdir, as in the README's `--workdir=output`
  result = train.train_and_evaluate(config, "run")
  logdir = tmp_path / "run" / "grpo_metrics"
  names = set().union(*[r.keys() for r in metrics.read_metrics(logdir)])
  for name in ["reward", "reward_std", "rewards/correctness_reward/mean",
               "rewards/correctness_reward/std", "rewards/format_reward/mean", "kl", "loss",
               "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
               "frac_reward_zero_std", "grad_norm", "learning_rate", "step_time",
               "tokens_per_second", "eval/accuracy", "warmup/loss", "time/sampling",
               "time/rewards", "time/update"]:
    assert name in names, name
  for record in metrics.read_metrics(logdir):  # the step's parts add up to (most of) it
    if "step_time" in record:
      parts = record["time/sampling"] + record["time/rewards"] + record["time/update"]
      assert 0.0 < parts <= record["step_time"] + 1e-6
      assert parts > 0.5 * record["step_time"]
  assert 0.0 <= result["eval/accuracy"] <= 1.0
  assert (logdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list(logdir.glob("events.out.tfevents.*"))
  assert (logdir / "samples.jsonl").read_text().count('"samples"') == 2  # evals at 0 and 2
  assert (tmp_path / "run" / "checkpoints" / "reference").is_dir()
  assert (tmp_path / "run" / "warmup" / "stats.json").is_file()


def test_custom_jsonl_dataset_and_reward_from_the_command_line(user_files):
  workdir = user_files / "run"
  overrides = {**TINY, "model": TINY_MODEL, "dataset": f"json:{user_files / 'data.jsonl'}",
               "prompt_column": "question", "reward_funcs": "my_rewards:length_reward",
               "eval_size": 4, "max_steps": 2}
  proc = run_cli([f"--workdir={workdir}", *cli_args(overrides)], cwd=user_files)
  assert proc.returncode == 0, proc.stderr[-3000:]
  calls = [json.loads(line) for line in (user_files / "reward_log.jsonl").read_text().splitlines()]
  train_calls = [c for c in calls if len(c["prompts"]) == 8]  # 4 prompts x G=2 per step
  assert len(train_calls) == 2
  questions = {f"{a}+{b}=" for a in range(6) for b in range(4)}
  for call in train_calls:
    assert set(call["prompts"]) <= questions
    assert call["prompts"][0::2] == call["prompts"][1::2]  # each prompt's G=2 siblings
    # The other columns arrive as keyword arguments, with the completions' token ids (TRL).
    assert call["columns"] == ["completion_ids", "source"]
    assert [str(eval(q[:-1])) for q in call["prompts"]] == call["answer"]
  logged = metrics.read_metrics(workdir / "grpo_metrics")
  assert "rewards/length_reward/mean" in logged[-1]
  assert "eval/accuracy" in logged[-1]  # the only reward function stands in for accuracy


def test_resume_after_a_crash_follows_the_uninterrupted_trajectory(user_files, monkeypatch):
  """Two updates per step (num_iterations=2), a linear schedule. The resumed run logs
  every 4 steps: each of its records is the mean of the uninterrupted run's steps in that
  window, also for the window its checkpoint (step 3) cut in two."""
  common = dict(dataset=f"json:{user_files / 'data.jsonl'}", prompt_column="question",
                reward_funcs="my_rewards:stop_at", max_steps=6, checkpoint_every=3,
                num_iterations=2, lr_scheduler_type="linear")
  train.train_and_evaluate(tiny_config(**common), user_files / "straight")

  monkeypatch.setenv("STOP_AT", "5")  # fails during step 5, after the checkpoint of step 3
  sys.modules.pop("my_rewards", None)
  with pytest.raises(UserError, match="reward function 'stop_at' raised RuntimeError"):
    train.train_and_evaluate(tiny_config(**common, log_every=4), user_files / "resumed")
  assert final_params(user_files / "resumed")[0] == 3
  monkeypatch.setenv("STOP_AT", "0")
  sys.modules.pop("my_rewards", None)
  train.train_and_evaluate(tiny_config(**common, log_every=4), user_files / "resumed")

  (step_a, state_a), (step_b, state_b) = (final_params(user_files / "straight"),
                                          final_params(user_files / "resumed"))
  assert step_a == step_b == 6
  assert_trees_equal(state_a, state_b)
  for key in ("loss", "reward", "kl", "learning_rate"):
    straight, resumed = step_metrics(user_files / "straight", key), step_metrics(
        user_files / "resumed", key)
    assert sorted(straight) == list(range(1, 7)) and sorted(resumed) == [4, 6]
    for step, window in ((4, [1, 2, 3, 4]), (6, [5, 6])):
      mean = sum(straight[s] for s in window) / len(window)
      assert resumed[step] == pytest.approx(mean, rel=1e-12, abs=1e-15), (key, step)
  # The schedule spans all 12 updates (not max_steps = 6 of them): step s's two updates
  # are numbers 2s-2 and 2s-1, at learning rate 1e-3 * (1 - k / 12); the last is > 0.
  learning_rates = step_metrics(user_files / "straight", "learning_rate")
  for step, rate in learning_rates.items():
    assert rate == pytest.approx(1e-3 * (1 - (4 * step - 3) / 24), rel=1e-6)
  assert learning_rates[6] == pytest.approx(1.25e-4, rel=1e-6)


def test_the_schedule_counts_optimizer_updates():
  config = tiny_config(max_steps=4, num_iterations=2, warmup_ratio=0.25, learning_rate=1.0,
                       lr_scheduler_type="linear")
  _, schedule = build.make_optimizer(config)  # 8 updates, the first 2 warming up
  assert [float(schedule(k)) for k in (0, 1, 2)] == [0.0, 0.5, 1.0]
  assert float(schedule(7)) == pytest.approx(1 / 6) and float(schedule(8)) == 0.0


def test_killed_run_continues_from_its_last_checkpoint(user_files):
  overrides = {**TINY, "model": TINY_MODEL, "dataset": f"json:{user_files / 'data.jsonl'}",
               "prompt_column": "question", "reward_funcs": "my_rewards:stop_at",
               "max_steps": 6, "checkpoint_every": 2}
  args = [f"--workdir={user_files / 'run'}", *cli_args(overrides)]
  killed = run_cli(args, {"STOP_AT": "6", "STOP_HOW": "kill"}, cwd=user_files)
  assert killed.returncode == -9  # SIGKILL during step 6
  resumed_from = final_params(user_files / "run")[0]
  assert resumed_from in (2, 4)  # the newest *complete* checkpoint (saves are asynchronous)
  done = run_cli(args, cwd=user_files)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {resumed_from}" in done.stderr
  assert final_params(user_files / "run")[0] == 6
  lines = [json.loads(l) for l in (user_files / "run/grpo_metrics/metrics.jsonl").open()]
  loss_steps = [r["step"] for r in lines if "loss" in r]
  assert loss_steps == list(range(1, 7))  # each step logged once, none lost, none twice


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="json:/no/such/file.jsonl"), "dataset file not found: /no/such/file.jsonl"),
    (dict(prompt_column="nope"), "nope"),
    (dict(reward_funcs="not_a_module_xyz:fn"), "not_a_module_xyz"),
    (dict(reward_funcs="my_rewards:broken"), "reward function 'broken' raised ZeroDivisionError"),
    (dict(num_generations=1), "num_generations"),
    (dict(prompts_per_step=6), "multiple of the number of devices"),
    (dict(loss_type="ppo"), "loss_type='ppo'; allowed: grpo, bnpo, dr_grpo, dapo"),
    (dict(reward_weights=(1.0,)), "reward_weights has 1 entries but there are 2"),
    (dict(max_prompt_length=3), "max_prompt_length=3"),
])
def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(user_files, overrides, message):
  workdir = user_files / "run"
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    train.train_and_evaluate(tiny_config(**overrides), workdir)
  assert not workdir.exists()


def test_incompatible_checkpoint_in_workdir(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(max_steps=2), workdir)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(UserError, match="incompatible model.*hidden_size: 32 in checkpoint vs 48"):
    train.train_and_evaluate(tiny_config(max_steps=4, model={"hidden_size": 48}), workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--config.bogus_field=1"], "unknown config field 'bogus_field'"),
    (["--config.model.nope=2"], "unknown config field 'model.nope'"),
    (["--config.learning_rat=1e-5"],
     "unknown config field 'learning_rat' (in --config.learning_rat=1e-5); did you mean "
     "'learning_rate'?"),
    (["--config.model.hiden_size=64"], "did you mean 'model.hidden_size'?"),
    (["--config.dataset=json:/no/such.jsonl", "--config.sft_steps=0"], "dataset file not found"),
])
def test_command_line_errors_are_one_line(tmp_path, args, message):
  proc = run_cli([f"--workdir={tmp_path / 'run'}", *args])
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("grpo_jax: error: ") and message in last
  assert not (tmp_path / "run").exists()


def read_metrics(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "grpo_metrics" / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_evaluation_batch_does_not_change_what_is_evaluated(tmp_path):
  """The held-out set decoded all at once (the default) and in 8-prompt batches: greedy
  decoding of a row does not depend on its batch, so accuracy and lengths are equal."""
  common = dict(max_steps=2, eval_every=2, checkpoint_every=0, eval_size=24)
  train.train_and_evaluate(tiny_config(**common), str(tmp_path / "whole"))
  train.train_and_evaluate(tiny_config(**common, eval_batch_size=8), str(tmp_path / "batches"))
  evals = {name: [r for r in read_metrics(tmp_path / name) if "eval/accuracy" in r]
           for name in ("whole", "batches")}
  assert [r["step"] for r in evals["whole"]] == [0, 2]
  for whole, batches in zip(evals["whole"], evals["batches"]):
    assert whole["eval/accuracy"] == batches["eval/accuracy"]
    assert whole["eval/completions/mean_length"] == pytest.approx(
        batches["eval/completions/mean_length"])


def test_time_budget_ends_the_run_like_its_last_step(tmp_path):
  """max_train_minutes: the step that spends the budget is the last: it is evaluated,
  checkpointed and exported as max_steps would be; rerunning continues from it."""
  config = tiny_config(max_steps=50, eval_every=100, checkpoint_every=100, eval_size=8,
                       max_train_minutes=1e-9, export_hf="hf")
  train.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(tmp_path)
  assert max(r["step"] for r in records) == 1
  assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 1]
  assert (tmp_path / "checkpoints" / "1").is_dir()
  assert (tmp_path / "hf" / "config.json").is_file()
  train.train_and_evaluate(config, str(tmp_path))  # a new budget: one more step
  assert max(r["step"] for r in read_metrics(tmp_path)) == 2


@pytest.mark.parametrize("result, shown", [
    ({"reward": 0.5}, "done: W/grpo_metrics (curves.png, metrics.jsonl)\n"),
    ({"reward": 0.5, "eval/accuracy": 0.90625},
     "done: W/grpo_metrics (curves.png, metrics.jsonl) {'eval/accuracy': 0.9062}\n")])
def test_the_closing_line_shows_evaluation_results_only_when_there_are_some(
    monkeypatch, capsys, result, shown):
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: result)
  train.train_command(None, "W")
  assert capsys.readouterr().out == shown


def test_without_a_reference_pass_no_reference_is_saved_or_restored(tmp_path):
  """beta = 0 and no reference sync (TRL's default): nothing reads a reference, so none is
  placed, checkpointed (333 MB for SmolLM2) or restored, and a run resumes without one."""
  run = lambda workdir, **kw: train.train_and_evaluate(
      tiny_config(beta=0.0, checkpoint_every=2, eval_every=0, **kw), tmp_path / workdir)
  run("whole", max_steps=4)
  checkpoints = tmp_path / "whole" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]  # no "reference"
  run("split", max_steps=2)
  run("split", max_steps=4, allow_config_change=True)  # resumes from step 2, without one
  assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["2", "4"]
  steps = [r["step"] for r in metrics.read_metrics(tmp_path / "split" / "grpo_metrics")
           if "loss" in r]
  assert steps == [1, 2, 3, 4]
  # With beta > 0 the reference is saved once, as before.
  train.train_and_evaluate(tiny_config(beta=0.04, max_steps=2, checkpoint_every=2,
                                       eval_every=0), tmp_path / "kl")
  assert (tmp_path / "kl" / "checkpoints" / "reference").exists()


def test_a_typo_in_a_config_file_names_the_field_it_meant():
  config = tiny_config()
  with config.unlocked():
    config.num_generation = 4
  with pytest.raises(ConfigError, match=r"unknown config field 'num_generation'; did you mean "
                     r"'num_generations'\?"):
    config_lib.validate(config)

