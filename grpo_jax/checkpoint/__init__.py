"""Orbax checkpoints of the actor's train state and the frozen reference (`store`), the
disk's refusals in one line (`disk`), and Orbax's failure noise kept quiet (`orbax_noise`,
installed by the command line)."""

from grpo_jax.checkpoint.disk import WRITE_ERRNOS, write_errno
from grpo_jax.checkpoint.store import (CORRUPT_DIRNAME, Checkpointer,
                                       IncompatibleCheckpointError, Restored, abstract_tree)

__all__ = ["CORRUPT_DIRNAME", "Checkpointer", "IncompatibleCheckpointError", "Restored",
           "WRITE_ERRNOS", "abstract_tree", "write_errno"]
