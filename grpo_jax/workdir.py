"""The workdir: resolved once, checked for writability before anything is built, and held
by one trainer at a time (`WorkdirLock`)."""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
import sys
import tempfile
import time

from etils import epath

from grpo_jax.errors import UserError

log = logging.getLogger("grpo_jax")


def resolve(workdir) -> epath.Path:
  """An absolute local path (relative to the current directory), or a URL as given."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def check_writable(workdir: epath.Path) -> None:
  """Raises UserError (one line, naming the path) unless `workdir` is, or can be created
  as, a writable directory. Writes nothing that stays: a probe file is removed at once.
  Remote paths (gs://) are left to their first write."""
  if "://" in str(workdir):
    return
  path = os.fspath(workdir)
  probe_dir = path
  while not os.path.exists(probe_dir):  # the nearest existing ancestor must take the mkdir
    probe_dir = os.path.dirname(probe_dir)
  if not os.path.isdir(probe_dir):
    what = "workdir" if probe_dir == path else f"workdir {path}: its parent"
    raise UserError(f"{what} {probe_dir} is a file, not a directory; pass another --workdir")
  try:
    with tempfile.TemporaryFile(dir=probe_dir):
      pass
  except OSError as e:
    raise UserError(f"workdir {path} is not writable ({probe_dir}: {e.strerror}); "
                    "pass another --workdir") from None


# --- One trainer per workdir -------------------------------------------------------------

LOCK_FILE = ".grpo_jax.lock"


def _owner_text(owner: dict) -> str:
  return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (user "
          f"{owner.get('user', '?')}, started {owner.get('started', '?')})")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True


class WorkdirLock:
  """The primary process's claim on a workdir for the whole run.

  Local workdirs: an advisory `fcntl.flock` on `<workdir>/.grpo_jax.lock`, which holds the
  owner (pid, host, user, start time, command). The kernel drops the lock when its process
  dies, however it dies, so a dead owner never blocks a rerun: its record is taken over
  with a warning. Remote workdirs (gs://) have no locks: a marker file written if absent
  and removed at the end; a marker left by a dead run is refused until `break_lock`
  (config.break_workdir_lock) says it is stale.
  """

  def __init__(self, workdir: epath.Path, break_lock: bool = False):
    self.workdir, self.break_lock = workdir, break_lock
    self.path = workdir / LOCK_FILE
    self._fd: int | None = None
    self._made: list[epath.Path] = []  # what claiming created (the workdir, the lock file)
    self.took_over: dict | None = None  # the stale owner record this lock replaced

  def __enter__(self) -> "WorkdirLock":
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "user": getpass.getuser(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "command": " ".join(sys.argv)}
    if "://" in str(self.workdir):
      self._claim_remote(owner)
    else:
      self._claim_local(owner)
    return self

  def _claim_local(self, owner: dict) -> None:
    self._made = [p for p in (self.workdir, self.path) if not p.exists()]
    os.makedirs(os.fspath(self.workdir), exist_ok=True)
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      held = _read_owner(fd)
      os.close(fd)
      raise UserError(f"workdir {self.workdir} is in use by another trainer: "
                      f"{_owner_text(held)}; wait for it, stop it, or pass another --workdir"
                      ) from None
    previous = _read_owner(fd)
    if previous and previous.get("pid") != owner["pid"]:
      self.took_over = previous
      gone = ("no longer running" if previous.get("host") == owner["host"]
              and not _alive(int(previous.get("pid", 0))) else "its lock was released")
      log.warning("workdir %s: taking over the lock of %s (%s)", self.workdir,
                  _owner_text(previous), gone)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _claim_remote(self, owner: dict) -> None:
    if self.path.exists():
      try:
        held = json.loads(self.path.read_text())
      except (OSError, ValueError):
        held = {}
      if not self.break_lock:
        raise UserError(
            f"workdir {self.workdir} is in use by another trainer: {_owner_text(held)} (its "
            f"marker {self.path}); if that run is gone, rerun with "
            "--config.break_workdir_lock=True")
      self.took_over = held
      log.warning("workdir %s: breaking the marker of %s (break_workdir_lock)", self.workdir,
                  _owner_text(held))
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(owner) + "\n")

  def lost(self) -> bool:
    """Whether the workdir was deleted under this lock (its lock file is gone, or is another
    file now: a writer may have recreated the directories)."""
    if self._fd is None:
      return False
    try:
      return os.stat(os.fspath(self.path)).st_ino != os.fstat(self._fd).st_ino
    except FileNotFoundError:
      return True

  def __exit__(self, *exc) -> None:
    if self._fd is not None:  # the record stays (the next owner reads it); the lock goes
      # A run that wrote nothing (it failed before its first file) leaves nothing behind:
      # the lock file and the workdir go if this lock made them and they hold nothing else.
      if (self.path in self._made and os.path.isdir(os.fspath(self.workdir))
          and os.listdir(os.fspath(self.workdir)) == [LOCK_FILE]):
        os.unlink(os.fspath(self.path))
        if self.workdir in self._made:
          os.rmdir(os.fspath(self.workdir))
      os.close(self._fd)
      self._fd = None
    elif "://" in str(self.workdir) and self.path.exists():
      self.path.unlink()


def _read_owner(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}
