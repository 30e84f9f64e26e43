"""The loss variants (issue 13) against a float64 NumPy transcription of TRL 1.16.

`trl_loss` below transcribes `GRPOTrainer._compute_loss`, `get_high_entropy_mask` and the
mask_truncated_completions block of TRL 1.16 (GSPO-token, which TRL lacks, from the GSPO
paper), including how DDP combines the processes' losses. Gradients: autograd's
`.detach()` (and GSPO-token's sg) are the `frozen` argument, so a finite difference in the
live log-probs, `frozen` held fixed, is the gradient autograd (and jax.grad) must give.

The fixture has ragged completions, a completion truncated at max length, one whose EOS is
its last allowed token (not truncated), a group with all-equal rewards, ratios != 1 (old
log-probs off the current ones, as with num_iterations = 2) and garbage in padded slots.
The full step then runs on one device, pmap over 4 and a data=4 mesh.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from grpo_jax import grpo, sampling
from grpo_jax.layouts import mesh, pmap
from grpo_jax.errors import ConfigError
from grpo_jax.grpo import loss as loss_lib
from grpo_jax.grpo.types import IMPORTANCE_SAMPLING_LEVELS

G, L = 4, 7
LENGTHS = np.array([7, 3, 5, 1, 7, 2, 6, 4, 7, 5, 3, 6])
EOS = LENGTHS < L
EOS[4] = True  # EOS in the last slot: a full mask, but not truncated
REWARDS = np.array([1.0, 0.0, 0.5, 2.0, 0.7, 0.7, 0.7, 0.7, 0.0, 1.0, 3.0, 1.0])  # group 1: equal
PALETTE = np.array([0.5, 0.78, 0.9, 1.0, 1.1, 1.25, 1.4, 2.0, 3.0])


def ref_advantages(rewards, g):
  grouped = rewards.reshape(-1, g)
  centered = grouped - grouped.mean(1, keepdims=True)
  return (centered / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)


def padded_mask(lengths, length):
  return (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.float64)


def loss_fixture(seed=0):
  rng = np.random.default_rng(seed)
  n = len(LENGTHS)
  mask = padded_mask(LENGTHS, L)
  logp = rng.uniform(-3.0, -0.1, size=(n, L))
  old = logp - np.log(rng.choice(PALETTE, size=(n, L)))
  ref = logp + rng.normal(scale=0.3, size=(n, L))
  entropy = rng.uniform(0.05, 3.0, size=(n, L))
  pad = mask == 0  # padded slots hold garbage: it must not leak anywhere
  logp, old, ref = np.where(pad, -50.0, logp), np.where(pad, 7.0, old), np.where(pad, 9.0, ref)
  entropy = np.where(pad, 99.0, entropy)
  return types.SimpleNamespace(logp=logp, old=old, ref=ref, entropy=entropy, mask=mask,
                               eos=EOS.copy(), adv=ref_advantages(REWARDS, G))


# ------------------------------------------------------------ TRL 1.16, transcribed


def trl_loss(logp, frozen, old, ref, adv, completion_mask, eos, entropy, c, processes=1):
  """(loss whose gradient DDP applies, metrics), float64. `c`: the GRPOConfig's fields.

  old None: num_iterations = 1, TRL's `old_per_token_logps = per_token_logps.detach()`.
  Rows are split over `processes` ranks in contiguous blocks; DDP averages their gradients.
  """
  mask_all = completion_mask.copy()
  if c.mask_truncated_completions:  # completion_mask * (~is_truncated)
    mask_all = mask_all * eos[:, None]
  threshold = None
  if c.top_entropy_quantile < 1.0:  # get_high_entropy_mask: gathered from every process
    threshold = np.quantile(entropy[mask_all > 0], 1.0 - c.top_entropy_quantile)
  num_items = mask_all.sum()  # accelerator.gather(loss_mask.sum()).sum()
  eps_low, eps_high = c.epsilon, c.epsilon if c.epsilon_high is None else c.epsilon_high
  losses, sums = [], {}

  def add(name, value, count):
    s, n = sums.get(name, (0.0, 0.0))
    sums[name] = (s + value, n + count)

  for rows in np.array_split(np.arange(len(adv)), processes):
    lp, fr, m, ent = logp[rows], frozen[rows], mask_all[rows], entropy[rows]
    od = fr if old is None else old[rows]
    a = adv[rows][:, None]

    def sequence_log_ratio(x):
      return ((x - od) * m).sum(-1, keepdims=True) / np.maximum(m.sum(-1, keepdims=True), 1.0)

    if c.importance_sampling_level == "token":
      log_w, log_w_detached = lp - od, fr - od
    elif c.importance_sampling_level == "sequence":
      log_w, log_w_detached = sequence_log_ratio(lp), sequence_log_ratio(fr)
    else:  # GSPO-token: s_t = sg[s_i] * pi_t / sg[pi_t]
      log_w = sequence_log_ratio(fr) + lp - fr
      log_w_detached = sequence_log_ratio(fr) + 0.0 * fr
    coef_1 = np.exp(log_w)
    if c.beta != 0.0:
      kl = np.exp(ref[rows] - lp) - (ref[rows] - lp) - 1
      if c.use_bias_correction_kl:
        kl = kl * coef_1
    if c.loss_type == "cispo":
      per_token = -np.minimum(np.exp(log_w_detached), eps_high) * a * lp
    elif c.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
      coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
      if c.delta is not None:
        coef_1 = np.minimum(coef_1, c.delta)
      per_token = -np.minimum(coef_1 * a, coef_2 * a)
    else:  # sapo
      t = np.where(a > 0, c.sapo_temperature_pos, c.sapo_temperature_neg)
      per_token = -(1.0 / (1.0 + np.exp(-t * (coef_1 - 1)))) * 4 / t * a
    if threshold is not None:
      per_token = per_token * (((ent * m) >= threshold) & (m > 0))
    if c.beta != 0.0:
      per_token = per_token + c.beta * kl
    per_token = per_token * np.ones_like(m)
    if c.loss_type in ("grpo", "sapo"):
      loss = ((per_token * m).sum(-1) / np.maximum(m.sum(-1), 1.0)).mean()
    elif c.loss_type == "bnpo":
      loss = (per_token * m).sum() / max(m.sum(), 1.0)
    elif c.loss_type == "dr_grpo":
      loss = (per_token * m).sum() / (per_token.shape[0] * c.sampling.max_completion_length)
    else:  # cispo, dapo
      loss = (per_token * m).sum() / (max(num_items, 1.0) / processes)
    losses.append(loss)

    def masked(name, x):  # global_masked_mean's local sum and count
      if x.shape[1] == 1:
        add(name, x.sum(), x.shape[0])
      else:
        add(name, (x * m).sum(), m.sum())

    if c.beta != 0.0:
      masked("kl", kl)
    masked("entropy", ent)
    if c.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
      low, high = (coef_1 < 1 - eps_low) & (a < 0), (coef_1 > 1 + eps_high) & (a > 0)
      masked("clip_ratio/low_mean", low * 1.0)
      masked("clip_ratio/high_mean", high * 1.0)
      masked("clip_ratio/region_mean", (low | high) * 1.0)
    elif c.loss_type == "cispo":
      masked("cispo_clip_ratio", ((coef_1 > eps_high) & (a > 0)) * 1.0)
  metrics = {k: s / max(n, 1.0) for k, (s, n) in sums.items()}
  return float(np.mean(losses)), metrics


def trl_gradient(f, logp, h=1e-6):
  """d f / d logp by central differences (float64), `frozen` held at `logp`."""
  grad = np.zeros_like(logp)
  for idx in np.ndindex(logp.shape):
    up, down = logp.copy(), logp.copy()
    up[idx] += h
    down[idx] -= h
    grad[idx] = (f(up) - f(down)) / (2 * h)
  return grad


# ------------------------------------------------------------ the JAX side


def make_cfg(length=L, **changes):
  fields = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, num_iterations=2)
  fields.update(changes)
  return grpo.GRPOConfig(sampling=sampling.SamplingConfig(
      max_completion_length=length, eos_token_ids=(2,), num_generations=G, temperature=0.9),
      **fields)


def as_rollout(mask, eos):
  n, length = mask.shape
  zeros = np.zeros((n, length), np.int32)
  return sampling.Rollout(np.ones((n, 2), np.int32), np.ones((n, 2), np.int32), zeros,
                          mask.astype(np.int32), zeros.astype(np.float32), eos)


def jax_loss(fx, cfg, old, rows_in_loss=None, token_shards=1):
  """(loss, metrics, d loss / d logp) from loss_from_logprobs."""
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  scored = grpo.ScoredRollout(as_rollout(fx.mask, fx.eos), f32(fx.adv), f32(old), f32(fx.ref),
                              rows_in_loss=f32(rows_in_loss))
  norms = grpo.loss_normalizers(loss_lib.loss_mask(scored, cfg), None,
                                cfg.sampling.max_completion_length, scored.rows_in_loss,
                                token_shards)
  fn = lambda lp: loss_lib.loss_from_logprobs(lp, f32(fx.entropy), scored, norms, cfg)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(f32(fx.logp))
  return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad, np.float64)


VARIANTS = {
    "token_bias_kl_truncated": dict(use_bias_correction_kl=True, mask_truncated_completions=True),
    "sequence": dict(importance_sampling_level="sequence"),
    "sequence_token_bias_kl": dict(importance_sampling_level="sequence_token",
                                   use_bias_correction_kl=True, mask_truncated_completions=True),
    "delta_entropy": dict(delta=1.6, top_entropy_quantile=0.3, epsilon_high=1.3),
    "one_iteration_bias_kl": dict(num_iterations=1, use_bias_correction_kl=True),
    "four_shards_entropy_sequence": dict(importance_sampling_level="sequence",
                                         top_entropy_quantile=0.45, beta=0.0, shards=4),
    "sequence_token_entropy_truncated": dict(
        importance_sampling_level="sequence_token", top_entropy_quantile=0.6,
        mask_truncated_completions=True, epsilon=0.1, epsilon_high=None),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_metrics_and_gradient_match_trl(loss_type, variant):
  changes = dict(VARIANTS[variant])
  shards = changes.pop("shards", 1)
  if loss_type == "cispo" and "epsilon_high" not in changes:
    changes["epsilon_high"] = 1.3  # ratios 1.4, 2, 3 capped; 1 + 1.3 would cap only 3
  cfg = make_cfg(loss_type=loss_type, **changes)
  fx = loss_fixture()
  old = None if cfg.num_iterations == 1 else fx.old
  loss, metrics, grad = jax_loss(fx, cfg, old, token_shards=shards)

  ref_fn = lambda lp: trl_loss(lp, fx.logp, old, fx.ref, fx.adv, fx.mask, fx.eos, fx.entropy,
                               cfg, shards)
  want_loss, want_metrics = ref_fn(fx.logp)
  assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
  assert metrics.keys() == want_metrics.keys()
  for k, v in want_metrics.items():
    assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  want_grad = trl_gradient(lambda lp: ref_fn(lp)[0], fx.logp)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  assert np.abs(want_grad).max() > 1e-3
  # What the loss leaves out has no gradient: padding, and masked truncated completions.
  out = fx.mask == 0
  if cfg.mask_truncated_completions:
    out |= ~fx.eos[:, None]
  assert np.all(grad[out] == 0.0)


@pytest.mark.parametrize("loss_type, level", zip(
    grpo.LOSS_TYPES, ("sequence", "token", "sequence_token", "token", "sequence", "token")))
def test_loss_matches_trl_over_four_devices(loss_type, level):
  """pmap over 4 devices (3 rows each) and one program over 4 row shards (the mesh's
  arrays) give TRL's loss over 4 processes: bnpo per device, the others global; the
  entropy threshold gathered from all of them."""
  cfg = make_cfg(loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=0.4,
                 use_bias_correction_kl=True, mask_truncated_completions=True,
                 epsilon_high=1.3 if loss_type == "cispo" else 0.28)
  fx = loss_fixture()
  want, want_metrics = trl_loss(fx.logp, fx.logp, fx.old, fx.ref, fx.adv, fx.mask, fx.eos,
                                fx.entropy, cfg, processes=4)
  want_grad = trl_gradient(lambda lp: trl_loss(lp, fx.logp, fx.old, fx.ref, fx.adv, fx.mask,
                                               fx.eos, fx.entropy, cfg, processes=4)[0], fx.logp)

  def device(logp, entropy, mask, eos, adv, old, ref):
    scored = grpo.ScoredRollout(as_rollout(mask, eos), adv, old, ref)
    norms = grpo.loss_normalizers(loss_lib.loss_mask(scored, cfg), "d", L)
    fn = lambda lp: loss_lib.loss_from_logprobs(lp, entropy, scored, norms, cfg, "d")
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logp)
    return jax.lax.psum((loss, metrics), "d"), grad

  split = lambda x: jnp.asarray(x.reshape((4, -1) + x.shape[1:]),
                                jnp.float32 if x.dtype == np.float64 else x.dtype)
  (loss, metrics), grad = jax.pmap(device, "d")(*map(split, (
      fx.logp, fx.entropy, fx.mask, fx.eos, fx.adv, fx.old, fx.ref)))
  assert float(loss[0]) == pytest.approx(want, rel=1e-5, abs=1e-6)
  for k, v in want_metrics.items():
    assert float(metrics[k][0]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
  np.testing.assert_allclose(np.asarray(grad).reshape(fx.logp.shape), want_grad, rtol=1e-4,
                             atol=1e-6)
  shards = jax_loss(fx, cfg, fx.old, token_shards=4)
  assert shards[0] == pytest.approx(want, rel=1e-5, abs=1e-6)
  np.testing.assert_allclose(shards[2], want_grad, rtol=1e-4, atol=1e-6)
  if loss_type == "bnpo":  # per device: not the one-device mean
    assert abs(jax_loss(fx, cfg, fx.old)[0] - want) > 1e-3


def test_fixture_exercises_what_it_claims():
  fx = loss_fixture()
  w = np.exp(fx.logp - fx.old)[fx.mask > 0]
  assert (w < 0.8).any() and (w > 1.28).any() and (np.abs(w - 1) > 0.05).mean() > 0.5
  assert fx.mask[4].all() and fx.eos[4] and fx.mask[0].all() and not fx.eos[0]
  assert np.all(fx.adv[4:8] == 0.0) and np.all(fx.adv[:4] != 0.0)


def test_cispo_caps_at_epsilon_high_itself_and_flags_clips():
  fx = loss_fixture()
  cfg = make_cfg(loss_type="cispo", epsilon_high=1.3, beta=0.0)
  _, metrics, grad = jax_loss(fx, cfg, fx.old)
  w, a = np.exp(fx.logp - fx.old), fx.adv[:, None] * np.ones_like(fx.logp)
  n_tokens = fx.mask.sum()
  # d loss / d logp = -min(w, eps_high) * A / tokens: the stop-gradient cap, no ratio term.
  np.testing.assert_allclose(grad, -np.minimum(w, 1.3) * a * fx.mask / n_tokens, rtol=1e-5,
                             atol=1e-7)
  capped = (w > 1.3) & (w < 2.3) & (fx.mask > 0) & (a != 0)
  assert capped.any()  # capped at 1.3 here; at 1 + 1.3 they would not be
  want = ((w > 1.3) & (a > 0) & (fx.mask > 0)).sum() / n_tokens
  assert metrics["cispo_clip_ratio"] == pytest.approx(want) and want > 0
  assert not any(k.startswith("clip_ratio/") for k in metrics)


def test_sequence_token_is_gspo_where_the_paper_says_and_differs_where_masks_act():
  """GSPO paper: with one advantage per sequence GSPO-token's objective, clipping and
  gradient equal GSPO's. They part where tokens of a sequence are treated differently:
  the entropy mask, and the bias-corrected KL (each token's own ratio gradient)."""
  fx = loss_fixture()
  run = lambda level, **kw: jax_loss(fx, make_cfg(importance_sampling_level=level, **kw), fx.old)
  for kw in (dict(), dict(loss_type="dapo", beta=0.0), dict(loss_type="sapo")):
    seq, tok = run("sequence", **kw), run("sequence_token", **kw)
    assert tok[0] == pytest.approx(seq[0], rel=1e-5)
    np.testing.assert_allclose(tok[2], seq[2], rtol=1e-4, atol=1e-7)
  for kw in (dict(top_entropy_quantile=0.5), dict(use_bias_correction_kl=True)):
    seq, tok = run("sequence", **kw), run("sequence_token", **kw)
    assert np.abs(tok[2] - seq[2]).max() > 1e-4
    if "top_entropy_quantile" in kw:
      assert tok[0] == pytest.approx(seq[0], rel=1e-5)  # the same value, another gradient


def test_delta_caps_the_unclipped_branch_and_clip_metrics_read_the_capped_ratio():
  fx = loss_fixture()
  a = fx.adv[:, None] * np.ones_like(fx.logp)
  w = np.exp(fx.logp - fx.old)
  valid = fx.mask > 0
  base = jax_loss(fx, make_cfg(loss_type="dapo", beta=0.0), fx.old)
  capped = jax_loss(fx, make_cfg(loss_type="dapo", beta=0.0, delta=1.6), fx.old)
  assert ((w > 1.6) & (a < 0) & valid).any()  # where delta acts: big ratio, A < 0
  assert capped[0] < base[0]
  # delta below 1 + eps_high: no ratio counts as high-clipped any more (TRL reads coef_1
  # after the cap).
  low_delta = jax_loss(fx, make_cfg(loss_type="dapo", beta=0.0, delta=1.2), fx.old)
  assert base[1]["clip_ratio/high_mean"] > 0 and low_delta[1]["clip_ratio/high_mean"] == 0


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_filler_rows_contribute_nothing(loss_type, level):
  """Filler rows (mask zero, rows_in_loss 0) anywhere in the batch: the loss, metrics and
  the real rows' gradients are those of the batch without them, theirs are zero."""
  fx = loss_fixture()
  cfg = make_cfg(loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=0.5,
                 use_bias_correction_kl=True, epsilon_high=1.3 if loss_type == "cispo" else 0.28)
  want = jax_loss(fx, cfg, fx.old)
  rng = np.random.default_rng(5)
  at = np.array([0, 5, 5, 12])  # before rows 0 and 5 (twice), and at the end
  filled = types.SimpleNamespace(
      **{k: np.insert(v, at, rng.uniform(-2, 2, size=(4,) + v.shape[1:]).astype(v.dtype), 0)
         for k, v in vars(fx).items()})
  filled.mask = np.insert(fx.mask, at, 0.0, axis=0)
  filled.eos = np.insert(fx.eos, at, False)
  real = np.insert(np.ones(len(fx.adv)), at, 0.0)
  old = np.insert(fx.old, at, -1.0, axis=0)
  loss, metrics, grad = jax_loss(filled, cfg, old, rows_in_loss=real)
  assert loss == pytest.approx(want[0], rel=1e-6, abs=1e-7)
  assert metrics == pytest.approx(want[1], rel=1e-6, abs=1e-7)
  np.testing.assert_allclose(grad[real > 0], want[2], rtol=1e-5, atol=1e-8)
  assert np.all(grad[real == 0] == 0.0)


def test_entropy_threshold_is_the_global_quantile_under_pmap():
  fx = loss_fixture()
  for rho in (0.2, 0.55, 1.0 / 3.0):
    want = np.quantile(fx.entropy[fx.mask > 0], 1 - rho)
    one = loss_lib.entropy_threshold(jnp.asarray(fx.entropy, jnp.float32),
                                     jnp.asarray(fx.mask), rho)
    four = jax.pmap(lambda e, m: loss_lib.entropy_threshold(e, m, rho, "d"), "d")(
        jnp.asarray(fx.entropy.reshape(4, 3, L), jnp.float32),
        jnp.asarray(fx.mask.reshape(4, 3, L)))
    assert float(one) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(four), want, rtol=1e-6)
  empty = loss_lib.entropy_threshold(jnp.ones((2, 3)), jnp.zeros((2, 3)), 0.2)
  assert float(empty) == np.inf  # no token: none passes


