"""The memory plan (grpo_jax.memory): ladders, the choice, and what the chosen programs
compute: micro-batched score and update passes with remat, and a sampler in row chunks,
equal the whole-batch programs to float rounding under pmap and on a mesh; the trainer and
`plan` choose the same settings; a configured setting that does not fit names one that does."""

import dataclasses
import logging
import math

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, tiny_model
from grpo_jax import config as config_lib
from grpo_jax import grpo, memory, sampling, train
from grpo_jax.errors import UserError
from grpo_jax.plan import programs
from test_variants import (LAYOUTS, STEP_REWARDS, assert_same_step, make_step, policy,  # noqa: F401
                           run_layout)

GiB = memory.GiB


# --- choose ---------------------------------------------------------------------------------


def fake_measure(sizes, compiled):
  def measure(setting):
    compiled.append(setting)
    return sizes[setting], f"program {setting}"
  return measure


def test_choose_takes_the_first_setting_that_fits_in_ladder_order():
  compiled = []
  choice = memory.choose("abcd", fake_measure(dict(a=9, b=7, c=5, d=1), compiled), limit=6)
  assert (choice.setting, choice.bytes, choice.program) == ("c", 5, "program c")
  assert compiled == ["a", "b", "c"] and choice.tried == [("a", 9), ("b", 7), ("c", 5)]


def test_choose_skips_what_the_estimate_rules_out_and_checks_the_one_before_a_fit():
  compiled = []
  sizes = dict(a=20, b=6, c=4, d=1)
  estimates = dict(a=20, b=9, c=6, d=1)  # 1.5x over: b skipped, re-checked once c calibrates
  choice = memory.choose("abcd", fake_measure(sizes, compiled), 6, estimates.get)
  assert choice.setting == "b" and compiled == ["c", "b"]
  # the calibration (measured / estimated of the last compile) scales later estimates
  compiled.clear()
  sizes = dict(a=30, b=24, c=12, d=6)
  estimates = dict(a=10, b=8, c=4, d=2)  # everything is 3x what the estimate says
  choice = memory.choose("abcd", fake_measure(sizes, compiled), 12, estimates.get)
  assert choice.setting == "c" and compiled == ["a", "c"]


def test_choose_reports_nothing_fits_and_what_the_compiler_refused():
  sizes = dict(a=math.inf, b=8)
  choice = memory.choose("ab", fake_measure(sizes, []), 6)
  assert choice.setting is None and choice.tried == [("a", math.inf), ("b", 8)]
  error = memory.nothing_fits("update", choice, 6 * GiB, "use a larger device")
  assert "at least 0 MiB" in str(error) and "\n" not in str(error)


# --- ladders --------------------------------------------------------------------------------


def test_update_ladder_prefers_1k_token_micro_batches_on_cpu_and_remat_last():
  ladder = memory.update_ladder(32, 96, "cpu", TINY)
  assert ladder[0] == memory.Update(8, False)  # 8 x 96 tokens <= 1024
  assert [u.remat for u in ladder] == [False] * 4 + [True] * 4  # 8, 4, 2, 1 each
  # a 150k vocabulary on a small model: the whole batch first (micro-batches cost more)
  big_vocab = TINY.replace(vocab_size=151_936, hidden_size=256)
  assert memory.head_dominated(big_vocab) and not memory.head_dominated(
      TINY.replace(vocab_size=49_152, hidden_size=576, num_layers=30, intermediate_size=1536,
                   num_heads=9, num_kv_heads=3))
  assert memory.update_ladder(32, 160, "cpu", big_vocab)[0] == memory.Update(32, False)


def test_update_ladder_on_accelerators_tries_remat_before_tiny_micro_batches():
  ladder = memory.update_ladder(128, 1056, "gpu", TINY)
  # 128, 64, 32, 16, 8 rows hold >= 8192 tokens; 4, 2, 1 do not
  assert ladder[:5] == [memory.Update(d, False) for d in (128, 64, 32, 16, 8)]
  assert ladder[5:13] == [memory.Update(d, True) for d in (128, 64, 32, 16, 8, 4, 2, 1)]
  assert ladder[13:] == [memory.Update(d, False) for d in (4, 2, 1)]


def test_configured_settings_are_the_only_rungs():
  assert memory.update_ladder(32, 96, "tpu", TINY, micro_batch_size=4) == [
      memory.Update(4, False), memory.Update(4, True)]
  assert memory.update_ladder(32, 96, "cpu", TINY, remat=True)[0] == memory.Update(8, True)
  assert memory.update_ladder(32, 96, "cpu", TINY, 16, False) == [memory.Update(16, False)]
  assert memory.chunk_ladder(8) == [memory.Chunks(c) for c in (1, 2, 4, 8)]


def test_device_memory_is_the_config_s_or_the_ram_s():
  assert memory.device_memory(jax.devices(), 2.5) == int(2.5 * GiB)
  cpu = memory.device_memory(jax.devices())
  assert 0 < cpu * len(jax.devices()) < memory.available_ram()


