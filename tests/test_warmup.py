"""The supervised warm-up's cache: keyed, validated on load, written atomically."""

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import TINY
from grpo_jax import warmup
from grpo_jax.models import Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = {"sft_steps": 5, "seed": 0, "model": {"hidden_size": 32, "num_layers": 2}}


class FakeRun:
  """A `run()` that counts its calls and returns params filled with `value`."""

  def __init__(self, value=2.0, shape=(3, 4)):
    self.value, self.shape, self.calls = value, shape, 0

  def __call__(self):
    self.calls += 1
    return {"w": jnp.full(self.shape, self.value)}, {"loss": 0.25, "steps": 5}


def like(shape=(3, 4)):
  return {"w": jnp.zeros(shape)}


def never_run():
  raise AssertionError("run() was called although the cache should have been used")


def siblings(tmp_path):
  return sorted(p.name for p in tmp_path.iterdir())


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "grpo_jax" and r.levelno == logging.WARNING]


def save_params(path, value=1.0, shape=(3, 4)):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"w": jnp.full(shape, value)})
    ckptr.wait_until_finished()


def test_cache_hit_runs_once_and_layout(tmp_path, caplog):
  cache, run = tmp_path / "warmup", FakeRun(2.0)
  params, stats = warmup.cached_warmup(cache, like(), run, key=KEY)
  assert run.calls == 1 and stats["cached"] is False
  assert stats["loss"] == 0.25 and stats["steps"] == 5 and stats["seconds"] >= 0
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))
  assert siblings(tmp_path) == ["warmup"]  # no temporary or old directory left
  assert sorted(p.name for p in cache.iterdir()) == ["key.json", "params", "stats.json"]
  assert json.loads((cache / "key.json").read_text()) == KEY
  assert "cached" not in json.loads((cache / "stats.json").read_text())

  params, stats2 = warmup.cached_warmup(cache, like(), never_run, key=dict(KEY))
  assert stats2 == {**stats, "cached": True}
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))
  assert warnings_of(caplog) == []


def test_default_key_is_empty(tmp_path):
  run = FakeRun()
  warmup.cached_warmup(tmp_path / "warmup", like(), run)
  _, stats = warmup.cached_warmup(tmp_path / "warmup", like(), never_run, key={})
  assert stats["cached"] is True and run.calls == 1


def test_bad_key_fails_before_the_run(tmp_path):
  run = FakeRun()
  with pytest.raises(TypeError, match="JSON"):
    warmup.cached_warmup(tmp_path / "warmup", like(), run, key={"f": object()})
  assert run.calls == 0 and not (tmp_path / "warmup").exists()


def model_state(seed=0, **changes):
  """A tiny Transformer's nnx.State (Param wrappers, nested dicts), filled without a compile."""
  abstract = nnx.eval_shape(lambda: Transformer(TINY.replace(**changes), nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                      nnx.split(abstract)[1])


def test_real_model_state_is_reused_and_its_shapes_checked(tmp_path, caplog):
  """nnx.State params: the shape check must not reject a good cache, and must name a bad one."""
  cache, state = tmp_path / "warmup", model_state(seed=1)
  warmup.cached_warmup(cache, state, lambda: (state, {"loss": 1.0}), key=KEY)
  params, stats = warmup.cached_warmup(cache, model_state(seed=2), never_run, key=KEY)
  assert stats["cached"] is True and isinstance(params, nnx.State)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert warnings_of(caplog) == []

  wider = model_state(intermediate_size=48)
  params, stats = warmup.cached_warmup(cache, wider, lambda: (wider, {"loss": 1.0}), key=KEY)
  assert stats["cached"] is False
  [message] = warnings_of(caplog)
  assert "other shapes than the model's" in message
  assert "blocks/mlp/up_proj/kernel/value: (2, 32, 64) (cached) vs (2, 32, 48) (now)" in message


@pytest.mark.parametrize("now, expected", [
    ({**KEY, "sft_steps": 10}, "sft_steps: 5 (cached) vs 10 (now)"),
    ({**KEY, "seed": 1}, "seed: 0 (cached) vs 1 (now)"),
    ({**KEY, "model": {"hidden_size": 64, "num_layers": 2}},
     "model.hidden_size: 32 (cached) vs 64 (now)"),
    ({**KEY, "dataset": "gsm8k"}, 'dataset: <absent> (cached) vs "gsm8k" (now)'),
])
def test_key_change_warns_and_rebuilds(tmp_path, caplog, now, expected):
  cache = tmp_path / "warmup"
  warmup.cached_warmup(cache, like(), FakeRun(1.0), key=KEY)
  run = FakeRun(2.0)
  params, stats = warmup.cached_warmup(cache, like(), run, key=now)
  assert run.calls == 1 and stats["cached"] is False
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))
  [message] = warnings_of(caplog)
  assert expected in message and "other settings" in message
  assert message.count("(cached) vs") == 1  # only the field that changed is named
  assert siblings(tmp_path) == ["warmup"]
  # The rebuilt cache carries the new key: reused with it, rebuilt with the old one.
  params, stats = warmup.cached_warmup(cache, like(), never_run, key=now)
  assert stats["cached"] is True
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))


