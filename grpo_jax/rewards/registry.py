"""Reward functions by name: built-ins, import paths, or files; and calling them on a batch.

Specs (the `reward_funcs` config field, a list or a comma-separated string):
  correctness_reward            a built-in name (see BUILTIN_REWARDS)
  soft_overlong_punishment      a built-in built from run options (CONFIGURED_REWARDS:
                                `builtin_options` of resolve_reward_funcs)
  package.module:function       imported with importlib (the module must be importable)
  package.module.function       the same, TRL's dotted form
  path/to/file.py:function      loaded from the file (relative to the working directory)
  reward_model:PATH             a frozen *ForSequenceClassification HF checkpoint (metric
                                name `reward_model`), scored with jit (rewards/model.py)
A callable is accepted as is. Each function's metric name is its `__name__`.

Every function is called TRL-style: `fn(prompts, completions, **columns)` plus
`completion_ids=` (each completion's token ids, up to and including its EOS, without
padding) where the function accepts it: a `completion_ids` parameter or **kwargs. A
function with neither still works; it just does not get the ids.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np

from grpo_jax.errors import UserError
from grpo_jax.rewards.builtin import BUILTIN_REWARDS, CONFIGURED_REWARDS

RewardFunc = Callable[..., Sequence[float | None]]
# Column names that would collide with the arguments the trainer passes (or, for "prompt",
# that TRL does not pass either: the prompt is already the first argument).
RESERVED_COLUMNS = ("prompt", "prompts", "completion", "completions", "completion_ids",
                    "environments")
BUILTIN_NAMES = (*BUILTIN_REWARDS, *CONFIGURED_REWARDS)


def resolve_reward_funcs(specs: str | Sequence[str | RewardFunc],
                         builtin_options: dict[str, Any] | None = None
                         ) -> list[tuple[str, RewardFunc]]:
  """(metric name, function) for each spec, in order. Names must be unique.

  builtin_options: what the configured built-ins are built from (CONFIGURED_REWARDS), e.g.
  {"max_completion_length": 384, "soft_punish_cache": 0} for soft_overlong_punishment.
  """
  if isinstance(specs, str):
    specs = specs.split(",")
  specs = [s.strip() if isinstance(s, str) else s for s in specs]
  specs = [s for s in specs if not isinstance(s, str) or s]
  if not specs:
    raise UserError("reward_funcs is empty; give at least one built-in name "
                    f"({', '.join(BUILTIN_NAMES)}) or an import path module:function")
  resolved = [_resolve(spec, builtin_options or {}) for spec in specs]
  names = [name for name, _ in resolved]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"reward_funcs has several functions named {', '.join(duplicates)}; "
                    "metric names (rewards/<name>/mean) must be unique, rename one")
  return resolved


def _resolve(spec: str | RewardFunc, builtin_options: dict[str, Any]) -> tuple[str, RewardFunc]:
  if callable(spec):
    fn = spec
  elif spec.startswith("reward_model:"):
    from grpo_jax.rewards.model import RewardModel  # loads JAX models: imported on demand
    fn = RewardModel(spec[len("reward_model:"):])
  elif ":" in spec:
    fn = load_callable(spec)
  elif spec in BUILTIN_REWARDS:
    fn = BUILTIN_REWARDS[spec]
  elif spec in CONFIGURED_REWARDS:
    fn = _configured(spec, builtin_options)
  elif "." in spec:
    fn = load_callable(spec)
  else:
    raise UserError(f"reward function {spec!r} is not a built-in ({', '.join(BUILTIN_NAMES)}) "
                    "nor an import path module:function or file.py:function")
  return _name(fn), fn


def _configured(spec: str, options: dict[str, Any]) -> RewardFunc:
  factory, required, optional = CONFIGURED_REWARDS[spec]
  missing = [key for key in required if options.get(key) is None]
  if missing:
    raise UserError(f"built-in reward {spec!r} needs {', '.join(missing)}: pass "
                    f"builtin_options={{{', '.join(repr(k) + ': ...' for k in missing)}}} "
                    "to resolve_reward_funcs (the trainer passes its config's)")
  return factory(**{key: options[key] for key in (*required, *optional)
                    if options.get(key) is not None})


def load_callable(spec: str, what: str = "reward function") -> Callable:
  """The callable at an import path: `package.module:name`, TRL's dotted
  `package.module.name`, or `path/to/file.py:name` (relative to the working directory).
  Errors are UserErrors that begin with `what` and the spec (e.g. "tool 'm:f': ...")."""
  if ":" in spec:
    location, attribute = spec.rsplit(":", 1)
  elif "." in spec:
    location, attribute = spec.rsplit(".", 1)
  else:
    raise UserError(f"{what} {spec!r} is not an import path module:name or file.py:name")
  module = (_load_file(location, what) if location.endswith(".py")
            else _import(location, spec, what))
  if not hasattr(module, attribute):
    raise UserError(f"{what} {spec!r}: {module.__name__} has no attribute {attribute!r}")
  fn = getattr(module, attribute)
  if not callable(fn):
    raise UserError(f"{what} {spec!r} is a {type(fn).__name__}, not callable")
  return fn


def _import(module_name: str, spec: str, what: str):
  try:
    return importlib.import_module(module_name)
  except Exception as e:  # ImportError, or any error raised by the module's own code
    raise UserError(f"{what} {spec!r}: module {module_name!r} does not import: "
                    f"{type(e).__name__}: {e}") from e


def _load_file(path: str, what: str):
  """Executes a user file as a module (registered in sys.modules, so pickling works)."""
  if not os.path.isfile(path):
    raise UserError(f"{what} file not found: {path}")
  module_name = f"grpo_jax_user_rewards_{os.path.splitext(os.path.basename(path))[0]}"
  file_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(file_spec)
  sys.modules[module_name] = module
  try:
    file_spec.loader.exec_module(module)
  except Exception as e:
    del sys.modules[module_name]
    raise UserError(f"{what} file {path} does not import: "
                    f"{type(e).__name__}: {e}") from e
  return module


def _name(fn: RewardFunc) -> str:
  """The metric name: the function's name (functools.partial: the wrapped function's)."""
  if hasattr(fn, "__name__"):
    return fn.__name__
  if isinstance(fn, functools.partial):
    return _name(fn.func)
  return type(fn).__name__


# The largest finite float32: rewards travel to the train step as float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Several weighted rewards are summed in float32 in whatever order the compiler picks; a
# row whose |terms| add up to at most this cannot overflow in any order.
_SUM_LIMIT = FLOAT32_MAX * (1.0 - 2.0**-20)


def compute_rewards(reward_funcs: Sequence[tuple[str, RewardFunc]], prompts: Sequence[Any],
                    completions: Sequence[Any], columns: dict[str, Sequence[Any]],
                    reward_weights: Sequence[float] | None = None,
                    completion_ids: Sequence[Sequence[int]] | None = None,
                    environments: Sequence[Any] | None = None,
                    timeout_seconds: float = 0.0) -> np.ndarray:
  """Rewards float32 [N, F]: column f holds function f's scores, None (n/a) becomes NaN.

  `columns` are the dataset's columns aligned with the completions (repeated per
  generation); each function gets them as keyword arguments, TRL-style, and
  `completion_ids` (one list of token ids per completion; None: not passed) and
  `environments` (TRL's: one environment_factory instance per completion, after its
  rollout; None: not passed) where it accepts them (see the module docstring).
  Every returned value is finite or NaN: a function returning inf (or a number beyond
  float32's range) is a UserError, and so is a row whose total weighted by
  `reward_weights` (None: every function weighs 1) would overflow float32. A call that
  runs longer than `timeout_seconds` (0: no limit) is a UserError naming the function.
  """
  n = len(completions)
  if len(prompts) != n:
    raise ValueError(f"{len(prompts)} prompts for {n} completions; repeat each prompt per "
                     "completion")
  kwargs = {k: list(v) for k, v in columns.items() if k not in RESERVED_COLUMNS}
  for key, values in kwargs.items():
    if len(values) != n:
      raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
  if completion_ids is not None:
    if len(completion_ids) != n:
      raise ValueError(f"{len(completion_ids)} completion_ids for {n} completions")
    completion_ids = [list(ids) for ids in completion_ids]
  prompts = list(prompts)
  rewards = np.empty((n, len(reward_funcs)), np.float32)
  if environments is not None and len(environments) != n:
    raise ValueError(f"{len(environments)} environments for {n} completions")
  optional = {"completion_ids": completion_ids,
              "environments": None if environments is None else list(environments)}
  for f, (name, fn) in enumerate(reward_funcs):
    extra = {**kwargs, **{key: values for key, values in optional.items()
                          if values is not None and accepts_keyword(fn, key)}}
    rewards[:, f] = _call(name, fn, prompts, list(completions), extra, n, timeout_seconds)
  check_weighted_totals(rewards, [name for name, _ in reward_funcs], reward_weights, prompts)
  return rewards


def accepts_keyword(fn: Callable, keyword: str) -> bool:
  """Whether fn can be called with `keyword=...`: a parameter of that name or **kwargs.

  A callable whose signature cannot be read gets it (TRL passes it to every function)."""
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return True
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return True
  return (keyword in parameters
          and parameters[keyword].kind is not inspect.Parameter.POSITIONAL_ONLY)


class RewardTimeout(Exception):
  """A reward call ran past `reward_timeout_seconds` (raised inside it by SIGALRM)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
  """Raises RewardTimeout inside the block after `seconds` (0: no limit). SIGALRM interrupts
  Python code and blocking calls (sleep, a pipe read) of the main thread; elsewhere (a
  worker thread) there is no limit."""
  if not seconds or threading.current_thread() is not threading.main_thread():
    yield
    return

  def expired(signum, frame):
    raise RewardTimeout

  previous = signal.signal(signal.SIGALRM, expired)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _call(name: str, fn: RewardFunc, prompts: list, completions: list,
          kwargs: dict[str, list], n: int, timeout_seconds: float = 0.0) -> np.ndarray:
  try:
    with _time_limit(timeout_seconds):
      values = fn(prompts, completions, **kwargs)
  except RewardTimeout:
    raise UserError(f"reward function {name!r} did not return within "
                    f"reward_timeout_seconds={timeout_seconds:g} (on {n} completions); the "
                    "last checkpoint is intact: fix the function (or raise the limit) and "
                    "rerun to resume") from None
  except (SystemExit, KeyboardInterrupt) as e:  # the function's own, not the user's Ctrl-C
    raise UserError(f"reward function {name!r} raised {type(e).__name__}"
                    f"{f'({e.args[0]!r})' if e.args else ''}; a reward function must return "
                    "its rewards, not end the process") from None
  except Exception as e:
    raise UserError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
  values = _as_list(name, values, n)
  if len(values) != n:
    raise UserError(f"reward function {name!r} returned {len(values)} values for {n} "
                    "completions; expected one number (or None) per completion")
  try:
    exact = np.array([_as_float(v) for v in values], np.float64)
  except (TypeError, ValueError) as e:
    raise UserError(f"reward function {name!r} returned a non-number: {e}") from e
  with np.errstate(over="ignore"):
    rewards = exact.astype(np.float32)
  bad = np.flatnonzero(np.isinf(rewards))
  if bad.size:
    i = int(bad[0])
    value = (f"{exact[i]:g}" if np.isinf(exact[i]) and not isinstance(values[i], int) else
             f"{short_repr(values[i], 30)}, beyond float32's range (+-{FLOAT32_MAX:.4g}),")
    more = f" and for {bad.size - 1} more completion(s)" if bad.size > 1 else ""
    raise UserError(f"reward function {name!r} returned {value} for completion {i} "
                    f"(prompt {short_repr(prompts[i])}){more}; rewards must be finite numbers, "
                    "or None where the function does not apply")
  return rewards


def _as_list(name: str, values: Any, n: int) -> list:
  """A reward function's output as a list, checked once where it enters: a list or tuple, or
  a 1-D array (NumPy, JAX, torch: anything with `ndim == 1` and `tolist`). A dict (its keys
  would be trained on), a string, a set, a scalar or a generator is refused in one line."""
  expected = f"expected a list of {n} numbers (or None), one per completion"
  if isinstance(values, (list, tuple)):
    return list(values)
  if hasattr(values, "ndim") and hasattr(values, "tolist"):
    if values.ndim != 1:
      raise UserError(f"reward function {name!r} returned an array of shape "
                      f"{tuple(values.shape)}; {expected}")
    return values.tolist()
  raise UserError(f"reward function {name!r} returned a {type(values).__name__} "
                  f"({short_repr(values, 40)}); {expected}")


def _as_float(value: Any) -> float:
  """None (not applicable) -> NaN; an int too large for a float64 -> +-inf. Anything but a
  number (a string that reads as one included) raises TypeError."""
  if value is None:
    return math.nan
  if not hasattr(value, "__float__"):  # numbers and 0-d arrays have it; str does not
    raise TypeError(f"{short_repr(value, 30)} (a {type(value).__name__})")
  try:
    return float(value)
  except OverflowError:
    return math.inf if value > 0 else -math.inf


def check_weighted_totals(rewards: np.ndarray, names: Sequence[str],
                          reward_weights: Sequence[float] | None, prompts: Sequence[Any]) -> None:
  """UserError if a row's weighted sum of rewards [N, F] (NaN skipped) may overflow float32.

  The train step computes `sum_f weight_f * reward_f` in float32 (combine_rewards); an
  infinite total would silently zero the group's advantages.
  """
  num_funcs = rewards.shape[1]
  weights = np.ones(num_funcs) if reward_weights is None else np.asarray(reward_weights,
                                                                         np.float64)
  if weights.shape != (num_funcs,):
    raise UserError(f"reward_weights={tuple(reward_weights)!r} has {weights.size} entries for "
                    f"{num_funcs} reward functions; give one weight per function")
  applies = ~np.isnan(rewards)
  with np.errstate(over="ignore", invalid="ignore"):
    terms = rewards * weights.astype(np.float32)  # float32, as on the device
  terms = np.where(applies, terms, 0.0).astype(np.float64)
  bound = np.sum(np.abs(terms), axis=1)  # NaN for inf * 0: not finite either
  several = np.sum(applies, axis=1) > 1
  bad = ~np.isfinite(bound) | (several & (bound > _SUM_LIMIT))
  rows = np.flatnonzero(bad)
  if not rows.size:
    return
  i = int(rows[0])
  involved = [f for f in range(num_funcs) if applies[i, f] and terms[i, f] != 0.0]
  parts = ", ".join(f"{names[f]!r} ({float(rewards[i, f]):g} x weight {float(weights[f]):g})"
                    for f in involved)
  what = "reward functions" if len(involved) > 1 else "reward function"
  verb = "give" if len(involved) > 1 else "gives"
  more = f", and {rows.size - 1} more completion(s) too" if rows.size > 1 else ""
  raise UserError(f"{what} {parts} {verb} completion {i} (prompt {short_repr(prompts[i])}) a "
                  f"weighted total reward beyond float32's range (sum of |weight x reward| "
                  f"{float(bound[i]):g} > {FLOAT32_MAX:.4g}){more}; scale these rewards or "
                  "their reward_weights down")


def short_repr(value: Any, limit: int = 60) -> str:
  """A one-line repr of at most `limit` characters (prompts in error messages)."""
  text = repr(value).replace("\n", "\\n").replace("\r", "\\r")
  return text if len(text) <= limit else text[:limit - 3] + "..."
