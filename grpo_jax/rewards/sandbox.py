"""code_execution_reward: run a completion's Python code against the row's tests, sandboxed.

Reward = passed / len(tests) for the code of the completion's LAST fenced block
(```python / ```py / ``` ... ```); 0.0 without a block; None where the row has no tests.
Any containment event (a limit hit, a blocked call, a crash) makes the reward 0.0, and is
logged once per kind per process on the "grpo_jax" logger.

How one program runs (`run_tests`)
----------------------------------
The trainer writes a driver script and a payload (code, tests, settings) into a fresh
`tempfile.mkdtemp()` and starts `python -I -S driver.py` (isolated mode, no site-packages:
the program sees the standard library only) in a new session, with a minimal environment
(PATH, HOME=TMPDIR=the work directory) and, where available, in new namespaces. The driver
is two processes:

  launcher  reads the payload, sets up the mounts, forks the worker, then reads a per-run
            random nonce from stdin (after the fork: the worker never holds it) and writes ONE
            line "<nonce> <json>" with the outcome to a pipe the trainer passed it. It is
            undumpable (prctl), so same-uid code cannot read its memory or fds.
  worker    closes stdin and the result pipe, applies the rlimits, drops privileges, installs
            an audit hook (sys.addaudithook: it cannot be removed from Python), exec's the code
            once in a namespace and then each test in it (each under try/except), and reports
            to the launcher over a private pipe. Its parent (getppid) is the launcher, never
            the trainer.

The trainer reads stdout/stderr incrementally and keeps `output_bytes` of each; a program
that prints more is killed (kind "output cap"). After `wall_seconds` the whole process group
is killed with SIGKILL ("wall timeout"); the group is killed after every run in any case.

Isolation, best available mode, probed once per process (`sandbox_mode()`):

  "root"    the trainer runs as root (this is what the tests exercise on our machines):
            `unshare --mount --net --pid --fork --kill-child --mount-proc`. The launcher is
            pid 1 of a new PID namespace (the trainer is invisible; when the launcher exits the
            kernel kills every process left in the namespace: no daemon survives), the network
            namespace is empty (no interface is up: nothing, not even 127.0.0.1, is
            reachable), and in the private mount namespace the launcher hides the trainer's
            working directory, its home and /root behind empty tmpfs mounts (re-binding only
            the Python installation), makes the whole tree read-only and nosuid
            (mount_setattr, recursively), and mounts a size-limited tmpfs on the work
            directory: that is the only writable place, and it vanishes with the namespace.
            The worker then switches to a random unprivileged uid/gid (no supplementary
            groups, no_new_privs), so RLIMIT_NPROC is enforced (it is not for root) and
            file permissions apply too.
  "userns"  a non-root trainer: the same with `--user --map-root-user` (an unprivileged user
            namespace); the worker keeps the trainer's uid but drops every capability (locked
            securebits, empty bounding set, no_new_privs), so it cannot undo the read-only
            mounts. RLIMIT_NPROC is counted per user namespace on Linux >= 5.14.
  "none"    no working `unshare`: plain subprocess in its own session, run in the temp
            directory; a warning is logged once. The audit hook then also refuses fork/exec/
            spawn/subprocess and ctypes. NOT prevented in this mode: reading anything the
            trainer's uid can read, and writing where it can write (files outside the work
            directory); only the audit hook (which ctypes could bypass, hence ctypes is
            refused) stands between the code and the network or other processes.

In every mode the audit hook refuses: sockets other than AF_UNIX, connect/sendto/sendmsg and
name lookups ("blocked network"), os.kill of any pid that is not the worker or one of its
descendants, os.killpg and kill(pid <= 0) ("blocked signal"). The rlimits (SandboxLimits):
RLIMIT_CPU (SIGXCPU at cpu_seconds, SIGKILL one second later: "cpu limit"), RLIMIT_AS
("memory limit" when the code raises MemoryError), RLIMIT_NPROC = max_processes tasks of the
sandbox, threads included, the worker itself counted ("process limit" when fork fails),
RLIMIT_FSIZE ("file limit": Python ignores SIGXFSZ, so the write raises EFBIG), RLIMIT_NOFILE
64, RLIMIT_CORE 0.

The result is taken from the launcher's pipe only, from the line carrying this run's nonce,
so a program that prints a result-looking line changes nothing. It is not tamper-proof: the
tests run in the program's own interpreter, so code that rewrites the driver's frames or
builtins can fake passes; that is the usual limit of in-process test harnesses.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from grpo_jax.errors import UserError

logger = logging.getLogger("grpo_jax")

# Kinds of containment events (ExecutionResult.kind), each warned once per process.
WALL_TIMEOUT = "wall timeout"
CPU_LIMIT = "cpu limit"
MEMORY_LIMIT = "memory limit"
OUTPUT_CAP = "output cap"
BLOCKED_NETWORK = "blocked network"
PROCESS_LIMIT = "process limit"
BLOCKED_SIGNAL = "blocked signal"
FORBIDDEN_CALL = "forbidden call"
FILE_LIMIT = "file limit"
CRASHED = "crashed"
EXITED_EARLY = "exited early"
SANDBOX_ERROR = "sandbox error"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  cpu_seconds: int = 5
  memory_bytes: int = 512 * 2**20  # RLIMIT_AS of each process
  wall_seconds: float = 10.0
  output_bytes: int = 64 * 2**10  # kept of stdout and of stderr; more kills the program
  max_processes: int = 4  # tasks (processes and threads) of the sandbox at once
  file_bytes: int = 2**20  # RLIMIT_FSIZE
  workdir_bytes: int = 16 * 2**20  # the tmpfs work directory (namespace modes)


DEFAULT_LIMITS = SandboxLimits()


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
  passed: int
  total: int
  kind: str | None  # None: ran to the end within its limits
  stdout: str
  stderr: str

  @property
  def reward(self) -> float:
    if self.kind is not None or self.total == 0:
      return 0.0
    return self.passed / self.total


_MESSAGES = {
    WALL_TIMEOUT: "a program exceeded its wall time ({wall} s): killed",
    CPU_LIMIT: "a program exceeded its CPU time ({cpu} s): killed",
    MEMORY_LIMIT: "a program ran out of its memory limit ({mem} MiB)",
    OUTPUT_CAP: "a program printed more than {out} bytes: killed",
    BLOCKED_NETWORK: "a program tried to use the network: refused",
    PROCESS_LIMIT: "a program exceeded its process limit ({nproc} tasks)",
    BLOCKED_SIGNAL: "a program tried to signal a process outside its sandbox: refused",
    FORBIDDEN_CALL: "a program made a call refused without namespaces (fork/exec/ctypes)",
    FILE_LIMIT: "a program tried to write a file over {fsize} bytes",
    CRASHED: "a program died from a signal",
    EXITED_EARLY: "a program exited before its tests ran to the end",
    SANDBOX_ERROR: "the sandbox failed to run a program",
}
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(kind: str, limits: SandboxLimits, detail: str = "") -> None:
  with _warned_lock:
    if kind in _warned:
      return
    _warned.add(kind)
  message = _MESSAGES[kind].format(wall=limits.wall_seconds, cpu=limits.cpu_seconds,
                                   mem=limits.memory_bytes // 2**20, out=limits.output_bytes,
                                   nproc=limits.max_processes, fsize=limits.file_bytes)
  logger.warning("code_execution_reward: %s, reward 0%s (warned once per kind)", message,
                 f" [{detail}]" if detail else "")


# --- code and tests ----------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "py", "python3", "py3")


def extract_code(text: str) -> str | None:
  """The code of the last fenced Python (or untagged) block, or None without one."""
  blocks = [m.group(2) for m in _FENCE_RE.finditer(text) if m.group(1).lower() in _PYTHON_TAGS]
  return blocks[-1] if blocks else None


def parse_tests(tests: Any) -> list[str] | None:
  """A row's tests: a list of snippets, or a string holding such a list as JSON (any other
  string is one test). None or an empty list: not applicable."""
  if tests is None:
    return None
  if isinstance(tests, str):
    try:
      decoded = json.loads(tests)
    except ValueError:
      decoded = [tests]
    tests = decoded if isinstance(decoded, list) else [tests]
  if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
    raise UserError(f"code_execution_reward: a 'tests' entry of type {type(tests).__name__}; "
                    "expected a list of Python snippets like ['assert f(2) == 4'] or its JSON")
  return list(tests) or None


def code_execution_reward(prompts: list[Any], completions: list[Any],
                          tests: list[Any] | None = None, **kwargs) -> list[float | None]:
  """passed / len(tests) for each completion's last fenced Python block, run sandboxed
  (see the module docstring); 0.0 without a block, None for rows without tests."""
  del prompts, kwargs
  from grpo_jax.rewards.builtin import completion_text  # lazy: builtin imports this module
  if tests is None:
    return [None] * len(completions)
  if len(tests) != len(completions):
    raise UserError(f"code_execution_reward got {len(tests)} tests for {len(completions)} "
                    "completions")
  jobs = [(extract_code(completion_text(c)), parse_tests(t)) for c, t in zip(completions, tests)]
  rewards: list[float | None] = [None if t is None else 0.0 for _, t in jobs]
  todo = [i for i, (code, t) in enumerate(jobs) if code is not None and t is not None]
  if todo:
    workers = min(len(todo), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      results = pool.map(lambda i: run_tests(jobs[i][0], jobs[i][1]), todo)
      for i, result in zip(todo, results):
        rewards[i] = result.reward
  return rewards


# --- the sandbox ---------------------------------------------------------------------------

_DRIVER = r'''
import json, os, select, sys

AF_UNIX = 1
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ctypes, rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mounts(cfg):
    ctypes, libc = _libc()
    enc = lambda s: None if s is None else s.encode()

    def mount(src, target, fstype, flags, data=None):
        _check(ctypes, libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags),
                                  enc(data)), "mount " + target)

    keep_fds = {k: os.open(k, os.O_PATH | os.O_DIRECTORY) for k in cfg["keep"]}
    for hidden in cfg["hide"]:
        if not os.path.isdir(hidden):
            continue
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        for keep, fd in keep_fds.items():
            if keep == hidden or keep.startswith(hidden.rstrip("/") + "/"):
                os.makedirs(keep, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", keep, None, MS_BIND | MS_REC)
    workdir = cfg["workdir"]
    os.makedirs(workdir, exist_ok=True)
    # Everything read-only and nosuid, recursively: mount_setattr(AT_FDCWD, "/",
    # AT_RECURSIVE, {attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID}).
    attr = (ctypes.c_uint64 * 4)(1 | 2, 0, 0, 0)
    libc.syscall.restype = ctypes.c_long
    _check(ctypes, libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/",
                                ctypes.c_uint(0x8000), attr, ctypes.c_size_t(32)),
           "mount_setattr /")
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["mode"] == "root" else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
          f"mode=700,size={cfg['limits']['workdir_bytes']}{owner}")


def _drop_capabilities():
    ctypes, libc = _libc()
    # SECBIT_NOROOT | NO_SETUID_FIXUP | KEEP_CAPS_LOCKED and their locks: exec as uid 0
    # grants nothing.
    _check(ctypes, libc.prctl(28, 0x2f, 0, 0, 0), "PR_SET_SECUREBITS")
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(ctypes, libc.capset(header, data), "capset")


def _no_new_privs():
    try:
        ctypes, libc = _libc()
        libc.prctl(38, 1, 0, 0, 0)
    except Exception:
        pass


def _worker(cfg, payload, out_fd):
    import resource
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    send = lambda line: os.write(out_fd, (line + "\n").encode())
    os.chdir(cfg["workdir"])
    lim = cfg["limits"]
    for which, soft, hard in ((resource.RLIMIT_CORE, 0, 0),
                              (resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 1),
                              (resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"]),
                              (resource.RLIMIT_FSIZE, lim["file_bytes"], lim["file_bytes"]),
                              (resource.RLIMIT_NOFILE, 64, 64),
                              (resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])):
        resource.setrlimit(which, (soft, hard))
    mode = cfg["mode"]
    if mode == "root":
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    elif mode == "userns":
        _drop_capabilities()
    _no_new_privs()
    me = os.getpid()

    def flag(kind):
        try:
            send("F " + kind)
        except OSError:
            pass

    def descendant(pid):
        for _ in range(256):
            if pid == me:
                return True
            if pid <= 1:
                return False
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return False
        return False

    network = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
               "socket.getnameinfo"}
    forbidden = set()
    if mode == "none":
        forbidden = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn",
                     "os.spawn", "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym",
                     "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer"}

    def refuse(kind, event):
        flag(kind)
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event, args):
        if event in network:
            refuse("blocked network", event)
        elif event == "socket.__new__":
            if len(args) > 1 and args[1] not in (-1, AF_UNIX):
                refuse("blocked network", event)
        elif event == "os.kill":
            if not (args[0] > 0 and descendant(args[0])):
                refuse("blocked signal", event)
        elif event == "os.killpg":
            refuse("blocked signal", event)
        elif event in forbidden:
            refuse("forbidden call", event)

    sys.addaudithook(hook)

    def note(error):
        if isinstance(error, MemoryError):
            flag("memory limit")
        elif isinstance(error, BlockingIOError):
            flag("process limit")
        elif isinstance(error, OSError) and error.errno == 27:  # EFBIG (SIGXFSZ is ignored)
            flag("file limit")

    def leave_if_forked():
        if os.getpid() != me:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(0)

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["solution.py"]
    try:
        exec(compile(payload["code"], "solution.py", "exec"), namespace)
    except BaseException as error:
        leave_if_forked()
        note(error)
    leave_if_forked()
    passed = 0
    for i, test in enumerate(payload["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), namespace)
            passed += 1
        except BaseException as error:
            leave_if_forked()
            note(error)
        leave_if_forked()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    send(f"R {passed} {len(payload['tests'])}")


def main():
    result_fd = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        payload = json.load(f)
    os.unlink(sys.argv[2])
    cfg = payload["config"]
    setup_error = None
    if cfg["mounts"]:
        try:
            _mounts(cfg)
        except Exception as error:
            setup_error = repr(error)
    else:
        os.chdir(cfg["workdir"])
    reader, writer = os.pipe()
    worker = os.fork()
    if worker == 0:
        try:
            os.close(reader)
            os.close(result_fd)
            if setup_error is None:
                _worker(cfg, payload, writer)
        except BaseException as error:
            try:
                os.write(writer, ("E " + repr(error).replace("\n", " ") + "\n").encode())
                sys.stderr.write(f"sandbox worker: {error!r}\n")
                sys.stderr.flush()
            except BaseException:
                pass
        os._exit(0)
    os.close(writer)
    try:
        ctypes, libc = _libc()
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<pid>/{mem,fd} for others
    except Exception:
        pass
    nonce = sys.stdin.readline().strip()
    os.set_blocking(reader, False)
    data, status, cpu = bytearray(), None, 0.0

    def drain():
        while True:
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            if len(data) < 2**20:
                data.extend(chunk)

    while status is None:
        select.select([reader], [], [], 0.05)
        drain()
        while True:  # reap the worker and any orphan re-parented to us (pid 1)
            try:
                pid, st, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == worker:
                status, cpu = st, usage.ru_utime + usage.ru_stime
    drain()
    flags, passed, total, error = [], None, None, setup_error
    for line in bytes(data).decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "F" and len(flags) < 64:
            flags.append(line[2:][:40])
        elif len(parts) == 3 and parts[0] == "R" and parts[1].isdigit() and parts[2].isdigit():
            passed, total = int(parts[1]), int(parts[2])  # the last one: the driver's
        elif parts[:1] == ["E"] and error is None:
            error = line[2:][:500]
    report = {"passed": passed, "total": total, "flags": sorted(set(flags))[:16],
              "status": status, "cpu": cpu, "error": error}
    os.write(result_fd, (nonce + " " + json.dumps(report) + "\n").encode())
    os._exit(0)


main()
'''

_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/opt",
                "/proc", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var")


def _unshare_binary() -> str | None:
  return shutil.which("unshare") or next(
      (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)


def _python() -> str:
  return os.path.realpath(sys.executable)


def _prefix(mode: str) -> list[str]:
  if mode == "none":
    return []
  user = ["--user", "--map-root-user"] if mode == "userns" else []
  return [_unshare_binary(), *user, "--mount", "--propagation", "private", "--net", "--pid",
          "--fork", "--kill-child", "--mount-proc"]


def _keep_and_hide(mode: str) -> tuple[list[str], list[str]]:
  """Directories the sandbox must still see (the Python installation) and the ones it gets
  empty tmpfs mounts over (the trainer's cwd and home, and any non-traversable ancestor of
  the installation, e.g. /root, when the worker runs as another uid)."""
  keep = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                               os.path.dirname(_python()))})
  hide = {os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~"))}
  if mode == "root":
    hide.add("/root")
    for path in keep:
      parts = path.split("/")
      for depth in range(2, len(parts) + 1):
        ancestor = "/".join(parts[:depth])
        try:
          if not os.stat(ancestor).st_mode & 0o001:
            hide.add(ancestor)
            break
        except OSError:
          break
  hide = {h for h in hide if h not in _SYSTEM_DIRS and os.path.isdir(h)}
  # Other programs' temporary files: the work directory is mounted back (empty) in /tmp.
  hide |= {d for d in ("/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)}
  # Outermost first; one inside another hidden directory is hidden already.
  ordered = []
  for h in sorted(hide, key=len):
    if not any(h.startswith(o.rstrip("/") + "/") for o in ordered):
      ordered.append(h)
  return keep, ordered


_mode_lock = threading.Lock()
_force_mode: tuple[str, bool] | None = None  # tests: run a given (mode, mounts)


@functools.cache
def _probe() -> tuple[str, bool]:
  candidates = []
  if sys.platform.startswith("linux") and _unshare_binary():
    candidates = [("root", True), ("root", False)] if os.geteuid() == 0 else []
    candidates += [("userns", True), ("userns", False)]
  for mode, mounts in candidates:
    result = _run(mode, mounts, "import fractions\nx = fractions.Fraction(1, 2)",
                  ["assert x * 2 == 1"], DEFAULT_LIMITS, warn=False)
    if result.kind is None and result.passed == 1:
      if not mounts:
        logger.warning("code_execution_reward: no private mount setup here: sandboxed programs "
                       "can read and write what their uid can outside the work directory "
                       "(warned once)")
      if mode == "userns" and os.geteuid() == 0:
        logger.warning("code_execution_reward: running as root without the root sandbox: "
                       "RLIMIT_NPROC does not bind uid 0, so a fork bomb is stopped only by "
                       "the wall timeout (warned once)")
      return mode, mounts
  logger.warning("code_execution_reward: no working `unshare` (Linux namespaces) here: "
                 "programs run without PID/network/mount isolation, guarded only by rlimits, "
                 "a session, a temp directory and an audit hook (no fork, exec, sockets, "
                 "ctypes); they can read and write what this user can (warned once)")
  return "none", False


def sandbox_mode() -> tuple[str, bool]:
  """(mode, mounts): "root", "userns" or "none" (see the module docstring), and whether the
  read-only mount setup works. Probed once per process."""
  if _force_mode is not None:
    return _force_mode
  with _mode_lock:
    return _probe()


def run_tests(code: str, tests: Sequence[str], limits: SandboxLimits = DEFAULT_LIMITS
              ) -> ExecutionResult:
  """Run `code` once, then each test snippet in its namespace, in the sandbox."""
  mode, mounts = sandbox_mode()
  return _run(mode, mounts, code, list(tests), limits)


def _run(mode: str, mounts: bool, code: str, tests: list[str], limits: SandboxLimits,
         warn: bool = True) -> ExecutionResult:
  tmpdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
  uid = secrets.randbelow(2**30) + 2**30 if mode == "root" else None
  keep, hide = _keep_and_hide(mode)
  nproc = limits.max_processes + (2 if mode == "userns" else 0)
  config = {"mode": mode, "mounts": mounts, "workdir": tmpdir, "uid": uid, "keep": keep,
            "hide": hide, "nproc": nproc, "limits": dataclasses.asdict(limits)}
  driver, payload = os.path.join(tmpdir, "driver.py"), os.path.join(tmpdir, "payload.json")
  with open(driver, "w") as f:
    f.write(_DRIVER)
  with open(payload, "w") as f:
    json.dump({"config": config, "code": code, "tests": tests}, f)
  env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmpdir, "TMPDIR": tmpdir,
         "LANG": "C.UTF-8"}
  reader, writer = os.pipe()
  try:
    proc = subprocess.Popen([*_prefix(mode), _python(), "-I", "-S", driver, str(writer), payload],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(writer,), cwd=tmpdir, env=env,
                            start_new_session=True)
  except BaseException:
    os.close(reader)
    os.close(writer)
    shutil.rmtree(tmpdir, ignore_errors=True)
    raise
  os.close(writer)
  try:
    nonce = secrets.token_hex(16)
    try:
      proc.stdin.write((nonce + "\n").encode())
      proc.stdin.close()
    except OSError:
      pass
    killed, outputs = _collect(proc, reader, limits)
  finally:
    _kill(proc, uid)
    os.close(reader)
    for stream in (proc.stdout, proc.stderr):
      stream.close()
    shutil.rmtree(tmpdir, ignore_errors=True)
  stdout, stderr, result_data = outputs
  report_json = _report(result_data, nonce)
  kind, detail = _classify(killed, report_json, limits)
  if kind is not None and warn:
    _warn_once(kind, limits, detail)
  passed = (report_json or {}).get("passed") or 0
  total = len(tests)
  return ExecutionResult(passed=min(passed, total), total=total, kind=kind,
                         stdout=stdout.decode("utf-8", "replace"),
                         stderr=stderr.decode("utf-8", "replace"))


def _collect(proc: subprocess.Popen, reader: int, limits: SandboxLimits):
  """Read stdout, stderr and the result pipe until all close or a limit is hit."""
  kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
          reader: bytearray()}
  caps = {proc.stdout.fileno(): limits.output_bytes, proc.stderr.fileno(): limits.output_bytes,
          reader: 2**20}
  deadline = time.monotonic() + limits.wall_seconds
  killed = None
  with selectors.DefaultSelector() as selector:
    for fd in kept:
      selector.register(fd, selectors.EVENT_READ)
    while selector.get_map() and killed is None:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        killed = WALL_TIMEOUT
        break
      for key, _ in selector.select(remaining):
        chunk = os.read(key.fd, 65536)
        if not chunk:
          selector.unregister(key.fd)
          continue
        room = caps[key.fd] - len(kept[key.fd])
        kept[key.fd].extend(chunk[:max(room, 0)])
        if len(chunk) > room and key.fd != reader:
          killed = OUTPUT_CAP
          break
  out, err = bytes(kept[proc.stdout.fileno()]), bytes(kept[proc.stderr.fileno()])
  return killed, (out, err, bytes(kept[reader]))


def _kill(proc: subprocess.Popen, uid: int | None) -> None:
  """SIGKILL the session's process group (and, as root, every process of the sandbox uid)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  if uid is not None:
    for entry in os.listdir("/proc"):
      if entry.isdigit():
        try:
          with open(f"/proc/{entry}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
          if str(uid) in uids:
            os.kill(int(entry), signal.SIGKILL)
        except (OSError, StopIteration, ValueError):
          pass
  proc.wait()


def _report(data: bytes, nonce: str) -> dict | None:
  prefix = (nonce + " ").encode()
  for line in data.splitlines():
    if line.startswith(prefix):
      try:
        report = json.loads(line[len(prefix):])
      except ValueError:
        return None
      return report if isinstance(report, dict) else None
  return None


_FLAG_ORDER = (MEMORY_LIMIT, PROCESS_LIMIT, FILE_LIMIT, BLOCKED_NETWORK, BLOCKED_SIGNAL,
               FORBIDDEN_CALL)


def _classify(killed: str | None, report: dict | None, limits: SandboxLimits
              ) -> tuple[str | None, str]:
  if killed is not None:
    return killed, ""
  if report is None:
    return SANDBOX_ERROR, "no result from the driver"
  if report.get("error"):
    return SANDBOX_ERROR, str(report["error"])[:300]
  status, flags = report.get("status"), set(report.get("flags") or ())
  if isinstance(status, int) and os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                 and report.get("cpu", 0) >= limits.cpu_seconds - 0.05):
      return CPU_LIMIT, ""
    if sig == signal.SIGXFSZ:
      return FILE_LIMIT, ""
    if MEMORY_LIMIT in flags:
      return MEMORY_LIMIT, ""
    return CRASHED, signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
  for kind in _FLAG_ORDER:
    if kind in flags:
      return kind, ""
  if report.get("passed") is None:
    return EXITED_EARLY, ""
  return None, ""