# ------------------------------------------------- the full step, three layouts

PROMPT_LEN, STEP_L = 5, 6
STEP_LENGTHS = np.array([6, 2, 4, 6, 3, 1, 5, 6, 2, 4, 6, 3, 5, 1, 4, 2])
STEP_EOS = STEP_LENGTHS < STEP_L
STEP_EOS[[3, 10]] = True  # EOS in the last slot; rows 0 and 7 are truncated
STEP_REWARDS = np.array([1.0, 0.0, 2.0, 0.5, 0.3, 0.3, 0.3, 0.3, 1.0, 3.0, 0.0, 1.0,
                         2.0, 0.0, 0.0, 1.0], np.float32)  # group 1: all equal
FILLERS = np.array([1, 6, 7, 15])  # rows a filled batch replaces by fillers


def step_rollout(seed=0):
  """16 completions (4 groups of G = 4) after left-padded prompts; EOS is token 2."""
  rng = np.random.default_rng(seed)
  n = len(STEP_LENGTHS)
  starts = rng.integers(0, PROMPT_LEN, size=n)
  prompt_mask = (np.arange(PROMPT_LEN)[None] >= starts[:, None]).astype(np.int32)
  prompt_ids = np.where(prompt_mask > 0, rng.integers(3, 32, size=(n, PROMPT_LEN)), 0)
  mask = padded_mask(STEP_LENGTHS, STEP_L).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(3, 32, size=(n, STEP_L)), 0)
  ids[np.arange(n)[STEP_EOS], STEP_LENGTHS[STEP_EOS] - 1] = 2
  return sampling.Rollout(prompt_ids.astype(np.int32), prompt_mask, ids.astype(np.int32), mask,
                          np.zeros((n, STEP_L), np.float32), STEP_EOS.copy())


