"""code_execution_reward and its sandbox: extraction, scoring, and hostile programs (each
scores 0, is logged once per kind, and leaves the test process and its files untouched)."""

import json
import os
import socket
import struct
import uuid

import pytest

from grpo_jax.rewards import BUILTIN_REWARDS, SandboxLimits, code_execution_reward, run_tests
from grpo_jax.rewards import sandbox
from grpo_jax.rewards.sandbox import extract_code

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=3)
SQUARE = "def f(x):\n  return x * x\n"
SQUARE_TESTS = ["assert f(2) == 4", "assert f(3) == 9"]
MODE, MOUNTS = sandbox.sandbox_mode()
namespaces = pytest.mark.skipif(MODE == "none", reason="no Linux namespaces on this machine")


def fenced(code, tag="python"):
  return f"Here you go:\n```{tag}\n{code}```\nDone."


@pytest.fixture(autouse=True)
def _fresh_warnings():
  sandbox._warned.clear()
  yield
  sandbox._warned.clear()


def _parent(pid: int) -> int:
  with open(f"/proc/{pid}/stat") as f:
    return int(f.read().rsplit(")", 1)[1].split()[1])


def _of_another_worker(pid: int) -> bool:
  """True where `pid` descends from a sibling of this process (another pytest-xdist worker
  of the same run, whose own sandbox tests may be running now). An orphan left behind
  (reparented to init or a subreaper) or a descendant of this process is not."""
  if "PYTEST_XDIST_WORKER" not in os.environ:  # -n 0: no other worker
    return False
  me, controller = os.getpid(), os.getppid()
  try:
    while pid > 1:
      parent = _parent(pid)
      if parent == controller and pid != me:
        return True
      pid = parent
  except (OSError, ValueError, IndexError):
    pass
  return False


def sandbox_processes(marker):
  """Pids of live processes whose command line holds `marker` ("grpo_sandbox_": the driver's
  temp directory), except those another xdist worker is running for its own tests."""
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if marker.encode() in f.read() and not _of_another_worker(int(entry)):
            found.append(int(entry))
      except OSError:
        pass
  return found


def warnings_of(caplog, kind):
  return [r for r in caplog.records
          if r.name == "grpo_jax" and r.getMessage().startswith("code_execution_reward")
          and sandbox._MESSAGES[kind].split("{")[0] in r.getMessage()]


def assert_contained(caplog, result, kind):
  assert result.kind == kind
  assert result.reward == 0.0
  assert len(warnings_of(caplog, kind)) == 1
  assert sandbox_processes("grpo_sandbox_") == []


# --- extraction and scoring --------------------------------------------------------------

def test_extract_code_takes_the_last_python_block():
  text = "```python\nx = 1\n```\nthen\n```\nx = 2\n```\n```text\nnot code\n```"
  assert extract_code(text) == "x = 2\n"
  assert extract_code("no fence at all") is None
  assert extract_code("```python\nunterminated") is None


def test_correct_solution_scores_one_and_is_registered():
  assert BUILTIN_REWARDS["code_execution_reward"] is code_execution_reward
  assert code_execution_reward(["p"], [fenced(SQUARE)], tests=[SQUARE_TESTS]) == [1.0]


def test_half_the_tests_pass_and_a_raising_test_does_not_stop_the_others():
  tests = ["assert f(2) == 4", "raise ValueError('boom')", "assert f(3) == 10", "assert f(0) == 0"]
  result = run_tests(SQUARE, tests, LIMITS)
  assert (result.passed, result.total, result.kind, result.reward) == (2, 4, None, 0.5)


