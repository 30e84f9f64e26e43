"""The reference model's sync with the actor (TR-DPO; TRL's `sync_ref_model`).

Every `ref_model_sync_steps` optimizer updates the reference becomes
`alpha * actor + (1 - alpha) * reference` (TRL's SyncRefModelCallback:
`ref = (1 - alpha) * ref + alpha * model`; alpha = 1 copies the actor).

Precision: the reference is kept in the compute dtype (`as_reference`, e.g. bfloat16 when
the actor is stored in float32 and computed in bfloat16). Each sync mixes in float32 from
the stored reference and the actor's stored params, and rounds the result once to the
reference's dtype; so a bfloat16 reference carries one bfloat16 rounding per sync (TRL
mixes in the reference's own dtype, rounding each of its two in-place operations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sync_due(updates_before: int, updates_after: int, every: int) -> bool:
  """Whether the optimizer-update count passed a multiple of `every` in (before, after]:
  a step of num_iterations updates may step over the multiple itself."""
  return updates_after // every > updates_before // every


@functools.partial(jax.jit, donate_argnums=(0,))
def mix_reference(reference, actor, alpha):
  """(1 - alpha) * reference + alpha * actor, leaf by leaf, computed in float32 and
  returned in the reference's dtypes. Jitted on placed arrays, each result keeps its
  input's layout (pmap-replicated or mesh-sharded); the old reference's buffers are
  donated (reused for the result)."""
  alpha = jnp.asarray(alpha, jnp.float32)

  def mix(ref, act):
    mixed = (1.0 - alpha) * ref.astype(jnp.float32) + alpha * act.astype(jnp.float32)
    return mixed.astype(ref.dtype)

  return jax.tree.map(mix, reference, actor)