@pytest.fixture(scope="module")
def policy():
  """A one-layer tiny model (compiles fast), the rollout, and its log-probs / entropies."""
  graphdef, params = nnx.split(tiny_model(seed=3, num_layers=1))
  rollout = step_rollout()
  logp, entropy = jax.jit(lambda p: grpo.completion_logprobs(graphdef, p, rollout, 0.9, 8))(
      params)
  return graphdef, params, rollout, np.asarray(logp, np.float64), np.asarray(entropy, np.float64)


def off_policy_scored(rollout, logp, fillers=False, beta=0.04):
  """A scored rollout with old log-probs off the current ones (ratios from PALETTE), a
  reference, TRL advantages; `fillers`: rows FILLERS replaced by filler rows."""
  rng = np.random.default_rng(2)
  old = logp - np.log(rng.choice(PALETTE, size=logp.shape))
  ref = logp + rng.normal(scale=0.3, size=logp.shape)
  adv = ref_advantages(STEP_REWARDS.astype(np.float64), G)
  rows_in_loss = None
  if fillers:
    adv[FILLERS] = 3.0  # whatever a filler holds, it must not count
    rollout = rollout._replace(
        completion_mask=np.where(np.isin(np.arange(len(adv)), FILLERS)[:, None], 0,
                                 rollout.completion_mask),
        eos_terminated=rollout.eos_terminated & ~np.isin(np.arange(len(adv)), FILLERS))
    rows_in_loss = (~np.isin(np.arange(len(adv)), FILLERS)).astype(np.float32)
  f32 = lambda x: None if x is None else np.asarray(x, np.float32)
  return grpo.ScoredRollout(rollout, f32(adv), f32(old), f32(ref) if beta else None,
                            rows_in_loss=rows_in_loss)


