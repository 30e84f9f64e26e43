"""Multi-turn GRPO end to end on the tools demo (a tiny model, a short warm-up): tool
metrics, pmap over 4 fake devices = a mesh, an exact resume after a crash, and
environment_factory instances that the reward functions read."""

import shutil
import sys

import numpy as np
import pytest

from conftest import assert_same_run, train_on_reward_files, write_reward_files
from grpo_jax import build, metrics, train
from grpo_jax import config as config_lib
from grpo_jax.config import from_file
from grpo_jax.errors import UserError
from test_train import ROOT, final_params

ENVIRONMENTS = '''
calls_made = []


class Desk:
  """Per completion: a calculator that keeps a tape of what it computed."""

  def reset(self, prompt, answer, **row):
    self.prompt, self.answer, self.tape = prompt, answer, []

  def calculator(self, expression: str) -> str:
    """Evaluates an arithmetic expression.

    Args:
      expression: e.g. "3+4-2"
    """
    from grpo_jax.tools.builtin import calculator
    value = calculator(expression)
    self.tape.append((expression, value))
    calls_made.append(expression)
    return value


def tape_reward(prompts, completions, environments, **columns):
  """1 when the completion's own desk computed what its calls asked for, 0 without a tape;
  an error (the run fails) if a desk was reset with another completion's row, or holds
  another completion's calculations."""
  out = []
  for prompt, completion, answer, env in zip(prompts, completions, columns["answer"],
                                             environments):
    if (env.prompt, env.answer) != (prompt, answer):
      raise AssertionError(f"desk of {prompt!r} was reset with {env.prompt!r}")
    for expression, value in env.tape:
      if '"expression": "%s"' % expression not in completion or value not in completion:
        raise AssertionError(f"{expression!r} is not in {completion!r}")
    out.append(float(bool(env.tape)))
  return out
'''


def tools_config(**overrides):
  """The tools demo's model, a shorter warm-up (half the demonstrations call the tool),
  small steps."""
  config = from_file(ROOT / "configs" / "tools_demo.py")
  config.update(dict(sft_steps=300, prompts_per_step=4, num_generations=4, max_steps=4,
                     checkpoint_every=2, eval_every=0, sft_reasoning_prob=0.5))
  config.update(overrides)
  return config


def share_warmup(source, workdir):
  """The warm-up cache of an earlier run with the same warm-up fields (it is keyed on
  them: a mismatch would be rebuilt, not reused wrongly)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / "warmup").exists():
    shutil.copytree(source / "warmup", workdir / "warmup")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  directory = write_reward_files(tmp_path_factory.mktemp("tools_train"))
  (directory / "my_envs.py").write_text(ENVIRONMENTS)
  return directory


def run(files, workdir, stop_at=0, **overrides):
  config = tools_config(reward_funcs="correctness_reward,my_rewards:stop_at", **overrides)
  if workdir.name != "straight":
    share_warmup(files / "straight", workdir)
  return train_on_reward_files(files, workdir, config, stop_at)


@pytest.fixture(scope="module")
def straight(files):
  workdir = files / "straight"
  return workdir, run(files, workdir)


def test_rollouts_call_the_tool_and_log_the_tool_metrics(straight):
  _, rows = straight
  assert sorted(rows) == [1, 2, 3, 4]
  for r in rows.values():
    calls, turns = r["tools/calls_per_completion"], r["tools/turns"]
    # a response that fits leaves room for one more model turn
    assert 0 < calls <= 2 and 1 < turns <= 1 + calls
    assert 0 <= r["tools/failure_rate"] < 1
    # a call is ~61 model tokens, its response 3-5 tool tokens, not counted
    assert r["completions/mean_length"] < 80
  assert any(r["rewards/correctness_reward/mean"] > 0 for r in rows.values())


def test_a_crash_and_rerun_equals_the_uninterrupted_run(files, straight):
  """The reward raises in step 4; the rerun resumes from the checkpoint of step 2 and
  samples the same conversations (tool calls and responses included) as the straight run."""
  workdir, rows = straight
  with pytest.raises(UserError, match="reward function 'stop_at' raised RuntimeError"):
    run(files, files / "resumed", stop_at=4)
  assert final_params(files / "resumed")[0] == 2
  assert_same_run(run(files, files / "resumed"), rows, workdir, files / "resumed")


@pytest.mark.slow  # the default run checks the mesh sampler (test_multi_turn) and pmap here
def test_a_mesh_samples_the_same_conversations_as_pmap(files, straight):
  _, rows = straight
  sharded = run(files, files / "mesh", parallelism="mesh", mesh={"data": 2, "fsdp": 2,
                                                                  "tensor": 1})
  for step in (1, 2):
    for key in ("tools/calls_per_completion", "tools/turns", "tools/failure_rate", "reward",
                "completions/mean_length"):
      assert sharded[step][key] == rows[step][key], (step, key)
    np.testing.assert_allclose(sharded[step]["loss"], rows[step]["loss"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a third training run; test_tools.py checks Environments in the default run
def test_environments_are_reset_per_completion_and_read_by_the_rewards(files, straight):
  workdir = files / "envs"
  share_warmup(files / "straight", workdir)
  config = tools_config(tools="", environment_factory="my_envs:Desk",
                        reward_funcs="my_envs:tape_reward,correctness_reward", max_steps=2,
                        checkpoint_every=0)
  with pytest.MonkeyPatch.context() as patch:
    patch.syspath_prepend(str(files))
    sys.modules.pop("my_envs", None)
    train.train_and_evaluate(config, workdir)
    made = list(sys.modules["my_envs"].calls_made)
    sys.modules.pop("my_envs", None)
  rows = [r for r in metrics.read_metrics(workdir / "grpo_metrics") if "loss" in r]
  # every call that reached the tool ran on the completion's own desk (prompts x G per step)
  succeeded = sum(r["tools/calls_per_completion"] * (1 - r["tools/failure_rate"]) * 4 * 4
                  for r in rows)
  assert made and len(made) == pytest.approx(succeeded)
  # the completions whose calls ran on their desks (and only those) got 1
  for r in rows:
    ran = r["tools/calls_per_completion"] * (1 - r["tools/failure_rate"])
    assert (r["rewards/tape_reward/mean"] > 0) == (ran > 0)
    assert r["rewards/tape_reward/mean"] <= ran + 1e-6
  assert any(r["rewards/tape_reward/mean"] > 0 for r in rows)


def test_tools_need_a_chat_template_and_valid_fields(files, tmp_path):
  def checked_setup(config):  # as the command checks a run: the config, then the rest
    config_lib.validate(config)
    return build.setup(config)

  with pytest.raises(UserError, match="tool_call_format='xml'"):
    checked_setup(tools_config(tool_call_format="xml"))
  with pytest.raises(UserError, match="max_tool_calling_iterations=0"):
    checked_setup(tools_config(max_tool_calling_iterations=0))
  with pytest.raises(UserError, match="tool 'nowhere_xyz:f'"):
    checked_setup(tools_config(tools="nowhere_xyz:f"))
  with pytest.raises(UserError, match="chat_template='auto'"):
    checked_setup(tools_config(chat_template="none"))
