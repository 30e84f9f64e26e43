"""Shared fixtures: 4 fake CPU devices (set before jax is imported) and tiny models."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# With libtpu installed (the [tpu] extra) JAX would first look for a TPU; the tests run on
# the CPU and reach TPU topologies through jax.experimental.topologies.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare float32 programs with float32/float64 references: on a GPU, XLA would
# otherwise run float32 matmuls as TF32 (10-bit mantissa, log-probs off by ~2e-3). A no-op on
# CPU; TPUs are not a test target (plan compiles for them without running).
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx  # noqa: E402

from grpo_jax.models import ModelConfig, Transformer  # noqa: E402

TINY = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, qkv_bias=True)


def tiny_model(seed: int = 0, **changes) -> Transformer:
  """A tiny model whose weights are large enough to give varied, non-trivial outputs.

  (With the usual 0.02 init and tied embeddings a 2-layer model just repeats its input.)
  """
  model = Transformer(TINY.replace(**changes), nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
  leaves = [x + 0.5 * jax.random.normal(k, x.shape) if x.ndim >= 2 else x
            for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture
def model():
  return tiny_model()


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# A test whose worker died of a signal runs once more on a fresh worker, and the summary
# counts it as "1 rerun" (its crash report, with faulthandler's stacks, stays in the log).
# Why: in a long-lived worker (thousands of programs compiled), XLA:CPU has been seen to
# unmap JIT code whose EH frame stays registered with libgcc; the next C++ throw then
# segfaults in _Unwind_Find_FDE. In the last full runs that was once per run, in
# test_memory's "micro batch that does not fit" test; it passes alone and on the rerun.
# A second crash of the same test fails it. Assertion failures never rerun.
CRASH_RERUNS = 1
_crashes: dict[str, int] = {}


def pytest_handlecrashitem(crashitem, report, sched):
  _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
  if _crashes[crashitem] <= CRASH_RERUNS:
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"


REWARDS_MODULE = '''
import json, os, signal

calls = 0


def length_reward(prompts, completions, answer, **columns):
  """Logs what it was given, then rewards completions ending in the answer's last digit."""
  global calls
  calls += 1
  with open(os.environ["REWARD_LOG"], "a") as f:
    f.write(json.dumps({"prompts": prompts, "answer": answer,
                        "columns": sorted(columns)}) + "\\n")
  return [float(c.endswith(a[-1])) for c, a in zip(completions, answer)]


def stop_at(prompts, completions, **columns):
  """Fails (or SIGKILLs the process) on call STOP_AT: a crash in the middle of training."""
  global calls
  calls += 1
  if calls == int(os.environ.get("STOP_AT", "0")):
    if os.environ.get("STOP_HOW") == "kill":
      os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("stopped on purpose")
  return [float(len(c) % 2) for c in completions]


def broken(prompts, completions, **columns):
  raise ZeroDivisionError("user bug")


def call_at_every_eos(text):
  """A tool_call_format hook: every turn the model ends (EOS) calls the calculator, with
  an expression made from the turn's length (so the responses differ in length)."""
  return [{"name": "calculator", "arguments": {"expression": f"{len(text)}*{len(text)}"}}]
'''


@pytest.fixture
def user_files(tmp_path, monkeypatch):
  """A JSONL dataset with an extra column and a reward module importable by name."""
  (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop("my_rewards", None)
  rows = [{"question": f"{a}+{b}=", "answer": str(a + b), "source": "unit-test"}
          for a in range(6) for b in range(4)]
  data = tmp_path / "data.jsonl"
  data.write_text("\n".join(json.dumps(r) for r in rows))
  monkeypatch.setenv("REWARD_LOG", str(tmp_path / "reward_log.jsonl"))
  return tmp_path


def write_reward_files(directory):
  """REWARDS_MODULE as my_rewards.py and a 24-row JSONL dataset (question, answer) in
  `directory`, which is returned."""
  (directory / "my_rewards.py").write_text(REWARDS_MODULE)
  rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(4)]
  (directory / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  return directory


def train_on_reward_files(files, workdir, config, stop_at: int = 0) -> dict[int, dict]:
  """`train.train_and_evaluate` with `write_reward_files`' module importable and a fresh
  call counter (stop_at: the reward call that raises, 0 never); {step: its train record}."""
  from grpo_jax import metrics, train  # noqa: PLC0415
  with pytest.MonkeyPatch.context() as patch:
    patch.syspath_prepend(str(files))
    patch.setenv("STOP_AT", str(stop_at))
    sys.modules.pop("my_rewards", None)
    try:
      train.train_and_evaluate(config, workdir)
    finally:
      sys.modules.pop("my_rewards", None)
  return {r["step"]: r for r in metrics.read_metrics(workdir / "grpo_metrics") if "loss" in r}


TIMING = ("step_time", "tokens_per_second", "steps_per_sec", "uptime")


def assert_same_run(resumed: dict, rows: dict, workdir, resumed_workdir) -> None:
  """A resumed run (`resumed`, {step: record}) equals the straight one (`rows`): every
  step's metrics (timings aside) and the final params, bit for bit."""
  import numpy as np  # noqa: PLC0415
  from test_train import final_params  # noqa: PLC0415
  assert sorted(resumed) == sorted(rows)
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMING and not k.startswith("time/")}
  assert {s: strip(r) for s, r in resumed.items()} == {s: strip(r) for s, r in rows.items()}
  (_, a), (_, b) = final_params(workdir), final_params(resumed_workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
