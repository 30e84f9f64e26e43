"""Mesh mode: the same pure GRPO step under `jax.jit` on a Mesh of (data, fsdp, tensor).

pmap replicates the actor, the reference and the AdamW state on every chip, which caps
the model at what one chip holds. Here it is FSDP (ZeRO-3) with optional tensor
parallelism:

  * parameters and AdamW moments are split by name-based partition rules: every
    projection over 'tensor' x 'fsdp' on its head / MLP-unit dimension (the output of
    q/k/v/gate/up, the input of o/down: Megatron's column / row split), the embedding and
    LM head over 'tensor' on the vocabulary and 'fsdp' on the hidden dimension;
  * in full-sequence passes (reference, update) the token rows are split over
    ('data', 'fsdp') and pinned there at every layer boundary (`models.sharding`), so
    XLA all-gathers each layer's weights over 'fsdp' where they are used and
    reduce-scatters their gradients, instead of running every projection on the whole
    global batch with its contraction split;
  * decoding keeps the weights where they lie and moves only the decoded rows; the LM
    head is gathered once per rollout so the [rows, vocab] logits never cross chips.

The step function itself is unchanged: it sees global arrays (axis_name=None) and is
traced under `jax.set_mesh(mesh)`, which is what the model's sharding constraints read.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grpo_jax import grpo, sampling
from grpo_jax.layouts import pmap
from grpo_jax.errors import ConfigError
from grpo_jax.models import sharding

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = sharding.BATCH_AXES
_SPLIT = ("tensor", "fsdp")  # tensor-major: after the fsdp all-gather each tensor rank
                             # holds a contiguous block of heads / MLP units

# (parameter path pattern, partition of its trailing dims). Kernels are [in, out]; a
# quantised kernel (QLoRA's base) is a qwix QArray whose qvalue [in, out] and scale
# [in / block or 1, out] split like the kernel (an axis that does not divide stays whole).
# LoRA adapters follow their base matrix: B [r, out] of a column-split projection splits
# its output like the kernel, A [in, r] of a row-split one its input; the rank-r sides are
# small and stay whole.
_KERNEL = r"/kernel(/qvalue|/scale)?$"
PARTITION_RULES = (
    (r"(embed_tokens|lm_head)$", ("tensor", "fsdp")),  # [V, D]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)" + _KERNEL, (None, _SPLIT)),
    (r"(o_proj|down_proj)" + _KERNEL, (_SPLIT, None)),
    (r"(q_proj|k_proj|v_proj)/bias$", (_SPLIT,)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$", (None, _SPLIT)),
    (r"(o_proj|down_proj)/lora_a$", (_SPLIT, None)),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (all of them by default); -1 fills in.

  `devices` may be those of a TPU topology that is not here (`grpo_jax.plan`): TPU
  devices are arranged along the slice's interconnect (`mesh_utils.create_device_mesh`)."""
  devices = list(devices or jax.devices())
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ConfigError(f"config.mesh={sizes}; allowed: positive sizes, at most one -1")
  if free:
    sizes[free[0]] = len(devices) // fixed if len(devices) % fixed == 0 else 0
  if int(np.prod(list(sizes.values()))) != len(devices) or 0 in sizes.values():
    raise ConfigError(f"config.mesh={ {'data': data, 'fsdp': fsdp, 'tensor': tensor} } does "
                      f"not multiply to the {len(devices)} devices")
  shape = tuple(sizes[a] for a in MESH_AXES)
  if devices[0].platform == "tpu":
    try:
      return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)
    except (ValueError, NotImplementedError, AssertionError):  # a shape it cannot map
      pass
  return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def _path_name(path) -> str:
  """'blocks/self_attn/q_proj/kernel' for a key path into an nnx.State."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":  # nnx.Variable's own leaf
        parts.append(k.name)
    else:
      parts.append(str(getattr(k, "key", getattr(k, "idx", k))))
  return "/".join(parts)


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The rule-given spec for one parameter; axes that do not divide a dim are dropped."""
  for pattern, trailing in PARTITION_RULES:
    if re.search(pattern, name):
      spec = (None,) * (len(shape) - len(trailing)) + trailing  # stacked layers: axis 0 free
      return P(*[sharding.fit_axes(a, dim, mesh) for a, dim in zip(spec, shape)])
  return P()


def param_shardings(params, mesh: Mesh):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, partition_spec(_path_name(path), x.shape, mesh)),
      params)


