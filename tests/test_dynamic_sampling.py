"""DAPO dynamic sampling: groups without a reward spread never reach the update, the batch
keeps its static shape with filler rows that contribute nothing, rounds stop at
max_num_gen_batches, and a resumed run equals an uninterrupted one (pmap and mesh)."""

import json
import signal
import sys

import jax
import numpy as np
import pytest

from grpo_jax import dynamic_sampling, grpo, metrics, preemption, train
from grpo_jax.layouts import pmap
from grpo_jax.errors import UserError
from test_parallel import G, PROMPTS, make_step, prompts
from conftest import assert_same_run, train_on_reward_files
from test_train import final_params, tiny_config

WEIGHTS = (1.0, 0.5)  # make_step's reward weights


def group_rewards(rng, uninformative):
  """[PROMPTS * G, 2] rewards; the groups in `uninformative` get equal weighted totals
  (made of different per-function values, and NaNs, where the group allows it)."""
  rewards = rng.normal(size=(PROMPTS * G, 2)).astype(np.float32)
  rows = lambda g: slice(g * G, (g + 1) * G)
  kinds = iter(["equal_totals", "nan_but_one", "identical", "all_nan"] * 2)
  for g in uninformative:
    kind = next(kinds)
    if kind == "equal_totals":  # 1 + 0.5 * 0 == 0 + 0.5 * 2 == 0.5 + 0.5 * 1
      rewards[rows(g)] = [[1.0, 0.0], [0.0, 2.0], [0.5, 1.0], [1.0, np.nan]]
    elif kind == "nan_but_one":  # a single scored completion: no spread
      rewards[rows(g)] = np.nan
      rewards[g * G + 1] = [0.3, 0.2]
    elif kind == "identical":
      rewards[rows(g)] = [0.7, -1.0]
    else:
      rewards[rows(g)] = np.nan
  return rewards


# -- the criterion --------------------------------------------------------------------------

def test_informative_groups_are_those_the_device_gives_a_non_zero_advantage():
  rng = np.random.default_rng(0)
  rewards = group_rewards(rng, uninformative=[1, 4, 5, 6])
  rewards[8, 1] = np.nan  # a NaN in an otherwise informative group: it stays informative
  keep = dynamic_sampling.informative_groups(rewards, WEIGHTS, G)
  np.testing.assert_array_equal(keep, [True, False, True, True, False, False, False, True])
  for scale in ("group", "batch", "none"):
    adv = np.asarray(grpo.group_advantages(rewards, WEIGHTS, G, scale).advantages)
    np.testing.assert_array_equal(np.any(adv.reshape(-1, G) != 0, axis=1), keep, err_msg=scale)
  # The "equal totals" group varies per function: informative when each function is
  # z-scored on its own (GDPO); a function of weight 0 does not count.
  gdpo = dynamic_sampling.informative_groups(rewards, WEIGHTS, G, "normalize_then_sum")
  np.testing.assert_array_equal(gdpo, keep | (np.arange(PROMPTS) == 1))
  assert not dynamic_sampling.informative_groups(
      np.array([[1.0, 0.0], [1.0, 5.0]], np.float32), (1.0, 0.0), 2, "normalize_then_sum")[0]


# -- gathering ------------------------------------------------------------------------------

def fake_round(rollout, rewards_per_round, calls):
  def sample_round(r):
    calls.append(r)
    return rollout, rewards_per_round[r], f"placed {r}"
  return sample_round


def host_rollout(seed=0):
  step, params, _ = make_step()
  batch = prompts(seed)
  return jax.device_get(jax.jit(step.generate)(params, batch["prompt_ids"],
                                               batch["prompt_mask"], jax.random.key(seed)))


@pytest.fixture(scope="module")
def rollout():
  return host_rollout()


def keep_fn(rewards):
  return dynamic_sampling.informative_groups(rewards, WEIGHTS, G)