def test_shape_change_warns_and_rebuilds(tmp_path, caplog):
  cache = tmp_path / "warmup"
  warmup.cached_warmup(cache, like((3, 4)), FakeRun(1.0), key=KEY)
  run = FakeRun(2.0, shape=(3, 5))
  params, stats = warmup.cached_warmup(cache, like((3, 5)), run, key=KEY)
  assert run.calls == 1 and stats["cached"] is False and params["w"].shape == (3, 5)
  [message] = warnings_of(caplog)
  assert "w: (3, 4) (cached) vs (3, 5) (now)" in message
  params, stats = warmup.cached_warmup(cache, like((3, 5)), never_run, key=KEY)
  assert stats["cached"] is True
  np.testing.assert_array_equal(params["w"], np.full((3, 5), 2.0))


def test_structure_change_warns_and_rebuilds(tmp_path, caplog):
  cache = tmp_path / "warmup"
  warmup.cached_warmup(cache, like(), FakeRun(1.0), key=KEY)
  now = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}
  run = lambda: ({"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}, {"loss": 0.1})  # noqa: E731
  params, stats = warmup.cached_warmup(cache, now, run, key=KEY)
  assert stats["cached"] is False and set(params) == {"w", "b"}
  [message] = warnings_of(caplog)
  assert "could not be restored" in message


def _write_json(path, value):
  path.write_text(json.dumps(value))


# Directory states that a kill (or an older version, or a kill under the old code) leaves.
def _old_layout_params_only(cache):  # the old code killed between params/ and stats.json
  save_params(cache / "params")


def _old_layout_complete(cache):  # the old code's complete cache: no key.json
  save_params(cache / "params")
  _write_json(cache / "stats.json", {"loss": 0.5, "seconds": 1.0})


def _params_and_key_no_stats(cache):
  save_params(cache / "params")
  _write_json(cache / "key.json", KEY)


def _marker_but_no_params(cache):
  cache.mkdir()
  _write_json(cache / "key.json", KEY)
  _write_json(cache / "stats.json", {"loss": 0.5, "seconds": 1.0})


def _marker_but_corrupt_params(cache):
  _marker_but_no_params(cache)
  (cache / "params").mkdir()
  (cache / "params" / "garbage").write_text("not a checkpoint")


def _unreadable_stats(cache):
  save_params(cache / "params")
  _write_json(cache / "key.json", KEY)
  (cache / "stats.json").write_text('{"loss": 0.')


def _orbax_tmp_dir_only(cache):  # killed during Orbax's own save
  (cache / "params.orbax-checkpoint-tmp-1234").mkdir(parents=True)


@pytest.mark.parametrize("make, why", [
    (_old_layout_params_only, "incomplete"),
    (_old_layout_complete, "no key.json"),
    (_params_and_key_no_stats, "incomplete"),
    (_marker_but_no_params, "no params/"),
    (_marker_but_corrupt_params, "could not be restored"),
    (_unreadable_stats, "unreadable"),
    (_orbax_tmp_dir_only, "incomplete"),
])
def test_partial_cache_warns_and_rebuilds(tmp_path, caplog, make, why):
  cache = tmp_path / "warmup"
  make(cache)
  run = FakeRun(2.0)
  params, stats = warmup.cached_warmup(cache, like(), run, key=KEY)  # no exception
  assert run.calls == 1 and stats["cached"] is False
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))
  [message] = warnings_of(caplog)
  assert why in message
  assert siblings(tmp_path) == ["warmup"]
  params, stats = warmup.cached_warmup(cache, like(), never_run, key=KEY)
  assert stats["cached"] is True
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))


@pytest.mark.parametrize("with_cache", [False, True])
def test_leftover_temporary_dirs_are_removed(tmp_path, caplog, with_cache):
  cache = tmp_path / "warmup"
  if with_cache:
    warmup.cached_warmup(cache, like(), FakeRun(1.0), key=KEY)
  save_params(tmp_path / "warmup.tmp-123-0000abcd" / "params", value=7.0)
  _write_json(tmp_path / "warmup.tmp-123-0000abcd" / "stats.json", {"loss": 0, "seconds": 0})
  (tmp_path / "warmup.tmp-456-00001234").mkdir()
  save_params(tmp_path / "warmup.old-789-0000beef" / "params", value=8.0)
  (tmp_path / "warmup.txt").write_text("not ours")  # only our own leftovers go
  run = FakeRun(2.0)
  params, stats = warmup.cached_warmup(cache, like(), run, key=KEY)
  assert siblings(tmp_path) == ["warmup", "warmup.txt"]
  assert stats["cached"] is with_cache and run.calls == (0 if with_cache else 1)
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 1.0 if with_cache else 2.0))
  assert warnings_of(caplog) == []


