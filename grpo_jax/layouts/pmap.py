"""Devices and data parallelism: replicate state, shard batches, pmap the pure GRPO step.

Each device holds whole groups (all G completions of its prompts), so group statistics
are local and only global quantities (batch std, loss normalisers, gradients, metrics)
cross devices, through collectives over the axis `AXIS`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import grpo, sampling
from grpo_jax.errors import ConfigError

AXIS = "devices"


def replicate(tree, devices: Sequence[jax.Device] | None = None):
  """Copies a pytree onto every device: leading axis = device (the layout pmap takes)."""
  devices = list(devices or jax.local_devices())
  sharding = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))

  def put(x):
    x = jnp.asarray(x)
    copies = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, copies)

  return jax.tree.map(put, tree)


def distinct_buffers(tree):
  """Each leaf in its own buffer. A jitted `tx.init` may return one zeros buffer for both
  Adam moments (XLA merges identical outputs); a donated state must not hold a buffer twice."""
  return jax.tree.map(lambda x: x.copy(), tree)


def _local_rows(x):
  """This host's rows of a device-axis array ([local devices, ...]); works multi-host too,
  where the array also has rows on other hosts' devices."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.concatenate([np.asarray(s.data) for s in x.addressable_shards])
  return x


def unreplicate(tree):
  """The first local device's copy of a replicated pytree."""
  return jax.tree.map(lambda x: x.addressable_shards[0].data[0]
                      if isinstance(x, jax.Array) else x[0], tree)


def shard(tree, num_devices: int):
  """[N, ...] -> [num_devices, N / num_devices, ...] for every leaf."""
  return jax.tree.map(lambda x: x.reshape((num_devices, -1) + x.shape[1:]), tree)


def unshard(tree):
  """[num_devices, M, ...] -> [num_devices * M, ...] for every leaf."""
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def check_batch(num_prompts: int, num_generations: int, num_devices: int) -> None:
  """Raises a ValueError unless the batch splits into whole groups on every device."""
  if num_generations < 2:
    raise ConfigError(f"num_generations={num_generations}; must be >= 2")
  if num_prompts < 1 or num_prompts % num_devices:
    raise ConfigError(
        f"prompts_per_step={num_prompts} must be a positive multiple of the number of "
        f"devices ({num_devices}) so that each device holds whole groups of "
        f"num_generations={num_generations} completions")


@dataclasses.dataclass(frozen=True)
class PmappedStep:
  """`grpo.GRPOStep` compiled with `jax.pmap` over `devices`.

  Arguments and results carry a leading device axis (see `replicate` / `shard`); the
  random key is shared by all devices (rows draw distinct keys by global index).
  """

  step: grpo.GRPOStep
  devices: tuple[Any, ...] | None  # None: all devices of all hosts (multi-host)

  @property
  def local_devices(self) -> list[Any]:
    return list(self.devices) if self.devices else jax.local_devices()

  @property
  def num_devices(self) -> int:
    """Devices this host feeds (the leading axis of its arrays)."""
    return len(self.local_devices)

  @property
  def batch_divisor(self) -> int:
    """Rows of a batch must split evenly over this many shards."""
    return self.num_devices

  def rows_per_shard(self, batch) -> int:
    """Rows each device holds of a placed batch array ([devices, rows, ...])."""
    return batch.shape[1]

  def place_params(self, params):
    return replicate(params, self.local_devices)

  def init_state(self, params) -> grpo.TrainState:
    """A fresh train state around placed params; the optimizer state is built on device."""
    # Named like the step's axis: arrays laid out on a differently named pmap mesh would
    # make the first `learn` call compile twice.
    init = jax.pmap(self.step.tx.init, AXIS, devices=self.devices)
    opt_state = distinct_buffers(init(params))
    return grpo.TrainState(replicate(jnp.zeros((), jnp.int32), self.local_devices), params,
                           opt_state)

  def place_state(self, state: grpo.TrainState) -> grpo.TrainState:
    return replicate(state, self.local_devices)

  def place_batch(self, tree):
    return shard(tree, self.num_devices)

  def single_copy(self, tree):
    return unreplicate(tree)

  def to_host(self, tree):
    """This host's device-sharded batch (e.g. a rollout) as host arrays, no device axis."""
    return unshard(jax.device_get(jax.tree.map(_local_rows, tree)))

  def host_metrics(self, metrics) -> dict[str, np.ndarray]:
    return host_metrics(metrics)

  def sampler(self, cfg: sampling.SamplingConfig):
    """A pmapped sampler with other settings (e.g. greedy evaluation with G = 1)."""
    return pmap_generate(self.step.model_def, cfg, self.devices)

  @functools.cached_property
  def generate(self):
    return jax.pmap(self.step.generate, AXIS, in_axes=(0, 0, 0, None), devices=self.devices)

  def turn_phases(self, cfg: sampling.SamplingConfig) -> sampling.TurnPhases:
    """The multi-turn phases (sampling.multi_turn) for `cfg`, pmapped: the state is sharded
    by rows like a batch, the key shared."""
    model_def = self.step.model_def
    pmap = functools.partial(jax.pmap, axis_name=AXIS, devices=self.devices)
    return sampling.TurnPhases(
        begin=pmap(functools.partial(sampling.begin_turns, model_def, cfg=cfg)),
        decode=pmap(functools.partial(sampling.decode_turn, model_def, cfg=cfg, axis_name=AXIS),
                    in_axes=(0, 0, None), donate_argnums=(1,)),
        append=pmap(functools.partial(sampling.append_turn, model_def), donate_argnums=(1,)),
        finish=pmap(sampling.finish_turns))

  @functools.cached_property
  def score(self):
    return jax.pmap(self.step.score, AXIS, devices=self.devices)

  @functools.cached_property
  def update(self):
    return jax.pmap(self.step.update, AXIS, devices=self.devices, donate_argnums=(0,))

  @functools.cached_property
  def learn(self):
    return jax.pmap(self.step.learn, AXIS, in_axes=(0, 0, 0, 0), devices=self.devices,
                    donate_argnums=(0,))

  def train_step(self, reward_fn: grpo.RewardFn):
    """Fused sample + jittable reward + update, pmapped."""
    fn = functools.partial(self.step.train_step, reward_fn=reward_fn)
    return jax.pmap(fn, AXIS, in_axes=(0, 0, 0, None), devices=self.devices,
                    donate_argnums=(0,))


def pmap_generate(model_def, cfg: sampling.SamplingConfig,
                  devices: Sequence[jax.Device] | None = None):
  """`sampling.generate` pmapped on its own (e.g. greedy evaluation with G = 1)."""
  fn = functools.partial(sampling.generate, model_def, cfg=cfg, axis_name=AXIS)
  return jax.pmap(fn, AXIS, in_axes=(0, 0, 0, None), devices=devices)


def pmap_step(step: grpo.GRPOStep, devices: Sequence[jax.Device] | None = None) -> PmappedStep:
  """pmap over `devices` (default: this host's). On a multi-host slice pass None: pmap then
  spans every host's devices and each host supplies the data of its local ones."""
  devices = tuple(devices) if devices else None
  return PmappedStep(dataclasses.replace(step, axis_name=AXIS), devices)


def host_metrics(metrics) -> dict[str, np.ndarray]:
  """Metrics from a pmapped call (identical on every device) as host numpy values."""
  return jax.tree.map(np.asarray, jax.device_get(unreplicate(metrics)))


__all__ = ["AXIS", "replicate", "unreplicate", "shard", "unshard", "check_batch",
           "PmappedStep", "pmap_generate", "pmap_step", "host_metrics"]