def test_rounds_stop_at_max_num_gen_batches_and_the_rest_is_filler(rollout):
  rng = np.random.default_rng(1)
  uninformative = list(range(PROMPTS))
  rounds = [group_rewards(rng, uninformative) for _ in range(3)]
  rounds[1] = group_rewards(rng, uninformative[:-2])  # groups 6 and 7 informative
  calls = []
  gathered = dynamic_sampling.gather(fake_round(rollout, rounds, calls),
                                     dynamic_sampling.GroupGatherer(PROMPTS, G, keep_fn), 3)
  assert calls == [0, 1, 2] and gathered.rounds == 3 and gathered.kept_groups == 2
  assert gathered.placed is None  # assembled: the caller places it
  assert gathered.rewards.shape == (PROMPTS * G, 2)
  assert gathered.rollout.completion_ids.shape == rollout.completion_ids.shape
  kept = slice(0, 2 * G)
  np.testing.assert_array_equal(gathered.rewards[kept], rounds[1][6 * G:])
  np.testing.assert_array_equal(gathered.rollout.completion_ids[kept],
                                rollout.completion_ids[6 * G:])
  np.testing.assert_array_equal(gathered.rows_in_loss, np.repeat([1.0, 0.0], [2 * G, 6 * G]))
  filler = slice(2 * G, None)
  assert np.isnan(gathered.rewards[filler]).all()
  assert not gathered.rollout.completion_mask[filler].any()
  assert gathered.rollout.prompt_mask[filler].any(axis=1).all()  # real prompts: finite passes
  assert gathered.sampled_tokens == 3 * int(rollout.completion_mask.sum())


def test_rounds_stop_once_full_and_excess_groups_are_dropped(rollout):
  rng = np.random.default_rng(2)
  rounds = [group_rewards(rng, [0, 1, 2, 3, 4]), group_rewards(rng, [1]),
            group_rewards(rng, [])]
  calls = []
  gathered = dynamic_sampling.gather(fake_round(rollout, rounds, calls),
                                     dynamic_sampling.GroupGatherer(PROMPTS, G, keep_fn), 4)
  assert calls == [0, 1] and gathered.rounds == 2 and gathered.kept_groups == PROMPTS
  # Round 0's groups 5-7, then round 1's first five informative ones (0, 2, 3, 4, 5).
  expected = np.concatenate([rounds[0][5 * G:], rounds[1][0:G], rounds[1][2 * G:6 * G]])
  np.testing.assert_array_equal(gathered.rewards, expected)
  assert (gathered.rows_in_loss == 1).all()


def test_a_round_kept_whole_is_the_placed_rollout_and_no_dynamic_sampling_is_one_round(rollout):
  rng = np.random.default_rng(3)
  rounds = [group_rewards(rng, range(PROMPTS)), group_rewards(rng, [])]
  calls = []
  gathered = dynamic_sampling.gather(fake_round(rollout, rounds, calls),
                                     dynamic_sampling.GroupGatherer(PROMPTS, G, keep_fn), 4)
  assert calls == [0, 1] and gathered.placed == "placed 1"
  assert gathered.rollout is rollout  # as sampled: nothing copied
  np.testing.assert_array_equal(gathered.rewards, rounds[1])
  calls = []
  plain = dynamic_sampling.gather(fake_round(rollout, rounds, calls),
                                  dynamic_sampling.GroupGatherer(PROMPTS, G), 4)
  assert calls == [0] and plain.placed == "placed 0" and plain.rows_in_loss is None
  np.testing.assert_array_equal(plain.rewards, rounds[0])  # every group, informative or not


def test_a_stop_request_abandons_the_step(rollout):
  rounds = [group_rewards(np.random.default_rng(4), range(PROMPTS))]
  sample_round = lambda r: None if r == 1 else (rollout, rounds[0], None)
  assert dynamic_sampling.gather(sample_round,
                                 dynamic_sampling.GroupGatherer(PROMPTS, G, keep_fn), 4) is None


# -- the update sees none of the filler -----------------------------------------------------

