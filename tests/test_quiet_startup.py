"""A normal run starts without library noise (TensorFlow's oneDNN banner, transformers'
"PyTorch was not found" advisory), and the user's own settings of those switches win."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCHES = ("TF_ENABLE_ONEDNN_OPTS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
NOISE = ("oneDNN", "PyTorch was not found", "None of PyTorch")

# Makes torch look absent, as on a JAX-only install (the test extra installs torch, which
# would hide transformers' advisory), then runs `python -m grpo_jax.train`.
_RUN_TRAIN_WITHOUT_TORCH = """
import importlib.util, runpy, sys
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
  return None if name.split(".")[0] == "torch" else _find_spec(name, package)
importlib.util.find_spec = find_spec
sys.argv[0] = "grpo_jax.train"
runpy.run_module("grpo_jax.train", run_name="__main__", alter_sys=True)
"""


def _environment(**changes):
  """The environment of a plain command line: none of the test session's own settings
  (conftest's TF_CPP_MIN_LOG_LEVEL, fake devices) nor of the switches under test."""
  env = {k: v for k, v in os.environ.items()
         if k not in SWITCHES + ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS", "TRANSFORMERS_VERBOSITY")}
  env.update(JAX_PLATFORMS="cpu", **changes)
  return env


def _switches_after_import(env):
  code = f"import json, os, grpo_jax; print(json.dumps({{k: os.environ.get(k) for k in {SWITCHES}}}))"
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
  return json.loads(result.stdout)


def test_importing_grpo_jax_sets_quiet_defaults_the_user_can_override():
  assert _switches_after_import(_environment()) == {
      "TF_ENABLE_ONEDNN_OPTS": "0", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
  mine = {"TF_ENABLE_ONEDNN_OPTS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": ""}
  assert _switches_after_import(_environment(**mine)) == mine


def test_tiny_training_run_prints_no_library_noise(tmp_path):
  command = [sys.executable, "-c", _RUN_TRAIN_WITHOUT_TORCH, f"--workdir={tmp_path / 'run'}",
             "--config.max_steps=2", "--config.sft_steps=0", "--config.eval_every=1",
             "--config.checkpoint_every=1"]
  result = subprocess.run(command, env=_environment(), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  assert "step 2/2" in result.stderr  # our own progress output still shows
  for noise in NOISE:
    assert noise not in output, f"{noise!r} in the output:\n{output[-3000:]}"
  # The progress line (not a terminal here): one line per step, each with its own step's
  # accuracy (evaluated every step), the last one printed once.
  lines = [l for l in result.stderr.splitlines() if l.startswith("step ")]
  assert [l.split(" | ")[0] for l in lines] == ["step 0/2", "step 1/2", "step 2/2"], lines
  records = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "grpo_metrics" /
                                                    "metrics.jsonl").read_text().splitlines())
             if "eval/accuracy" in r}
  for line in lines:
    step = int(line.split("/")[0].split()[1])
    assert f"acc {records[step]['eval/accuracy']:.3g}" in line, (line, records[step])
  assert "(compiling)" in lines[1] and "ETA" in lines[2]



def _libtpu_environment():
  """A plain command line's environment in which libtpu runs its start-up even while
  another process (a test worker, a training run) holds /tmp/libtpu_lockfile: without
  ALLOW_MULTIPLE_LIBTPU_LOAD it would stop early and silently, and the check below would
  pass without the fix."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("TPU_") and k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  return env


LIBTPU_NOISE = ("could not determine TPU", "libtpu_init_utils", "Failed to find host bounds")


def test_libtpu_is_silent_on_a_machine_without_a_tpu():
  """With the [tpu] extra on a CPU machine, jax's backend search (train) and a topology
  compile (plan) load libtpu; it used to print five lines of errors at every start."""
  pytest.importorskip("libtpu")
  from grpo_jax import startup  # noqa: PLC0415
  env = _libtpu_environment()
  if not startup.no_tpu_here(env):
    pytest.skip("a TPU is on this machine")
  for code in ("import jax; jax.devices()",  # what libtpu does without the fix
               "import grpo_jax, jax; jax.devices()",
               "import grpo_jax.plan.__main__; from jax.experimental import topologies; "
               "topologies.get_topology_desc(topology_name='v5e:2x4', platform='tpu')"):
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    noisy = [n for n in LIBTPU_NOISE if n in result.stderr]
    if code.startswith("import jax;"):
      assert noisy, "the probe no longer reproduces libtpu's noise: the check proves nothing"
    else:
      assert noisy == [], result.stderr[-3000:]


def test_no_tpu_here_reads_the_environment_and_the_machine(tmp_path):
  from grpo_jax import startup  # noqa: PLC0415
  assert startup.no_tpu_here({}, str(tmp_path))
  assert not startup.no_tpu_here({"JAX_PLATFORMS": "tpu"}, str(tmp_path))
  assert not startup.no_tpu_here({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, str(tmp_path))
  pci = tmp_path / "sys" / "bus" / "pci" / "devices"
  for name, vendor, device in (("0000:00:04.0", "0x1ae0", "0x0042"),  # gVNIC: not a TPU
                               ("0000:00:05.0", "0x10de", "0x0063")):  # not Google's
    (pci / name).mkdir(parents=True)
    (pci / name / "vendor").write_text(vendor + "\n")
    (pci / name / "device").write_text(device + "\n")
  assert startup.no_tpu_here({}, str(tmp_path))
  (pci / "0000:00:06.0").mkdir()
  (pci / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")
  (pci / "0000:00:06.0" / "device").write_text("0x0063\n")  # a v5e chip
  assert not startup.no_tpu_here({}, str(tmp_path))
  env = {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}
  startup.quiet_defaults(env)  # described by the user: left as it is
  assert env["TPU_WORKER_HOSTNAMES"] == "10.0.0.2,10.0.0.3" and "TPU_HOST_BOUNDS" not in env
