"""Prompts checked at load, every row, before a step draws one: bad rows are found at the
door, named by dataset index, and the run refuses to start (or skips them).

A prompt is good when it is a non-empty string of valid Unicode, or a chat (a non-empty list
of {"role", "content"} messages), and its rendered tokens fit `max_prompt_length` (or
`truncate_prompts` keeps their end).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable

from grpo_jax.errors import UserError

log = logging.getLogger("grpo_jax")
SHOWN = 5  # bad rows named in the message


def why_bad(prompt: Any) -> str | None:
  """What is wrong with one prompt value before tokenizing, or None."""
  if prompt is None:
    return "missing (None)"
  if isinstance(prompt, str):
    if not prompt.strip():
      return "empty"
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError as e:
      return f"not valid Unicode at character {e.start}"
    return None
  if isinstance(prompt, list):
    if not prompt:
      return "an empty chat"
    for message in prompt:
      if not isinstance(message, dict) or "role" not in message or "content" not in message:
        return "a chat whose messages are not {'role', 'content'} dicts"
    return None
  return f"not text (a {type(prompt).__name__}: {str(prompt)[:20]!r})"


def check_prompts(dataset, name: str, column: str,
                  token_counts: Callable[[list], list[int]], max_prompt_length: int,
                  truncate: bool, skip_bad_rows: bool):
  """`dataset` (a `datasets.Dataset`) with its bad prompt rows dropped when
  `skip_bad_rows`, else itself; a UserError (one line: the count and the first rows, by
  index) when it has bad rows and may not skip them. `token_counts(prompts)`: the rendered
  length of each good prompt, in tokens."""
  if dataset is None:
    return None
  if column not in dataset.column_names:
    raise UserError(f"{name} dataset has no column {column!r} (prompt_column); its columns: "
                    f"{', '.join(dataset.column_names)}")
  prompts = dataset[column]
  bad: dict[int, str] = {}
  for i, prompt in enumerate(prompts):
    reason = why_bad(prompt)
    if reason:
      bad[i] = reason
  good = [i for i in range(len(prompts)) if i not in bad]
  if not truncate and good:
    for i, count in zip(good, token_counts([prompts[i] for i in good])):
      if count == 0:
        bad[i] = "empty after tokenizing"
      elif count > max_prompt_length:
        bad[i] = f"{count} tokens > max_prompt_length={max_prompt_length}"
  if not bad:
    return dataset
  rows = sorted(bad)
  shown = "; ".join(f"row {i}: {bad[i]}" for i in rows[:SHOWN])
  more = f" (first {SHOWN} shown)" if len(rows) > SHOWN else ""
  what = (f"{name} dataset: {len(rows)} bad prompt(s) of {len(prompts)} in column "
          f"{column!r}: {shown}{more}")
  if not skip_bad_rows:
    raise UserError(f"{what}; fix them, set truncate_prompts=True for long ones, or "
                    "skip_bad_rows=True to train on the rest")
  if len(rows) == len(prompts):
    raise UserError(f"{what}; no good prompt is left to train on")
  log.warning("%s; skipped (skip_bad_rows)", what)
  keep = set(rows)
  return dataset.select([i for i in range(len(prompts)) if i not in keep])


def fingerprint(spec: str, column: str, *datasets) -> dict[str, Any]:
  """The data's identity, saved with every checkpoint: the source spec, each local file's
  path, size and mtime (for the message), and a SHA-256 of the prompt column of every
  split (what decides: a file touched but unchanged is the same data)."""
  digest = hashlib.sha256()
  for data in datasets:
    if data is not None:
      for prompt in data[column]:
        digest.update(json.dumps(prompt, sort_keys=True, ensure_ascii=False,
                                 default=str).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
  path = spec.split(":", 1)[1] if ":" in spec and not spec.startswith("demo:") else spec
  files = []
  if path and os.path.isfile(path):
    stat = os.stat(path)
    files.append({"path": os.path.abspath(path), "size": stat.st_size,
                  "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))})
  return {"source": spec, "files": files, "prompts_sha256": digest.hexdigest()}


def data_changes(saved: dict | None, current: dict) -> str | None:
  """How the data differs from a checkpoint's (None: the same, or an older checkpoint that
  recorded none)."""
  if not saved or not current or saved.get("prompts_sha256") == current["prompts_sha256"]:
    return None
  where = lambda fp: "; ".join(f"{f['path']}, {f['size']} bytes, modified {f['mtime']}"
                               for f in fp.get("files", [])) or fp.get("source", "?")
  return (f"the prompts differ from those the checkpoint was trained on (then: "
          f"{where(saved)}; now: {where(current)})")
