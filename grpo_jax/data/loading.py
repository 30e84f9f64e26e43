"""Prompt datasets from one `dataset` config string: the demo, local files, or the HF hub.

Spec forms (the `dataset` config field):
  demo:arithmetic              the embedded demo; eval = its held-out split
  demo:word_problems           arithmetic word problems for chat models (SmolLM2 recipe)
  json:PATH  jsonl:PATH        JSON lines or a JSON array/object file
  parquet:PATH  csv:PATH       via `datasets.load_dataset(<format>, data_files=PATH)`
  PATH.json|.jsonl|.parquet|.csv   a local file, format inferred from the extension
  owner/name[:config]          a hub dataset, `datasets.load_dataset(name, config)`
  hf:name[:config]             a hub dataset without an owner (or to be explicit)

A bare "word:rest" whose word is not a known prefix is an error rather than a hub name, so
a typo such as "jsnl:data.jsonl" is reported instead of being looked up on the hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import datasets
import numpy as np

from grpo_jax.data import demo, word_problems
from grpo_jax.errors import UserError

FILE_FORMATS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
DEMOS = ("arithmetic", "word_problems")
PREFIXES = ("demo", *FILE_FORMATS, "hf")
_PREFIX_RE = re.compile(r"[A-Za-z][\w-]*")  # "word:" (not "owner/name:", not "./path:")


def load_prompt_dataset(spec: str, prompt_column: str = "prompt", *,
                        eval_split: str | None = None, eval_size: int = 0, seed: int = 0
                        ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
  """(train, eval or None) for a dataset spec (forms in the module docstring).

  Eval: the split named `eval_split` when the source has one; otherwise `eval_size` rows
  held out of train with `seed` (0: no eval). For the demo, `eval_size` 0 means its
  default held-out size (256), since the demo always has a held-out split.
  """
  if eval_size < 0:
    raise UserError(f"eval_size={eval_size}; must be >= 0")
  prefix, _, rest = spec.partition(":")
  if prefix == "demo":
    train, evaluation = _load_demo(rest, eval_size, seed)
  else:
    splits = _load_splits(spec)
    train, evaluation = _choose_splits(spec, splits, eval_split, eval_size, seed)
  for name, part in (("train", train), ("eval", evaluation)):
    if part is not None:
      _check_columns(spec, name, part, prompt_column)
  return train, evaluation


def _where_not_utf8(path: str) -> str:
  """"at line N " of the first line of a text file that is not valid UTF-8 (raw bytes, or a
  JSON escape of a lone surrogate), or ""."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        text = raw.decode("utf-8")
        if "\\ud" in text.lower():  # a JSON escape that may decode to a lone surrogate
          json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
      except (UnicodeError, ValueError):
        return f"at line {number} "
  return ""


@contextlib.contextmanager
def _quiet_datasets():
  """`datasets` logs a malformed file's parse error (twice) before raising it; the raised
  error becomes our one line, so its logger stays quiet meanwhile."""
  logger = logging.getLogger("datasets")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _load_demo(name: str, eval_size: int, seed: int
               ) -> tuple[datasets.Dataset, datasets.Dataset]:
  if name not in DEMOS:
    raise UserError(f"dataset 'demo:{name}' is unknown; demos: "
                    + ", ".join(f"demo:{d}" for d in DEMOS))
  if name == "word_problems":
    return word_problems.make_word_problem_splits(
        seed=seed, num_eval=eval_size or word_problems.DEFAULT_NUM_EVAL)
  return demo.make_arithmetic_splits(seed=seed, num_eval=eval_size or demo.DEFAULT_NUM_EVAL)


