"""TPU slices by the names gcloud uses (v4-32, v5litepod-16, v5p-8, v6e-8, or v5e:4x4), the
chips' published figures, and the slice's devices from libtpu (no TPU needed).

Per chip, from Google Cloud's TPU pages: HBM, bf16 peak, HBM bandwidth, and ICI bandwidth
(all links, both directions). v4 and v5p run one device per chip (megacore); their gcloud
names count TensorCores (two per chip), v5e and v6e names count chips.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from grpo_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # "v4", "v5e", "v5p", "v6e"
  hbm_bytes: int
  bf16_flops: float  # peak, per chip
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, all links of one chip
  cores_per_chip: int  # TensorCores counted by the gcloud name
  torus_dims: int  # 3: v4 / v5p cubes, 2: v5e / v6e


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 2400e9 / 8, 2, 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8, 1, 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 2, 3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given
  chip: Chip
  shape: tuple[int, ...]  # chips along the torus axes

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  def memory_limit(self, limit_gib: float = 0.0) -> int:
    """Bytes per chip a plan may fill: `limit_gib` (config.memory_limit_gib), else HBM."""
    return int(limit_gib * GiB) or self.chip.hbm_bytes

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  def devices(self):
    """The slice's devices (one per chip), from libtpu; raises UserError without it."""
    # Compiling touches no TPU: let several planning processes load libtpu at once (its
    # lockfile otherwise refuses every process but the first).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      from jax.experimental import topologies
      kwargs = {"chip_config_name": "megacore"} if self.chip.cores_per_chip == 2 else {}
      if self.num_chips == 1:  # libtpu refuses 1x1 unless the host holds just that chip
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
      return topologies.get_topology_desc(topology_name=self.libtpu_name, platform="tpu",
                                          **kwargs).devices
    except Exception as e:  # no libtpu: jax raises RuntimeError / ImportError / ValueError
      if "libtpu" in str(e).lower() or isinstance(e, ImportError) or "tpu" in str(e).lower():
        raise UserError(
            f"cannot compile for {self.name}: libtpu is not installed (pip install -e "
            "\".[tpu]\", or pip install \"jax[tpu]\" for this jax version); it runs on a CPU "
            f"machine, no TPU needed ({' '.join(str(e).split())[:160]})") from None
      raise


_SHAPES = {  # gcloud's slice shapes by chip count
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
        256: (16, 16)},
    3: {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
        128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)},
}


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  if chips not in _SHAPES[dims]:
    raise UserError(f"{chips} chips: supported slices have {', '.join(map(str, _SHAPES[dims]))}"
                    " chips (or give the shape, e.g. v5e:2x4)")
  return _SHAPES[dims][chips]


def parse(name: str) -> Slice:
  """'v5e-8', 'v5litepod-16', 'v4-32', 'v5p-8', 'v6e-8', or libtpu's 'v5e:2x4'."""
  text = name.strip().lower()
  m = re.fullmatch(r"(v\d+[a-z]*)[:](\d+(?:x\d+)+)", text)
  if m:
    generation = _ALIASES.get(m.group(1), m.group(1))
    if generation not in CHIPS:
      raise UserError(f"--topology={name!r}: unknown TPU generation; known: "
                      f"{', '.join(CHIPS)}")
    return Slice(name, CHIPS[generation], tuple(int(x) for x in m.group(2).split("x")))
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
  if not m or _ALIASES.get(m.group(1), m.group(1)) not in CHIPS:
    raise UserError(f"--topology={name!r}; allowed: gcloud accelerator types such as v4-32, "
                    "v5litepod-16 (or v5e-16), v5p-8, v6e-8, or libtpu's v5e:2x4")
  chip = CHIPS[_ALIASES.get(m.group(1), m.group(1))]
  cores = int(m.group(2))
  if cores % chip.cores_per_chip:
    raise UserError(f"--topology={name!r}: {chip.generation} counts {chip.cores_per_chip} "
                    "TensorCores per chip; give an even number")
  return Slice(name, chip, _torus(cores // chip.cores_per_chip, chip.torus_dims))
