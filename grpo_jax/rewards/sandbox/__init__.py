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

The package: types.py (kinds, SandboxLimits, ExecutionResult, the warnings), reward.py
(extract_code/parse_tests/code_execution_reward), runner.py (sandbox_mode, run_tests and the
trainer side of a run) and child.py (the driver, a stdlib-only script that runs inside the
sandbox; runner.py writes its text into the work directory, it is never imported).
"""

from grpo_jax.rewards.sandbox.reward import code_execution_reward, extract_code, parse_tests
from grpo_jax.rewards.sandbox.types import (BLOCKED_NETWORK, BLOCKED_SIGNAL, CPU_LIMIT,
                                            CRASHED, DEFAULT_LIMITS, EXITED_EARLY, FILE_LIMIT,
                                            FORBIDDEN_CALL, MEMORY_LIMIT, OUTPUT_CAP,
                                            PROCESS_LIMIT, SANDBOX_ERROR, WALL_TIMEOUT,
                                            ExecutionResult, SandboxLimits, _MESSAGES, _warned,
                                            _warn_once)
from grpo_jax.rewards.sandbox.runner import run_tests, sandbox_mode

# Not re-exported: runner._force_mode (tests set it on grpo_jax.rewards.sandbox.runner; a copy
# here would be a different binding that sandbox_mode never reads).

__all__ = [
    "BLOCKED_NETWORK",
    "BLOCKED_SIGNAL",
    "CPU_LIMIT",
    "CRASHED",
    "DEFAULT_LIMITS",
    "EXITED_EARLY",
    "ExecutionResult",
    "FILE_LIMIT",
    "FORBIDDEN_CALL",
    "MEMORY_LIMIT",
    "OUTPUT_CAP",
    "PROCESS_LIMIT",
    "SANDBOX_ERROR",
    "SandboxLimits",
    "WALL_TIMEOUT",
    "_MESSAGES",
    "_warn_once",
    "_warned",
    "code_execution_reward",
    "extract_code",
    "parse_tests",
    "run_tests",
    "sandbox_mode",
]