def make_step(graphdef, **changes):
  cfg = make_cfg(length=STEP_L, logprob_chunk_size=8, **changes)
  # Adam's eps bounds how much float noise in near-zero gradients (another reduction order
  # on 1 vs 4 devices) is amplified into the update (as in test_parallel).
  tx, schedule = grpo.make_optimizer(1e-2, 10, eps=1e-3)
  return grpo.GRPOStep(graphdef, tx, schedule, cfg), tx


REFERENCE_SCALE = 0.9  # the reference params: the actor's, scaled


def run_single(step, tx, params, how, *data):
  state = grpo.init_train_state(params, tx)
  if how == "learn":
    ref = jax.tree.map(lambda x: x * REFERENCE_SCALE, params)
    state, metrics = jax.jit(step.learn)(state, ref, *data)
  else:
    state, metrics = jax.jit(step.update)(state, *data)
  return state.params, jax.tree.map(np.asarray, metrics)


def run_layout(fn, params, how, *data):
  """Through a PmappedStep / MeshStep: placed state, reference and batch."""
  state = fn.init_state(fn.place_params(params))
  if how == "learn":
    ref = fn.place_params(jax.tree.map(lambda x: x * REFERENCE_SCALE, params))
    state, metrics = fn.learn(state, ref, *(fn.place_batch(x) for x in data))
  else:
    state, metrics = fn.update(state, *(fn.place_batch(x) for x in data))
  return jax.device_get(fn.single_copy(state.params)), fn.host_metrics(metrics)


