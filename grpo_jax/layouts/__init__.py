"""Layouts: the pure GRPO step (`grpo.GRPOStep`) compiled for a set of devices.

  pmap   data parallel: state replicated on every device, batches split by rows
         (`pmap_step` -> PmappedStep)
  mesh   jit over a (data, fsdp, tensor) Mesh: FSDP / tensor-parallel state, batches split
         over data x fsdp (`mesh_step` -> MeshStep)

Both return an object with the `Layout` interface below: the loop, the evaluator, the
samplers and the planner call nothing else, so they never ask which layout they hold.
`planned.PlannedStep` wraps either one with the same interface, choosing micro-batches and
chunks per shape. Each compiled program keeps the step's own signature (see
`grpo.GRPOStep`), with arrays laid out as `place_*` lays them out.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Layout(Protocol):
  """What a compiled step offers its callers, whatever the layout."""

  step: Any  # the grpo.GRPOStep it compiles

  # --- placement: host arrays in, device arrays out (and back) -----------------------
  @property
  def batch_divisor(self) -> int:
    """Rows of a global batch must split evenly over this many shards."""

  def rows_per_shard(self, batch) -> int:
    """Rows one shard holds of a placed batch array."""

  def place_params(self, params): ...

  def init_state(self, params):
    """A fresh `grpo.TrainState` around placed params; the optimizer state built on device."""

  def place_state(self, state): ...

  def place_batch(self, tree): ...

  def single_copy(self, tree):
    """One copy of a placed, replicated tree (for checkpoints and exports)."""

  def to_host(self, tree):
    """This host's rows of a placed batch (a rollout) as host arrays."""

  def host_metrics(self, metrics) -> dict:
    """A compiled program's metrics as host numpy values."""

  # --- the compiled programs -----------------------------------------------------------
  @property
  def generate(self):
    """(params, prompt_ids, prompt_mask, key) -> placed Rollout, the step's sampling."""

  def sampler(self, cfg):
    """`generate` with other `sampling.SamplingConfig` settings (greedy evaluation)."""

  def turn_phases(self, cfg):
    """The multi-turn phases (`sampling.TurnPhases`) for `cfg`."""

  @property
  def score(self):
    """(state, reference params, rollout, rewards) -> (ScoredRollout, metrics): advantages
    and the old / reference log-probs, the score pass."""

  @property
  def update(self):
    """(state, scored, reference params) -> (state, metrics): the GRPO update (the state
    donated)."""

  @property
  def learn(self):
    """(state, reference params, rollout, rewards) -> (state, metrics): score and update
    fused in one program."""

  def train_step(self, reward_fn):
    """Sample, a jittable reward and update, fused in one program."""
