"""curves.png: the run's main curves (reward, its spread, accuracy, KL), one panel each."""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping, Sequence

from etils import epath

from grpo_jax.metrics.jsonl import read_metrics

CURVES_FILE = "curves.png"
DEFAULT_CURVES = ("reward", "reward_std", "rewards/correctness_reward/mean", "eval/accuracy",
                  "kl")


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one key, leaving out steps where it is missing or non-finite."""
  points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  return [s for s, _ in points], [float(v) for _, v in points]


def plot_curves(logdir: epath.PathLike, keys: Iterable[str] = DEFAULT_CURVES) -> epath.Path:
  """Writes `<logdir>/curves.png`: one subplot per key that has data, x = step.

  Uses a bare Figure with the Agg canvas (no pyplot), so it works headless and leaves
  matplotlib's global backend alone. With no data at all the image says so.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  logdir = epath.Path(logdir)
  records = read_metrics(logdir)
  curves = [(key, *_series(records, key)) for key in dict.fromkeys(keys)]
  curves = [curve for curve in curves if curve[1]]
  columns = min(3, max(1, len(curves)))
  rows = max(1, math.ceil(len(curves) / columns))
  figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
  FigureCanvasAgg(figure)
  if not curves:
    figure.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
  for index, (key, steps, values) in enumerate(curves):
    axes = figure.add_subplot(rows, columns, index + 1)
    axes.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3)
    axes.set_title(key)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  path = logdir / CURVES_FILE
  path.write_bytes(buffer.getvalue())
  return path