LAYOUTS = {"pmap": lambda step: pmap.pmap_step(step, jax.local_devices()[:4]),
           "mesh": lambda step: mesh.mesh_step(step, mesh.make_mesh(data=4))}

STEP_VARIANTS = {
    # score + update: old log-probs from the params (ratios != 1 on the second update);
    # the in-pass entropy threshold (all-gathered under pmap), one ratio per sequence.
    "learn_cispo_sequence_entropy": ("learn", dict(
        loss_type="cispo", epsilon_high=1.02, importance_sampling_level="sequence",
        top_entropy_quantile=0.3, use_bias_correction_kl=True)),
    # update on a scored rollout with filler rows and old log-probs off the current ones.
    # bnpo: each device's (mesh: data shard's) own token mean; micro-batches of 2 rows per
    # device, so the entropy threshold comes from the whole-batch pre-pass.
    "update_bnpo_entropy_microbatched_fillers": ("update", dict(
        loss_type="bnpo", use_bias_correction_kl=True, mask_truncated_completions=True,
        top_entropy_quantile=0.45, delta=1.6, micro_batch_size=2)),
}


def assert_same_step(got, want, what):
  (got_params, got_metrics), (want_params, want_metrics) = got, want
  assert got_metrics.keys() == want_metrics.keys(), what
  for k in want_metrics:
    np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=2e-4, atol=1e-6,
                               err_msg=f"{what}: {k}")
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_step_is_the_same_on_one_device_pmap_and_mesh(variant, policy):
  """Loss, grad norm, metrics and updated params agree. bnpo is a per-device mean by
  definition (TRL's per process): there pmap over 4 and the data=4 mesh agree with each
  other, and test_loss_matches_trl_over_four_devices ties both to TRL over 4 processes
  (one device, a single shard, is another loss)."""
  graphdef, params, rollout, logp, _ = policy
  how, changes = STEP_VARIANTS[variant]
  step, tx = make_step(graphdef, **changes)
  data = ((rollout, STEP_REWARDS) if how == "learn"
          else (off_policy_scored(rollout, logp, fillers=True),))
  pmap, on_mesh = (run_layout(layout(step), params, how, *data) for layout in LAYOUTS.values())
  assert {"loss", "grad_norm", "kl", "entropy"} <= set(pmap[1])
  assert ("cispo_clip_ratio" in pmap[1]) == (step.cfg.loss_type == "cispo")
  assert ("clip_ratio/low_mean" in pmap[1]) == (step.cfg.loss_type == "bnpo")
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(pmap[0]), jax.tree.leaves(params)))
  assert moved > 1e-3
  assert_same_step(on_mesh, pmap, "mesh vs pmap")
  if step.cfg.loss_type != "bnpo":
    assert_same_step(pmap, run_single(step, tx, params, how, *data), "pmap vs one device")


