"""`--suggest`: compile other layouts of the same run and name the fastest that fits.

Tried, in order: the mesh splits of the slice (all FSDP, FSDP x data 2, FSDP x tensor 2 and
4), pmap where the replicated state could fit; then, for the fastest that fits, remat off
(faster when memory allows); if nothing fits, bfloat16 parameters (with LoRA: a bfloat16
base, `lora.base_dtype`, which is what the base is stored in whatever `param_dtype` it is
read in) and remat on.
"""

from __future__ import annotations

from typing import Any

from grpo_jax.plan import programs, report, topology


def _layouts(chips: int) -> list[dict[str, Any]]:
  out = [{"parallelism": "mesh", "mesh": {"data": 1, "fsdp": chips, "tensor": 1}}]
  for data, tensor in ((2, 1), (1, 2), (1, 4)):
    if chips % (data * tensor) == 0 and chips // (data * tensor) >= 2:
      out.append({"parallelism": "mesh",
                  "mesh": {"data": data, "fsdp": chips // (data * tensor), "tensor": tensor}})
  out.append({"parallelism": "pmap"})
  return out


def _with(config, changes: dict[str, Any]):
  c = config.copy_and_resolve_references()
  c.unlock()
  for key, value in changes.items():
    if isinstance(value, dict):  # a group: mesh, lora
      c[key].update(value)
    else:
      c[key] = value
  return c


def _describe(changes: dict[str, Any]) -> str:
  parts = []
  for key, value in changes.items():
    if isinstance(value, dict):
      parts += [f"--config.{key}.{a}={s}" for a, s in value.items()]
    else:
      parts.append(f"--config.{key}={value}")
  return " ".join(parts)


def suggest(config, slice_: topology.Slice) -> tuple[dict | None, list[dict]]:
  """(the fastest plan that fits, or None; every plan tried), each with its `flags`."""
  devices = slice_.devices()
  layouts = _layouts(slice_.num_chips)
  tried = []

  def attempt(changes):
    c = _with(config, changes)
    if c.parallelism == "pmap":  # the replicated training state alone too big?
      state = programs.resident_state(c, devices[:1])
      held = sum(state.bytes(t) for t in (state.params_s, state.state_s.opt_state,
                                          state.reference_s))
      if held > slice_.chip.hbm_bytes:
        return None
    d = report.plan_dict(programs.compile_plan(
        c, devices, limit=slice_.memory_limit(c.memory_limit_gib)), slice_, c)
    d["flags"], d["changes"] = _describe(changes), changes
    tried.append(d)
    return d

  narrower = ({"lora": {"base_dtype": "bfloat16"}} if int(config.lora.rank) > 0
              else {"param_dtype": "bfloat16"})
  fitting = [d for d in (attempt(ch) for ch in layouts) if d and d["fits"]]
  if not fitting:
    for layout in layouts[:2]:
      d = attempt({**layout, **narrower, "remat": True})
      if d and d["fits"]:
        fitting.append(d)
  if fitting:
    best = min(fitting, key=lambda d: d["estimated_step_seconds"])
    if best["remat"]:
      d = attempt({**best["changes"], "remat": False})
      if d and d["fits"]:
        fitting.append(d)
  best = min(fitting, key=lambda d: d["estimated_step_seconds"]) if fitting else None
  return best, tried


def format_suggestion(best: dict | None, tried: list[dict]) -> str:
  lines = ["layouts tried | peak GiB/chip | fits | est. step"]
  for d in tried:
    lines.append(f"{d['flags']} --config.remat={d['remat']} --config.param_dtype="
                 f"{d['param_dtype']} | {d['peak_bytes'] / topology.GiB:.2f} | "
                 f"{'yes' if d['fits'] else 'NO'} | {d['estimated_step_seconds']:.2f} s")
  if best is None:
    lines.append("suggestion: nothing tried fits; use a larger slice or a smaller batch")
  else:
    lines.append(f"suggestion: {best['flags']} --config.remat={best['remat']} "
                 f"--config.param_dtype={best['param_dtype']} "
                 f"(est. step {best['estimated_step_seconds']:.2f} s, peak "
                 f"{best['peak_bytes'] / topology.GiB:.2f} GiB per chip)")
  return "\n".join(lines)
