"""A disk that refuses a checkpoint (full, read-only, failing), recognised anywhere in an
exception chain, including TensorStore's errors inside Orbax's, and described in one line."""

from __future__ import annotations

import errno
import re

# The errors of a disk that cannot take the checkpoint: full, over quota, read-only, not
# ours, failing. Anything else raised while saving is left as it is (a bug, not the disk).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EIO, errno.EFBIG})
# TensorStore reports OS errors inside ValueError messages: "... [os_error_code='28'] ...".
TS_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
_REASON_CHARS = 200


def exception_chain(exc: BaseException | None):
  """`exc`, its causes and contexts (and the members of exception groups), each once."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


def write_errno(exc: BaseException | None) -> int | None:
  """The errno of a disk that refused a write somewhere in `exc`'s chain, else None."""
  for e in exception_chain(exc):
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
      return e.errno
    code = TS_OS_ERROR.search(str(e))
    if code and int(code.group(1)) in WRITE_ERRNOS:
      return int(code.group(1))
  return None


def one_line(text: str, limit: int = _REASON_CHARS) -> str:
  lines = str(text).strip().splitlines()
  line = lines[0].strip() if lines else ""
  return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


def describe_exception(exc: BaseException) -> str:
  """"Type: first line of the message" of the innermost explicit cause (Orbax wraps the
  TensorStore error that says what is wrong in a generic "error while reading")."""
  while exc.__cause__ is not None:
    exc = exc.__cause__
  message = one_line(str(exc))
  return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