# --- what the chosen programs compute -------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_micro_batches_remat_and_score_passes_compute_what_the_whole_batch_does(
    layout, policy):  # noqa: F811
  """Two updates (num_iterations=2: old log-probs from the score pass, ratios != 1 on the
  second) with a KL to a reference: 4 rows per device in 2 micro-batches with remat and
  2 score passes equal one pass over all 4, up to float summation order."""
  graphdef, params, rollout, _, _ = policy
  changes = dict(num_iterations=2, beta=0.04, loss_type="grpo")
  whole, _ = make_step(graphdef, **changes)
  planned, _ = make_step(graphdef, micro_batch_size=2, remat=True, score_micro_batch_size=2,
                         **changes)
  want = run_layout(LAYOUTS[layout](whole), params, "learn", rollout, STEP_REWARDS)
  got = run_layout(LAYOUTS[layout](planned), params, "learn", rollout, STEP_REWARDS)
  assert {"loss", "grad_norm", "kl", "entropy"} <= set(want[1])
  assert_same_step(got, want, f"{layout}: micro-batched + remat vs whole batch")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sampler_in_row_chunks_draws_what_one_pass_draws(layout):
  graphdef, params = nnx.split(tiny_model(seed=5))
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 32, size=(8, 5)).astype(np.int32)
  mask = np.ones_like(prompts)
  mask[1, :2] = mask[6, :3] = 0
  base = sampling.SamplingConfig(12, (2,), num_generations=3, temperature=0.9)
  runs = []
  for chunks in (1, 2):
    step, _ = make_step(graphdef)
    built = LAYOUTS[layout](step)
    cfg = dataclasses.replace(base, row_chunks=chunks)
    out = built.sampler(cfg)(built.place_params(params),
                             *built.place_batch((prompts, mask)), jax.random.key(7))
    runs.append(jax.tree.map(np.asarray, built.to_host(out)))
  one, chunked = runs
  np.testing.assert_array_equal(chunked.completion_ids, one.completion_ids)
  np.testing.assert_array_equal(chunked.completion_mask, one.completion_mask)
  np.testing.assert_array_equal(chunked.prompt_ids, one.prompt_ids)
  np.testing.assert_allclose(chunked.sampling_logprobs, one.sampling_logprobs, atol=1e-5)
  assert len({tuple(r) for r in one.completion_ids}) > 12  # rows drew different samples


# --- the trainer and plan -------------------------------------------------------------------


def small_run(**changes):
  config = config_lib.base_config()
  config.update(dict(max_steps=1, sft_steps=0, eval_every=0, checkpoint_every=0, log_every=1,
                     prompts_per_step=4, num_generations=4, max_prompt_length=12,
                     max_completion_length=24, train_length_bucket=0, beta=0.04,
                     learning_rate=1e-3))
  config.update(changes)
  return config


def planned_update_bytes(config, limit):
  plan = programs.compile_plan(config, jax.devices(), limit=limit)
  return plan, plan.phases["update"].total(plan.resident)


def memory_lines(caplog):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:")]


def test_a_small_limit_makes_the_trainer_and_plan_choose_the_same_micro_batches(
    tmp_path, caplog):
  config = small_run()
  roomy, first = planned_update_bytes(config, 64 * GiB)
  assert roomy.settings["update"] == memory.Update(4, False)  # 4 rows per device, whole
  tight = first - 1  # the fastest setting no longer fits
  plan, needed = planned_update_bytes(config, tight)
  chosen = plan.settings["update"]
  assert chosen != memory.Update(4, False) and needed <= tight
  assert chosen.rows < 4 or chosen.remat
  caplog.set_level(logging.INFO, logger="grpo_jax")
  config.memory_limit_gib = tight / GiB
  train.train_and_evaluate(config, str(tmp_path / "run"))
  lines = memory_lines(caplog)
  update = [line for line in lines if "completion positions" in line]
  assert len(update) == 1, lines
  assert plan.described["update"] in update[0] and plan.described["reference"] in update[0]
  sampler = [line for line in lines if line.startswith("memory: sampler")]
  assert plan.described["sampler"] in sampler[0]
  assert f"{memory.size_text(needed)} of {tight / GiB:.1f} GiB" in update[0]


def test_a_configured_micro_batch_that_does_not_fit_names_one_that_does(tmp_path):
  config = small_run()
  _, first = planned_update_bytes(config, 64 * GiB)
  config.update(memory_limit_gib=(first - 1) / GiB, micro_batch_size=4, remat=False)
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert "\n" not in message
  assert "the update does not fit: micro_batch_size=4, remat=False needs" in message
  assert "--config.micro_batch_size=" in message and "fits" in message
  # what it names does fit: the run goes through with it
  named = message.split("; ")[-1]
  rows = int(named.split("--config.micro_batch_size=")[1].split()[0])
  remat = named.split("--config.remat=")[1].split()[0] == "True"
  config.update(micro_batch_size=rows, remat=remat)
  train.train_and_evaluate(config, str(tmp_path / "run2"))
