"""The workdir: resolved once, and checked for writability before anything is built."""

from __future__ import annotations

import os
import tempfile

from etils import epath

from grpo_jax.errors import UserError


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