def test_micro_batched_threshold_is_the_global_one_and_fillers_split_with_rows(policy):
  """loss_and_grads in 1-row micro-batches, filler rows among them, gives TRL's loss and
  metrics of the real rows: the entropy threshold is the whole batch's, and rows_in_loss
  and the per-row normalisers are split like the rows."""
  graphdef, params, rollout, logp, entropy = policy
  step, _ = make_step(graphdef, loss_type="bnpo", top_entropy_quantile=0.35,
                      mask_truncated_completions=True, use_bias_correction_kl=True,
                      micro_batch_size=1)
  scored = off_policy_scored(rollout, logp, fillers=True)
  norms = grpo.loss_normalizers(loss_lib.loss_mask(scored, step.cfg), None, STEP_L,
                                scored.rows_in_loss)
  (loss, metrics), _ = jax.jit(
      lambda p: grpo.loss_and_grads(p, graphdef, scored, norms, step.cfg))(params)
  keep = scored.rows_in_loss > 0
  f64 = lambda x: np.asarray(x, np.float64)[keep]
  want, want_metrics = trl_loss(f64(logp), f64(logp), f64(scored.old_logprobs),
                                f64(scored.ref_logprobs), f64(scored.advantages),
                                f64(rollout.completion_mask), STEP_EOS[keep], f64(entropy),
                                step.cfg)
  assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    assert float(metrics[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_micro_batch_size_counts_completions_per_device_in_both_layouts(policy):
  # 16 completions over 4 devices: 4 per device, which 8 does not divide; on one device
  # the 16 rows are all its own and 8 divides them.
  graphdef, params, rollout, _, _ = policy
  step, _ = make_step(graphdef, micro_batch_size=8)
  for layout in LAYOUTS.values():
    with pytest.raises(ConfigError, match="completions each device trains on"):
      run_layout(layout(step), params, "learn", rollout, STEP_REWARDS)
  assert grpo.micro_batch_rows(16, 8) == 8


def test_dr_grpo_divides_by_max_completion_length_whatever_the_width_and_no_kl_at_beta_0(
    policy):
  graphdef, params, rollout, logp, _ = policy
  width = STEP_L + 3
  step, tx = make_step(graphdef, loss_type="dr_grpo", beta=0.0, num_iterations=1)
  step = dataclasses.replace(step, cfg=dataclasses.replace(
      step.cfg, sampling=dataclasses.replace(step.cfg.sampling, max_completion_length=width)))
  pad = lambda x: np.pad(x, ((0, 0), (0, 3)))
  wide = rollout._replace(completion_ids=pad(rollout.completion_ids),
                          completion_mask=pad(rollout.completion_mask),
                          sampling_logprobs=pad(rollout.sampling_logprobs))
  # The 9-wide rollout trimmed to the 6 positions its completions use, as train.py does.
  trimmed = sampling.trim_completions(wide, STEP_L)
  np.testing.assert_array_equal(trimmed.eos_terminated, rollout.eos_terminated)
  adv = ref_advantages(STEP_REWARDS.astype(np.float64), G)
  scored = lambda r: grpo.ScoredRollout(r, jnp.asarray(adv, jnp.float32), None, None)
  p_wide, m_wide = run_single(step, tx, params, "update", scored(wide))
  p_trim, m_trim = run_single(step, tx, params, "update", scored(trimmed))
  assert "kl" not in m_wide and "kl" not in m_trim  # beta = 0: no KL term, no kl metric
  assert float(m_trim["loss"]) == pytest.approx(float(m_wide["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(p_trim), jax.tree.leaves(p_wide)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # ... and that is TRL's sum / (rows * max_completion_length = 9), not / (rows * 6)
  want, _ = trl_loss(logp, logp, None, None, adv, padded_mask(STEP_LENGTHS, STEP_L), STEP_EOS,
                     np.zeros_like(logp), step.cfg)
  assert float(m_trim["loss"]) == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_sampler_flags_an_eos_in_the_last_slot_as_terminated():
  """Two runs with the same keys: the second stops on a token that some row first emits
  in its last slot. That row's mask is full, and it is not truncated."""
  graphdef, params = nnx.split(tiny_model(num_layers=1))
  rng = np.random.default_rng(4)
  prompts = rng.integers(3, 31, size=(8, 5)).astype(np.int32)
  prompt_mask = (np.arange(5)[None] >= rng.integers(0, 4, size=8)[:, None]).astype(np.int32)
  gen = jax.jit(sampling.generate, static_argnums=(0, 5))
  cfg = lambda eos: sampling.SamplingConfig(max_completion_length=STEP_L, eos_token_ids=eos,
                                            temperature=1.0)
  sample = lambda eos: gen(graphdef, params, prompts, prompt_mask, jax.random.key(0), cfg(eos))
  first = sample((31,))
  ids, mask, flag = (np.asarray(x) for x in (first.completion_ids, first.completion_mask,
                                             first.eos_terminated))
  np.testing.assert_array_equal(flag, (ids == 31).any(1))
  row = next(r for r in range(len(ids)) if mask[r].all() and ids[r, -1] not in ids[r, :-1])
  eos = int(ids[row, -1])
  out = sample((eos, 31))  # the same samples up to each row's first eos or 31
  stops = np.isin(ids, (eos, 31)) & (mask > 0)
  ended = stops.any(1)
  np.testing.assert_array_equal(np.asarray(out.eos_terminated), ended)
  np.testing.assert_array_equal(np.asarray(out.completion_mask).sum(1),
                                np.where(ended, stops.argmax(1) + 1, STEP_L))
  assert np.asarray(out.completion_mask)[row].all() and ended[row]
  assert 0 < ended.sum() < len(ids)
  adv = grpo.group_advantages(jnp.zeros(len(ids)), (1.0,), 2, "group")
  clipped = grpo.reward_metrics(jnp.zeros(len(ids)), adv, out, 2)["completions/clipped_ratio"]
  assert float(clipped) == pytest.approx(np.mean(~ended))  # the last-slot EOS is not clipped
