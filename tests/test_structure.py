"""The house rules that code review alone lets slip: no import cycle between grpo_jax's
modules (function-level imports count, so none can hide one), the planner never imports the
command line, no module past 450 lines, and every layout offers the `Layout` interface."""

from __future__ import annotations

import ast
import pathlib

import jax
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "grpo_jax"
MAX_LINES = 450


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in PACKAGE.rglob("*.py")
          if "sandbox/child.py" not in p.as_posix()}  # a stdlib-only script, never imported


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The grpo_jax modules `name` imports anywhere in its file (module or function level);
  `from pkg import mod` counts as importing pkg.mod when that is a module."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split(".")[0] == "grpo_jax"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([node.module] if node.module else []))
      if base.split(".")[0] != "grpo_jax":
        continue
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (a list of modules, first == last), or None. A package's __init__
  importing its own submodules is how packages work, not a cycle: those edges are left out
  when the submodule imports its package back (Python resolves the submodule first)."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(edges[node]):
      if nxt.startswith(node + "."):  # a package's own submodule
        continue
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if not state.get(nxt):
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if not state.get(node):
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    for nxt in edges[node]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_the_cycle_finder_finds_a_planted_cycle():
  edges = {"grpo_jax.a": {"grpo_jax.b"}, "grpo_jax.b": {"grpo_jax.c"},
           "grpo_jax.c": {"grpo_jax.a"}, "grpo_jax.d": set()}
  assert find_cycle(edges) == ["grpo_jax.a", "grpo_jax.b", "grpo_jax.c", "grpo_jax.a"]
  edges["grpo_jax.c"] = set()
  assert find_cycle(edges) is None


def test_no_import_cycles_even_through_function_level_imports():
  edges = graph()
  assert "grpo_jax.models.lora_config" in edges["grpo_jax.models.transformer"]
  assert "grpo_jax.models.transformer" in edges["grpo_jax.models.lora"]
  assert find_cycle(edges) is None


def test_the_planner_builds_through_build_not_the_command_line():
  edges = graph()
  assert "grpo_jax.build" in edges["grpo_jax.plan.programs"]
  for planner in ("grpo_jax.plan", "grpo_jax.plan.__main__", "grpo_jax.plan.programs"):
    assert "grpo_jax.train" not in reachable(edges, planner) | edges[planner], planner


def test_no_module_is_longer_than_the_house_limit():
  lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
  assert {n: k for n, k in lengths.items() if k > MAX_LINES} == {}


@pytest.mark.parametrize("kind", ["pmap", "mesh", "planned"])
def test_every_layout_offers_the_layout_interface(kind):
  from flax import nnx  # noqa: PLC0415

  from conftest import tiny_model  # noqa: PLC0415
  from grpo_jax import grpo, sampling  # noqa: PLC0415
  from grpo_jax.layouts import Layout, mesh, planned, pmap  # noqa: PLC0415
  model = tiny_model()
  step = grpo.GRPOStep(nnx.graphdef(model), None, None, grpo.GRPOConfig(
      sampling=sampling.SamplingConfig(max_completion_length=4, eos_token_ids=(1,),
                                       num_generations=2),
      num_reward_funcs=1))
  devices = jax.local_devices()[:1]
  layout = (mesh.mesh_step(step, mesh.make_mesh(devices=devices)) if kind == "mesh"
            else pmap.pmap_step(step, devices))
  if kind == "planned":
    layout = planned.PlannedStep(layout, model.cfg, devices)
  assert isinstance(layout, Layout)
  missing = [m for m in dir(Layout) if not m.startswith("_") and not hasattr(layout, m)]
  assert missing == []


def test_pytest_with_q_still_prints_how_many_passed():
  """The project's addopts must not hold -q: `pytest -q` would become -qq and hide the
  'N passed' line."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
       f"{__file__}::test_the_cycle_finder_finds_a_planted_cycle"],
      cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:]
  assert "1 passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]
