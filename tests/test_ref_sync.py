"""TR-DPO reference sync (sync_ref_model): the reference becomes alpha * actor +
(1 - alpha) * reference when the update count passes a multiple of ref_model_sync_steps,
is checkpointed with each step, and stays the starting params when the sync is off."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grpo_jax import build, grpo, metrics, preemption
from grpo_jax.layouts import mesh, pmap
from grpo_jax import loop as loop_lib
from grpo_jax.errors import UserError
from conftest import train_on_reward_files
from test_train import final_params, tiny_config

ALPHA = 0.6


def test_sync_is_due_when_the_update_count_passes_a_multiple():
  assert grpo.sync_due(0, 2, 2) and grpo.sync_due(1, 2, 2) and not grpo.sync_due(2, 3, 2)
  # num_iterations = 2, every 3 updates: steps end at 2, 4, 6, 8 updates.
  assert [grpo.sync_due(u - 2, u, 3) for u in (2, 4, 6, 8)] == [False, True, True, False]
  assert not grpo.sync_due(4, 4, 3)  # a step whose updates were all skipped


def test_mixing_is_in_float32_and_keeps_each_layout():
  rng = np.random.default_rng(0)
  reference = {"w": rng.normal(size=(8, 4)).astype(np.float32),
               "b": rng.normal(size=(4,)).astype(jnp.bfloat16)}
  actor = {"w": rng.normal(size=(8, 4)).astype(np.float32),
           "b": rng.normal(size=(4,)).astype(np.float32)}
  expected = {k: ((1 - ALPHA) * np.float32(reference[k].astype(np.float32))
                  + ALPHA * actor[k]).astype(reference[k].dtype) for k in reference}
  layout = mesh.make_mesh(2, 2, 1, jax.devices()[:4])
  placements = {
      "replicated (pmap)": lambda t: pmap.replicate(t, jax.local_devices()),
      "sharded (mesh)": lambda t: jax.device_put(t, jax.sharding.NamedSharding(
          layout, jax.sharding.PartitionSpec("fsdp"))),
  }
  for name, place in placements.items():
    placed_ref, placed_actor = place(reference), place(actor)
    layouts = jax.tree.map(lambda x: x.sharding, placed_ref)
    mixed = grpo.mix_reference(placed_ref, placed_actor, ALPHA)
    assert jax.tree.map(lambda x: x.sharding, mixed) == layouts, name
    for key, value in mixed.items():
      assert value.dtype == reference[key].dtype, (name, key)
      copy = np.asarray(pmap.unreplicate(value) if "pmap" in name else value)
      np.testing.assert_allclose(copy.astype(np.float32), expected[key].astype(np.float32),
                                 rtol=1e-6, atol=1e-7, err_msg=f"{name} {key}")


# -- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
  from conftest import write_reward_files  # noqa: PLC0415
  return write_reward_files(tmp_path_factory.mktemp("ref_sync"))


def run(files, workdir, stop_at=0, **overrides):
  config = tiny_config(**{
      "dataset": f"json:{files / 'data.jsonl'}", "prompt_column": "question",
      "reward_funcs": "my_rewards:stop_at", "sync_ref_model": True, "ref_model_sync_steps": 2,
      "ref_model_mixup_alpha": ALPHA, "max_steps": 4, "checkpoint_every": 1,
      "keep_checkpoints": 5, "eval_every": 0, **overrides})
  return train_on_reward_files(files, workdir, config, stop_at)


def restore(path):
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def references(workdir):
  """{step: the reference saved with it}, and the starting reference."""
  ckdir = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  return {s: restore(ckdir / str(s) / "reference") for s in steps}, restore(ckdir / "reference")


@pytest.fixture(scope="module")
def synced(files):
  workdir = files / "synced"
  return workdir, run(files, workdir)


def test_the_reference_mixes_with_the_actor_every_two_updates(synced):
  workdir, _ = synced
  refs, start = references(workdir)
  assert sorted(refs) == [1, 2, 3, 4]
  actor = {s: restore(workdir / "checkpoints" / str(s) / "state")["params"] for s in refs}
  mix = lambda ref, act: jax.tree.map(
      lambda r, a: (np.float32(1 - ALPHA) * r + np.float32(ALPHA) * a).astype(r.dtype), ref, act)
  close = lambda a, b: jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  exact = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  exact(refs[1], start)  # no sync after update 1
  close(refs[2], mix(refs[1], actor[2]))
  exact(refs[3], refs[2])
  close(refs[4], mix(refs[3], actor[4]))
  moved = max(float(np.abs(a - b).max())
              for a, b in zip(jax.tree.leaves(refs[2]), jax.tree.leaves(start)))
  assert moved > 1e-4


def test_a_run_resumed_after_a_sync_equals_the_uninterrupted_one(files, synced):
  """A crash in step 4 (the 4th reward call): the rerun resumes from step 3, whose
  checkpoint holds the reference synced at step 2, and syncs again at step 4."""
  workdir, rows = synced
  with pytest.raises(UserError, match="reward function 'stop_at' raised RuntimeError"):
    run(files, files / "resumed", stop_at=4)
  assert final_params(files / "resumed")[0] == 3
  resumed = run(files, files / "resumed")
  timing = lambda k: (k in ("step_time", "tokens_per_second", "steps_per_sec", "uptime")
                      or k.startswith("time/"))
  strip = lambda r: {k: v for k, v in r.items() if not timing(k)}
  assert {s: strip(r) for s, r in resumed.items()} == {s: strip(r) for s, r in rows.items()}
  (_, a), (_, b) = final_params(workdir), final_params(files / "resumed")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  jax.tree.map(np.testing.assert_array_equal, references(workdir)[0][4],
               references(files / "resumed")[0][4])


def test_without_sync_the_reference_stays_the_starting_params(files, synced):
  _, synced_rows = synced
  workdir = files / "plain"
  rows = run(files, workdir, sync_ref_model=False)
  ckdir = workdir / "checkpoints"
  assert not any((ckdir / str(s) / "reference").exists() for s in range(1, 5))
  # The synced run is the same run up to its first sync (after step 2's update); from
  # step 3 on its KL is measured against a reference closer to the actor.
  for step in (1, 2):
    assert rows[step]["kl"] == synced_rows[step]["kl"]
  assert 0 < synced_rows[3]["kl"] < rows[3]["kl"]


def test_without_sync_the_loop_trains_against_the_untouched_reference(files):
  config = tiny_config(dataset=f"json:{files / 'data.jsonl'}", prompt_column="question",
                       reward_funcs="format_reward,my_rewards:stop_at", checkpoint_every=0,
                       eval_every=0)
  with pytest.MonkeyPatch.context() as patch:
    patch.syspath_prepend(str(files))
    sys.modules.pop("my_rewards", None)
    s = build.setup(config)
    layout = build.build_layout(config, grpo.GRPOStep(s.model_def, *build.make_optimizer(
        config), s.grpo_config))
    loop = loop_lib.TrainLoop(config, s, layout, None, metrics.create_writer("", enabled=False),
                           None)
    start = jax.tree.map(np.asarray, s.init_params)
    state, reference, key = loop.restore_or_init(s.init_params, None)
    for step in (1, 2, 3):
      state, reference, _ = loop.train_step(state, reference, jax.random.fold_in(key, step),
                                            preemption.StopRequests(1.0))
    sys.modules.pop("my_rewards", None)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, layout.single_copy(
      reference)), start)
  moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
      jax.tree.leaves(layout.single_copy(state.params)), jax.tree.leaves(start)))
  assert moved > 1e-4  # while the actor trained