def per_device_bytes(tree, device=None) -> int:
  """Bytes of `tree` that live on one device (read from the arrays' shardings; by default
  its first array's first device). Host values (NumPy arrays, scalars) live on none."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if not leaves:
    return 0
  device = device or leaves[0].addressable_shards[0].device
  return sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)


@dataclasses.dataclass(frozen=True)
class MeshStep:
  """`grpo.GRPOStep` jit-compiled over a mesh; arrays are global (no device axis)."""

  step: grpo.GRPOStep
  mesh: Mesh

  @property
  def batch_divisor(self) -> int:
    """Rows of a batch must split evenly over this many shards (data x fsdp)."""
    return self.step.cfg.token_shards

  def rows_per_shard(self, batch) -> int:
    """Rows each data x fsdp shard holds of a placed (global) batch array."""
    return batch.shape[0] // self.batch_divisor

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_AXES))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def place_params(self, params):
    """Fresh buffers, since the train state is donated: device_put to a layout that
    includes the source's device reuses the source buffer there (even with may_alias=False),
    so placing the same params twice (actor, reference) would share buffers."""
    return jax.device_put(pmap.distinct_buffers(params), param_shardings(params, self.mesh))

  def opt_state_shardings(self, params):
    """AdamW moments are laid out like their parameter; counters are replicated."""
    by_name = {_path_name(path): (x.shape, x.sharding)
               for path, x in jax.tree_util.tree_leaves_with_path(params)}

    def pick(path, leaf):
      name = _path_name(path)
      for param_name, (shape, layout) in by_name.items():
        if name.endswith(param_name) and leaf.shape == shape:
          return layout
      return self.replicated

    abstract = jax.eval_shape(self.step.tx.init, params)
    return jax.tree_util.tree_map_with_path(pick, abstract)

  def init_state(self, params) -> grpo.TrainState:
    init = jax.jit(self.step.tx.init, out_shardings=self.opt_state_shardings(params))
    opt_state = pmap.distinct_buffers(init(params))
    return grpo.TrainState(jax.device_put(jnp.zeros((), jnp.int32), self.replicated), params,
                           opt_state)

  def place_state(self, state: grpo.TrainState) -> grpo.TrainState:
    """A host / single-device state (e.g. a restored checkpoint) laid out on the mesh."""
    params = self.place_params(state.params)
    return grpo.TrainState(jax.device_put(state.step, self.replicated), params,
                           jax.device_put(state.opt_state, self.opt_state_shardings(params)))

  def place_batch(self, tree):
    return jax.device_put(tree, self.batch_sharding)

  def single_copy(self, tree):
    return tree

  def to_host(self, tree):
    return jax.device_get(tree)

  def host_metrics(self, metrics) -> dict[str, np.ndarray]:
    return jax.tree.map(np.asarray, jax.device_get(metrics))

  def _rows_sharded(self, rollout):
    return jax.lax.with_sharding_constraint(rollout, self.batch_sharding)

  def _turns_sharded(self, state: sampling.TurnState) -> sampling.TurnState:
    """A multi-turn state's rows split like a batch's; its KV cache keeps the layout the
    model gave it (sharding.kv_cache: kv heads may also split over "tensor")."""
    return self._rows_sharded(state._replace(cache=None))._replace(cache=state.cache)

  def sampler(self, cfg: sampling.SamplingConfig):
    """A jitted sampler with other settings (e.g. greedy evaluation)."""
    fn = functools.partial(sampling.generate, self.step.model_def, cfg=cfg)
    return self._jit(lambda *a: self._rows_sharded(fn(*a)))

  def _jit(self, fn, **jit_kwargs) -> "OnMesh":
    return OnMesh(jax.jit(fn, **jit_kwargs), self.mesh)

  @functools.cached_property
  def generate(self):
    return self._jit(lambda *a: self._rows_sharded(self.step.generate(*a)))

  def turn_phases(self, cfg: sampling.SamplingConfig) -> sampling.TurnPhases:
    """The multi-turn phases (sampling.multi_turn) for `cfg`, jitted on the mesh: the
    state's rows split like a batch's."""
    model_def, rows = self.step.model_def, self._turns_sharded
    return sampling.TurnPhases(
        begin=self._jit(lambda *a: rows(sampling.begin_turns(model_def, *a, cfg=cfg))),
        decode=self._jit(lambda *a: rows(sampling.decode_turn(model_def, *a, cfg=cfg)),
                         donate_argnums=(1,)),
        append=self._jit(lambda *a: rows(sampling.append_turn(model_def, *a)),
                         donate_argnums=(1,)),
        finish=self._jit(lambda s: self._rows_sharded(sampling.finish_turns(s))))

  @functools.cached_property
  def score(self):
    return self._jit(self.step.score)

  @functools.cached_property
  def update(self):
    return self._jit(self.step.update, donate_argnums=(0,))

  @functools.cached_property
  def learn(self):
    return self._jit(self.step.learn, donate_argnums=(0,))

  def train_step(self, reward_fn: grpo.RewardFn):
    return self._jit(functools.partial(self.step.train_step, reward_fn=reward_fn),
                     donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """A jitted function traced, lowered and run with its mesh set (`jax.set_mesh`), which is
  where the model's activation constraints find their axes."""

  jitted: Any
  mesh: Mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def mesh_step(step: grpo.GRPOStep, mesh: Mesh) -> MeshStep:
  """`step` for `mesh`: global arrays (no axis name); per-device sizes (log-prob chunks,
  micro-batches) taken from one of the data x fsdp shards of the batch."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  cfg = dataclasses.replace(step.cfg, token_shards=shards)
  return MeshStep(dataclasses.replace(step, axis_name=None, cfg=cfg), mesh)


__all__ = ["MESH_AXES", "BATCH_AXES", "PARTITION_RULES", "make_mesh", "partition_spec",
           "param_shardings", "per_device_bytes", "MeshStep", "OnMesh", "mesh_step"]