KILLED_RUN = textwrap.dedent('''
    import os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    from grpo_jax import warmup

    cache, point = sys.argv[1], sys.argv[2]

    def reached(name):
      if name == point:
        os.kill(os.getpid(), signal.SIGKILL)

    warmup._reached = reached

    def run():
      if point == "run":
        os.kill(os.getpid(), signal.SIGKILL)
      return {"w": jnp.full((3, 4), 2.0)}, {"loss": 0.25}

    warmup.cached_warmup(cache, {"w": jnp.zeros((3, 4))}, run, key={"sft_steps": 10})
    print("not killed")
''')

OLD_KEY, NEW_KEY = {"sft_steps": 5}, {"sft_steps": 10}
BEFORE_SWAP = ("run", "params_saved", "marker_written")


@pytest.mark.parametrize("point, with_old", [
    ("params_saved", False),  # the reported bug: killed after params/, before the marker
    ("marker_written", False),
    ("run", True),
    ("params_saved", True),
    ("marker_written", True),  # the new cache is complete, not yet renamed in
    ("old_moved", True),  # between the two renames
    ("new_moved", True),  # swapped in, the old one not deleted yet
])
def test_sigkill_at_any_moment_then_a_normal_run_succeeds(tmp_path, caplog, point, with_old):
  cache = tmp_path / "warmup"
  if with_old:
    warmup.cached_warmup(cache, like(), FakeRun(1.0), key=OLD_KEY)
  script = tmp_path / "killed_run.py"
  script.write_text(KILLED_RUN)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(script), str(cache), point], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]

  leftovers = [n for n in siblings(tmp_path) if n.startswith("warmup.")]
  if point != "run":
    assert leftovers, "the kill should have left a temporary or old directory"
  if point in BEFORE_SWAP and with_old:  # the old complete cache is untouched
    params, stats = warmup.cached_warmup(cache, like(), never_run, key=OLD_KEY)
    assert stats["cached"] is True
    np.testing.assert_array_equal(params["w"], np.full((3, 4), 1.0))
  elif point in BEFORE_SWAP or point == "old_moved":
    assert not cache.exists()  # no cache
  else:  # the new complete cache
    assert json.loads((cache / "key.json").read_text()) == NEW_KEY

  run = FakeRun(2.0)
  params, stats = warmup.cached_warmup(cache, like(), run, key=NEW_KEY)
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))
  assert stats["cached"] is (point == "new_moved") and run.calls == (point != "new_moved")
  assert siblings(tmp_path) == ["killed_run.py", "warmup"]
  params, stats = warmup.cached_warmup(cache, like(), never_run, key=NEW_KEY)
  assert stats["cached"] is True
  np.testing.assert_array_equal(params["w"], np.full((3, 4), 2.0))


TWO_PROCESS_WORKER = textwrap.dedent('''
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, cache, sft_steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax.numpy as jnp, numpy as np
    from grpo_jax import warmup
    calls = []

    def run():
      calls.append(1)
      return {"w": jnp.full((3, 4), 2.0 + process_id)}, {"loss": 0.25}  # host 0's is saved

    params, stats = warmup.cached_warmup(cache, {"w": jnp.zeros((3, 4))}, run,
                                         key={"sft_steps": int(sft_steps)})
    print("RESULT", json.dumps({"cached": stats["cached"], "calls": len(calls),
                                "w": np.asarray(params["w"]).tolist()}))
''')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_share_one_cache(tmp_path):
  """jax.distributed: one temporary directory for both, one swap by the primary, one answer."""
  script, cache = tmp_path / "worker.py", tmp_path / "warmup"
  script.write_text(TWO_PROCESS_WORKER)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

  def both(sft_steps):
    port = str(free_port())
    workers = [subprocess.Popen([sys.executable, str(script), str(i), port, str(cache),
                                 str(sft_steps)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs):
      assert w.returncode == 0, out[-3000:]
    return [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]

  first = both(5)
  assert [r["cached"] for r in first] == [False, False] and [r["calls"] for r in first] == [1, 1]
  assert siblings(tmp_path) == ["warmup", "worker.py"]
  again = both(5)
  assert [r["cached"] for r in again] == [True, True] and [r["calls"] for r in again] == [0, 0]
  assert again[0]["w"] == again[1]["w"] == np.full((3, 4), 2.0).tolist()