def test_batch_forms_none_and_no_block():
  completions = [fenced(SQUARE), "I would square it.", [{"role": "assistant",
                                                         "content": fenced(SQUARE, tag="")}],
                 fenced("def f(x):\n  return x + x\n"), fenced(SQUARE)]
  tests = [json.dumps(SQUARE_TESTS), SQUARE_TESTS, SQUARE_TESTS, SQUARE_TESTS, None]
  assert code_execution_reward(["p"] * 5, completions, tests=tests) == [1.0, 0.0, 1.0, 0.5, None]
  assert code_execution_reward(["p"] * 2, completions[:2]) == [None, None]


def test_the_last_block_is_the_one_run():
  text = fenced("def f(x):\n  return 0\n") + fenced(SQUARE) + fenced("def f(x):\n  return -1\n")
  assert code_execution_reward(["p"], [text], tests=[SQUARE_TESTS]) == [0.0]
  assert code_execution_reward(["p"], [fenced("def f(x): return 0\n") + fenced(SQUARE)],
                               tests=[SQUARE_TESTS]) == [1.0]


def test_stdout_is_returned_and_a_forged_result_line_changes_nothing():
  code = ("import os\nfor fd in range(3, 64):\n  try:\n    os.write(fd, b'R 5 5\\n')\n"
          "  except OSError:\n    pass\nprint('R 2 2')\nprint(json_line)\n")
  forged = json.dumps({"passed": 2, "total": 2, "flags": [], "status": 0, "error": None})
  result = run_tests(f"json_line = {forged!r}\n" + code, ["assert False", "assert False"], LIMITS)
  assert result.passed == 0 and result.reward == 0.0 and result.kind is None
  assert "R 2 2" in result.stdout


# --- hostile programs --------------------------------------------------------------------

def test_infinite_loop_hits_the_cpu_limit(caplog):
  # Wall time to spare: under `-n 2` the other worker may share the cores.
  limits = SandboxLimits(cpu_seconds=2, wall_seconds=15)
  result = run_tests("while True:\n  pass\n", ["assert True"], limits)
  assert_contained(caplog, result, sandbox.CPU_LIMIT)


def test_sleeping_forever_hits_the_wall_timeout(caplog):
  result = run_tests("import time\ntime.sleep(60)\n", ["assert True"], LIMITS)
  assert_contained(caplog, result, sandbox.WALL_TIMEOUT)


def test_memory_hog_fails_and_is_warned_once(caplog):
  for _ in range(2):
    result = run_tests("x = bytearray(10 * 2**30)\n", ["assert len(x) > 0"], LIMITS)
    assert_contained(caplog, result, sandbox.MEMORY_LIMIT)


def test_fork_bomb_is_contained(caplog):
  result = run_tests("import os\nwhile True:\n  os.fork()\n", ["assert True"], LIMITS)
  kind = sandbox.FORBIDDEN_CALL if MODE == "none" else sandbox.PROCESS_LIMIT
  assert_contained(caplog, result, kind)


@namespaces
def test_a_daemon_left_behind_is_killed():
  marker = f"grpo_sandbox_daemon_{uuid.uuid4().hex}"
  code = ("import os, sys\nif os.fork() == 0:\n  os.setsid()\n"
          "  os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', "
          f"{marker!r}])\ndef f():\n  return 1\n")
  result = run_tests(code, ["assert f() == 1"], LIMITS)
  assert result.reward == 1.0
  assert sandbox_processes(marker) == []


@namespaces
def test_an_honest_subprocess_still_works():
  code = ("import subprocess, sys\n"
          "out = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True,"
          " text=True, check=True).stdout\n")
  assert run_tests(code, ["assert out.strip() == '42'"], LIMITS).reward == 1.0


def test_printing_100_mb_is_capped(caplog):
  result = run_tests("print('x' * 100_000_000)\n", ["assert True"], LIMITS)
  assert_contained(caplog, result, sandbox.OUTPUT_CAP)
  assert 0 < len(result.stdout) <= LIMITS.output_bytes


def test_a_large_file_hits_the_file_limit(caplog):
  result = run_tests("open('big', 'wb').write(b'x' * (3 * 2**20))\n", ["assert True"], LIMITS)
  assert_contained(caplog, result, sandbox.FILE_LIMIT)


