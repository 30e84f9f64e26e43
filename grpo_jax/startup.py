"""Library start-up noise, silenced before any grpo_jax module imports the libraries
(`grpo_jax/__init__.py` calls `quiet_defaults` first). Standard library only: importing
jax here would fix its platform before `python -m grpo_jax.plan` chooses the CPU.

Every setting is a default: a value the user set wins.
  - TF_ENABLE_ONEDNN_OPTS=0: TensorFlow only writes TensorBoard summaries here, so its
    oneDNN kernels buy nothing; with them on (the default on CPUs with AVX-512/AMX) its
    import prints "oneDNN custom operations are on ..." before its log level is applied.
    JAX (XLA) does not read this variable.
  - TRANSFORMERS_NO_ADVISORY_WARNINGS=1: drops only transformers' advisories, such as
    "PyTorch was not found. Models won't be available ..." (we use its tokenizers, never
    its models); its real warnings and errors still show.
  - On a machine without a TPU (`no_tpu_here`), TPU_HOST_BOUNDS and TPU_WORKER_HOSTNAMES:
    with the `[tpu]` extra installed, JAX's backend search (and `grpo_jax.plan`, for its
    topologies) loads libtpu, which on such a machine fills those in with "WARNING: could
    not determine ..." and prints five lines of errors that look like a crash. Given a
    single host's values it stays silent; where a TPU is present or described, nothing
    is set.
TF's C++ INFO lines are already hidden by jax, which sets TF_CPP_MIN_LOG_LEVEL=1 (if unset)
on import; it is not set here so that `python -m grpo_jax.plan` can set its own.
"""

from __future__ import annotations

import glob
import os

# PCI device ids of TPU chips (vendor 0x1ae0, Google), as jax._src.hardware_utils lists them.
TPU_VENDOR = "0x1ae0"
TPU_PCI_IDS = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
# What a user, a TPU VM or GKE describes its TPU to libtpu with.
TPU_ENV = ("JAX_FORCE_TPU_INIT", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
           "TPU_PROCESS_ADDRESSES", "TPU_HOST_BOUNDS", "TPU_WORKER_ID", "TPU_TOPOLOGY")


def no_tpu_here(environ=os.environ, root: str = "/") -> bool:
  """True on a machine with no TPU chip (no accelerator device node, no TPU on the PCI
  bus) and no TPU asked for in the environment."""
  if any(environ.get(k) for k in TPU_ENV) or "tpu" in environ.get("JAX_PLATFORMS", "").lower():
    return False
  if glob.glob(os.path.join(root, "dev/accel*")) or glob.glob(os.path.join(root,
                                                                          "dev/vfio/[0-9]*")):
    return False
  for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
    try:
      with open(vendor) as f:
        if f.read().strip() != TPU_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as f:
        if f.read().strip() in TPU_PCI_IDS:
          return False
    except OSError:
      continue
  return True


def quiet_defaults(environ=os.environ) -> None:
  """Sets the defaults above in `environ` (the process's environment)."""
  for key, value in (("TF_ENABLE_ONEDNN_OPTS", "0"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
    environ.setdefault(key, value)
  if no_tpu_here(environ):
    environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
