"""Collectives of a compiled program, read from its optimised HLO text.

Each collective is counted as often as it runs: instructions inside a while loop are
multiplied by the loop's trip count (XLA's `known_trip_count`; a loop without one, such
as the sampler's early-stopping decode loop, by the `unknown_trips` the caller gives: its
upper bound). XLA's own `cost_analysis()` counts a loop body once, which is why this is
not taken from there.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"(?:calls|body|to_apply|condition|true_computation|false_computation)"
                      r"=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  shape: tuple[int, ...]  # the largest buffer it reads or writes
  dtype: str
  group_size: int  # chips in each replica group
  count: int  # times it runs per call of the program

  @property
  def buffer_bytes(self) -> int:
    return math.prod(self.shape) * _DTYPE_BYTES[self.dtype]

  @property
  def moved_bytes(self) -> float:
    """Bytes each chip sends per run, for ring algorithms: (n-1)/n of the buffer
    (all-reduce twice: reduce-scatter then all-gather); a permute sends the buffer once."""
    n = self.group_size
    if self.kind == "collective-permute":
      return float(self.buffer_bytes)
    share = (n - 1) / n if n > 1 else 0.0
    return self.buffer_bytes * share * (2 if self.kind == "all-reduce" else 1)


def _kind(op: str) -> str | None:
  base = op[:-len("-start")] if op.endswith("-start") else op
  return base if base in KINDS else None


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # Shardy's form
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)  # iota form [groups, size]<=[n]
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"source_target_pairs=", line)
  return 2 if m else 1


def _largest_shape(text: str) -> tuple[str, tuple[int, ...]]:
  best = ("f32", ())
  for dtype, dims in _SHAPE.findall(text):
    shape = tuple(int(d) for d in dims.split(",") if d)
    if math.prod(shape) * _DTYPE_BYTES[dtype] > math.prod(best[1]) * _DTYPE_BYTES[best[0]]:
      best = (dtype, shape)
  return best


def collectives(hlo_text: str, unknown_trips: int = 1) -> list[Collective]:
  """Every collective of the module with how many times it runs per program call."""
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      bodies[current] = []
      if line.lstrip().startswith("ENTRY"):
        entry = current
    elif current is not None and line.strip() and line.strip() != "}":
      bodies[current].append(line)
  # How often each computation runs: propagate from the entry through calls and loops.
  runs: dict[str, int] = collections.Counter()

  def loop_trips(line: str) -> int:
    """XLA's known trip count, else the bound its condition compares the counter with
    (the largest integer constant there: `i < 24`; the decode loop's `t < length`)."""
    trips = _TRIPS.search(line)
    if trips:
      return int(trips.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    lines = list(bodies.get(cond.group(1), [])) if cond else []
    for inner in list(lines):  # constants may sit in a fusion the condition calls
      for callee, _ in _CALLEES.findall(inner):
        lines += bodies.get(callee, [])
    bounds = [int(c) for inner in lines for c in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", inner)]
    return max(bounds) if bounds else unknown_trips

  def visit(name: str, times: int, depth: int = 0):
    if name not in bodies or depth > 64:
      return
    runs[name] += times
    for line in bodies[name]:
      trips = loop_trips(line) if " while(" in line else 1
      for callee, branches in _CALLEES.findall(line):
        for target in ([callee] if callee else [b.strip().lstrip("%") for b in branches.split(",")]):
          visit(target, times * (1 if "condition=%" + target in line else trips), depth + 1)

  visit(entry or next(iter(bodies), ""), 1)
  # An asynchronous collective on TPU is split over several fusions (start, the steps it
  # overlaps with, done), each holding the same instruction: one channel, counted once.
  by_channel: dict[str, Collective] = {}
  found = []
  for name, times in runs.items():
    for line in bodies[name]:
      m = _INSTR.match(line)
      if not m or not _kind(m.group(2)):
        continue
      head = line.split("replica_groups=")[0].split("channel_id=")[0]
      dtype, shape = _largest_shape(head)
      item = Collective(_kind(m.group(2)), shape, dtype, _group_size(line), times)
      channel = re.search(r"channel_id=(\d+)", line)
      if channel:
        kept = by_channel.get(channel.group(1))
        if kept is None or kept.buffer_bytes * kept.count < item.buffer_bytes * item.count:
          by_channel[channel.group(1)] = item
      else:
        found.append(item)
  return found + list(by_channel.values())


def summarize(found: list[Collective]) -> dict[str, dict[str, float]]:
  """Per kind: runs, bytes of the buffers, bytes sent per chip (all per program call)."""
  out = {}
  for kind in KINDS:
    of_kind = [c for c in found if c.kind == kind]
    if of_kind:
      out[kind] = {"count": sum(c.count for c in of_kind),
                   "buffer_bytes": sum(c.buffer_bytes * c.count for c in of_kind),
                   "moved_bytes": sum(c.moved_bytes * c.count for c in of_kind)}
  return out