def _load_splits(spec: str) -> datasets.DatasetDict:
  """The DatasetDict behind a file or hub spec."""
  prefix, sep, rest = spec.partition(":")
  if sep and prefix in FILE_FORMATS:
    return _load_file(FILE_FORMATS[prefix], rest)
  if sep and prefix == "hf":
    return _load_hub(rest)
  extension = os.path.splitext(spec)[1].lstrip(".").lower()
  if extension in FILE_FORMATS and os.path.isfile(spec):
    return _load_file(FILE_FORMATS[extension], spec)
  if sep and _PREFIX_RE.fullmatch(prefix):
    raise UserError(f"dataset {spec!r}: unknown prefix {prefix!r}; allowed: "
                    + ", ".join(f"{p}:" for p in PREFIXES)
                    + " (hub datasets: owner/name[:config])")
  if extension in FILE_FORMATS:
    return _load_file(FILE_FORMATS[extension], spec)  # reports the missing file
  if os.path.exists(spec):
    raise UserError(f"dataset file {spec!r}: cannot infer the format; use a prefix "
                    + ", ".join(f"{p}:PATH" for p in FILE_FORMATS))
  return _load_hub(spec)


def _load_file(builder: str, path: str) -> datasets.DatasetDict:
  if not os.path.isfile(path):
    raise UserError(f"dataset file not found: {path}")
  if os.path.getsize(path) == 0:
    raise UserError(f"dataset file {path} is empty")
  try:
    with _quiet_datasets():  # its logger repeats the parse error; ours says it once
      return datasets.load_dataset(builder, data_files=path)
  except (datasets.exceptions.DatasetGenerationError, ValueError, UnicodeError) as e:
    where = _where_not_utf8(path)  # bytes that are not UTF-8, an escaped lone surrogate
    if where:
      raise UserError(f"dataset file {path}: text that is not valid UTF-8 {where}"
                      f"({' '.join(str(e).split())[:120]})") from None
    # A header-only CSV surfaces as ValueError("... corresponds to no data").
    cause = e.__cause__ or e
    raise UserError(f"dataset file {path} could not be read as {builder} (empty or malformed?): "
                    f"{type(cause).__name__}: {cause}") from e


def _load_hub(name: str) -> datasets.DatasetDict:
  """A hub dataset ("name" or "name:config"). Downloads: only reached for hub specs."""
  path, _, config = name.partition(":")
  return datasets.load_dataset(path, config or None)


def _choose_splits(spec: str, splits: datasets.DatasetDict, eval_split: str | None,
                   eval_size: int, seed: int
                   ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
  """Train and eval from the loaded splits: a named eval split, else a seeded hold-out."""
  train = _train_split(spec, splits)
  if eval_split is not None and eval_split in splits:
    return train, splits[eval_split]
  if eval_size > 0:
    return _hold_out(spec, train, eval_size, seed)
  if eval_split is not None:
    raise UserError(f"dataset {spec!r} has no split {eval_split!r} (splits: "
                    f"{', '.join(splits)}); name one of them or set eval_size > 0")
  return train, None


def _train_split(spec: str, splits: datasets.DatasetDict) -> datasets.Dataset:
  if "train" in splits:
    return splits["train"]
  if len(splits) == 1:
    return next(iter(splits.values()))
  raise UserError(f"dataset {spec!r} has no 'train' split (splits: {', '.join(splits)})")


def _hold_out(spec: str, train: datasets.Dataset, eval_size: int, seed: int
              ) -> tuple[datasets.Dataset, datasets.Dataset]:
  """Hold out `eval_size` seeded-random rows; both parts keep the file's row order."""
  if eval_size >= len(train):
    raise UserError(f"eval_size={eval_size} but dataset {spec!r} has only {len(train)} rows; "
                    "eval_size must leave some rows for training")
  held = np.random.default_rng(seed).permutation(len(train))[:eval_size]
  keep = np.setdiff1d(np.arange(len(train)), held)
  return train.select(keep), train.select(np.sort(held))


def _check_columns(spec: str, part_name: str, part: datasets.Dataset, prompt_column: str):
  if len(part) == 0:
    raise UserError(f"dataset {spec!r} ({part_name}) is empty")
  if prompt_column not in part.column_names:
    raise UserError(f"dataset {spec!r} ({part_name}) has no prompt column {prompt_column!r}; "
                    f"columns: {', '.join(part.column_names)} (set prompt_column)")