def test_killing_the_parent_is_refused(caplog):
  code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef f():\n  return 1\n"
  result = run_tests(code, ["assert f() == 1"], LIMITS)
  assert_contained(caplog, result, sandbox.BLOCKED_SIGNAL)
  assert os.getppid() != 1  # this process (the trainer) and its parent are alive


@namespaces
def test_killing_through_ctypes_cannot_reach_the_trainer():
  code = ("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
          "libc.kill(os.getppid(), 9)\nlibc.kill(-1, 9)\nlibc.kill(0, 9)\n")
  result = run_tests(code + "def f():\n  return 1\n", ["assert f() == 1"], LIMITS)
  # kill(0) took the program's own group; the launcher (pid 1 of the namespace) survived to
  # report it, and so did we.
  assert result.kind in (sandbox.CRASHED, None)
  assert result.reward in (0.0, 1.0)
  assert os.getppid() != 1


@pytest.fixture
def listener():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen()
  server.setblocking(False)
  yield server
  server.close()


def assert_no_connection(server):
  with pytest.raises(BlockingIOError):
    server.accept()


def test_network_is_blocked(caplog, listener):
  port = listener.getsockname()[1]
  code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nok = 1\n"
  result = run_tests(code, ["assert ok == 1"], LIMITS)
  assert_contained(caplog, result, sandbox.BLOCKED_NETWORK)
  assert_no_connection(listener)


@namespaces
def test_network_namespace_holds_without_the_audit_hook(listener):
  port = listener.getsockname()[1]
  address = struct.pack("<HH4s8x", socket.AF_INET, socket.htons(port), bytes([127, 0, 0, 1]))
  code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
          "fd = libc.socket(2, 1, 0)\n"
          f"connected = libc.connect(fd, {address!r}, 16) == 0\n")
  result = run_tests(code, ["assert connected"], LIMITS)
  assert (result.kind, result.reward) == (None, 0.0)
  assert_no_connection(listener)


@pytest.mark.skipif(not MOUNTS, reason="no mount namespace on this machine")
def test_files_outside_the_work_directory_are_out_of_reach(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the "trainer's" working directory
  secret = tmp_path / "secret.txt"
  secret.write_text("s3cret")
  escape_tmp = f"/tmp/grpo_sandbox_escape_{uuid.uuid4().hex}"
  code = f"seen = open({str(secret)!r}).read()\n"
  assert run_tests(code, ["assert seen == 's3cret'"], LIMITS).reward == 0.0
  for target in (str(tmp_path / "escape.txt"), escape_tmp):
    code = f"with open({target!r}, 'w') as f:\n  f.write('x')\nwrote = True\n"
    assert run_tests(code, ["assert wrote"], LIMITS).reward == 0.0
    assert not os.path.exists(target)
  # Its own directory is writable, private and empty afterwards.
  code = "with open('mine.txt', 'w') as f:\n  f.write('ok')\nback = open('mine.txt').read()\n"
  assert run_tests(code, ["assert back == 'ok'"], LIMITS).reward == 1.0
  assert sorted(os.listdir(tmp_path)) == ["secret.txt"]


@pytest.mark.parametrize("mode", ["userns", "none"])
def test_other_modes_run_a_solution(mode, monkeypatch):
  """The fallbacks (a non-root user's namespaces; no namespaces at all) still score."""
  if mode == "userns" and MODE == "none":
    pytest.skip("no namespaces")
  monkeypatch.setattr(sandbox.runner, "_force_mode", (mode, mode != "none"))
  assert run_tests(SQUARE, SQUARE_TESTS + ["assert f(1) == 2"], LIMITS).passed == 2
  result = run_tests("import os\nos.kill(os.getppid(), 9)\n", ["assert True"], LIMITS)
  assert result.kind == sandbox.BLOCKED_SIGNAL