def learn_on(p, state, ref, batch: dynamic_sampling.Gathered):
  scored, reward_metrics = p.score(state, ref, p.place_batch(batch.rollout),
                                   p.place_batch(batch.rewards))
  if batch.rows_in_loss is not None:
    scored = scored._replace(rows_in_loss=p.place_batch(batch.rows_in_loss))
  state, update_metrics = p.update(state, scored)
  return (pmap.unreplicate(state), pmap.host_metrics({**reward_metrics,
                                                               **update_metrics}),
          jax.device_get(p.to_host(scored)))


@pytest.mark.parametrize("num_devices", [1, 4])
@pytest.mark.parametrize("loss_type, scale_rewards, num_iterations", [
    ("grpo", "group", 1), ("dapo", "batch", 2)])
def test_the_update_on_kept_plus_filler_groups_is_the_update_on_the_kept_alone(
    rollout, loss_type, scale_rewards, num_iterations, num_devices):
  step, params, tx = make_step(loss_type, scale_rewards, num_iterations)
  rng = np.random.default_rng(5)
  rewards = group_rewards(rng, uninformative=[1, 3, 4, 6])
  batch = dynamic_sampling.gather(lambda r: (rollout, rewards, None),
                                  dynamic_sampling.GroupGatherer(PROMPTS, G, keep_fn), 1)
  assert batch.kept_groups == 4
  kept_rows = np.repeat(keep_fn(rewards), G)
  kept_only = dynamic_sampling.Gathered(
      jax.tree.map(lambda x: x[kept_rows], rollout), rewards[kept_rows], None, 4, 1, 0)

  p = pmap.pmap_step(step, jax.local_devices()[:num_devices])
  state = lambda: pmap.replicate(grpo.init_train_state(params, tx), p.devices)
  ref = pmap.replicate(jax.tree.map(lambda x: x * 0.9, params), p.devices)
  padded_state, padded_metrics, scored = learn_on(p, state(), ref, batch)
  kept_state, kept_metrics, _ = learn_on(p, state(), ref, kept_only)

  filler = batch.rows_in_loss == 0
  assert filler.sum() == 4 * G
  assert (np.asarray(scored.advantages)[filler] == 0).all()
  assert not np.asarray(scored.rollout.completion_mask)[filler].any()
  assert (np.asarray(scored.rewarded_rows)[filler] == 0).all()
  scalars = dynamic_sampling.kept_group_metrics(
      {k: float(v) for k, v in padded_metrics.items() if np.ndim(v) == 0}, 4, PROMPTS,
      filler_counts_as_zero_std=dynamic_sampling.scales_per_group(scale_rewards,
                                                                  "sum_then_normalize"))
  for key, value in kept_metrics.items():
    padded = scalars[key] if np.ndim(value) == 0 else padded_metrics[key]
    np.testing.assert_allclose(padded, value, rtol=2e-4, atol=1e-6, err_msg=key)
  assert scalars["frac_reward_zero_std"] == 0.0  # the kept groups all have a spread
  assert padded_metrics["completions/mean_length"] < kept_metrics["completions/mean_length"]
  assert kept_metrics["loss"] != 0 and kept_metrics["grad_norm"] > 0
  for x, y in zip(jax.tree.leaves(padded_state), jax.tree.leaves(kept_state), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)

  # Other tokens in the filler rows change nothing at all: the update never reads them.
  prompt_ids, completion_ids = (batch.rollout.prompt_ids.copy(),
                                batch.rollout.completion_ids.copy())
  prompt_ids[filler] = (prompt_ids[filler] + 5) % 32
  completion_ids[filler] = (completion_ids[filler] + 7) % 32
  swapped = batch._replace(rollout=batch.rollout._replace(prompt_ids=prompt_ids,
                                                          completion_ids=completion_ids))
  swapped_state, _, _ = learn_on(p, state(), ref, swapped)
  for x, y in zip(jax.tree.leaves(padded_state), jax.tree.leaves(swapped_state), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """conftest's reward module (stop_at: length parity, so about half of the G=2 groups
  have no spread; it raises on call STOP_AT) and a JSONL dataset."""
  from conftest import write_reward_files  # noqa: PLC0415
  return write_reward_files(tmp_path_factory.mktemp("dynamic_sampling"))


def run(files, workdir, stop_at=0, **overrides):
  config = tiny_config(**{
      "dataset": f"json:{files / 'data.jsonl'}", "prompt_column": "question",
      "reward_funcs": "my_rewards:stop_at", "dynamic_sampling": True, "max_num_gen_batches": 3,
      "max_steps": 4, "checkpoint_every": 2, "eval_every": 0, **overrides})
  return train_on_reward_files(files, workdir, config, stop_at)


@pytest.fixture(scope="module")
def straight(files):
  workdir = files / "straight"
  return workdir, run(files, workdir)


def test_a_run_samples_until_its_groups_are_informative_or_its_rounds_run_out(straight):
  workdir, rows = straight
  assert sorted(rows) == [1, 2, 3, 4]
  rounds = {s: r["dynamic_sampling/rounds"] for s, r in rows.items()}
  kept = {s: r["dynamic_sampling/kept_groups"] for s, r in rows.items()}
  assert sum(rounds.values()) > len(rounds)  # some steps sampled again
  for step in rows:
    assert 1 <= rounds[step] <= 3 and 0 <= kept[step] <= 4
    assert kept[step] == 4 or rounds[step] == 3  # full, or out of rounds
    if kept[step]:
      assert rows[step]["frac_reward_zero_std"] == 0.0  # only groups with a spread
  meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["data"]["position"] == 4 * sum(rounds.values())  # every round's prompts


def test_a_run_resumed_in_the_middle_equals_the_uninterrupted_one(files, straight):
  """A crash in the last sampling round of step 4: the rerun resumes from the checkpoint
  of step 2 and trains steps 3 and 4 as the uninterrupted run did."""
  workdir, rows = straight
  calls = int(sum(r["dynamic_sampling/rounds"] for r in rows.values()))
  with pytest.raises(UserError, match="reward function 'stop_at' raised RuntimeError"):
    run(files, files / "resumed", stop_at=calls)
  assert final_params(files / "resumed")[0] == 2
  resumed = run(files, files / "resumed")
  assert_same_run(resumed, rows, workdir, files / "resumed")


def test_a_stop_between_rounds_gives_the_step_back_and_the_rerun_matches(files, straight,
                                                                         monkeypatch):
  """A stop request (a preemption notice) right after the rewards of step 4's second
  round: step 4 is abandoned with its prompts given back, step 3 checkpointed; the rerun
  samples step 4 again from its first round, as the uninterrupted run did."""
  workdir, rows = straight
  assert rows[4]["dynamic_sampling/rounds"] >= 2
  stop_after = int(sum(rows[s]["dynamic_sampling/rounds"] for s in (1, 2, 3))) + 2

  class StopAfterCall(preemption.StopRequests):
    """SIGTERM as if it came after reward call `stop_after` (no real signal: the loop's
    handlers would outlive the test)."""

    def __enter__(self):
      return self

    def __exit__(self, *exc_info):
      pass

    def requested(self):
      if self.signum is None and sys.modules["my_rewards"].calls >= stop_after:
        self.signum = signal.SIGTERM
      return self.signum is not None

  monkeypatch.setattr(preemption, "StopRequests", StopAfterCall)
  with pytest.raises(preemption.Preempted, match="after step 3 of 4"):
    run(files, files / "stopped")
  monkeypatch.undo()
  assert final_params(files / "stopped")[0] == 3
  assert_same_run(run(files, files / "stopped"), rows, workdir, files / "stopped")


def test_under_a_mesh_the_run_gathers_the_same_groups(files, straight):
  _, rows = straight
  sharded = run(files, files / "mesh", max_steps=2, parallelism="mesh",
                mesh={"data": 2, "fsdp": 2, "tensor": 1})
  # (The learning rate of max_steps=2 differs from the second update on: the first two
  # steps' losses are before it.)
  for step in (1, 2):
    for key in ("dynamic_sampling/rounds", "dynamic_sampling/kept_groups", "reward"):
      assert sharded[step][key] == rows[step][key], (step, key)
    np.testing.assert_allclose(sharded[step]["loss"], rows[step]["loss"], rtol=1e-4, atol=1e-6)
