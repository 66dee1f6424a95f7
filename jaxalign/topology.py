"""Named accelerator topologies for the compile plan: a Cloud TPU name -> the devices of that slice (compiled
for with libtpu on any machine, no TPU attached) and its chip's HBM and peak matmul rate.

Cloud TPU names count TensorCores for v4 and v5p (two per chip: v5p-128 is 64 chips, 4x4x4) and chips for
v5e and v6e (v5litepod-16 is 16 chips, 4x4); `--num_slices` multiplies the slice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int  # Per chip.
  peak_flops: float  # bf16 dense matmul FLOP/s per chip.
  cores_per_chip: int  # How the Cloud TPU name counts: TensorCores (v4, v5p) or chips (v5e, v6e).
  dims: int  # Torus dimensions of the slice shape.


CHIPS = {
    "v4": Chip("v4", 32 << 30, 275e12, 2, 3),
    "v5e": Chip("v5e", 16 << 30, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 << 30, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 << 30, 918e12, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # As given, e.g. "v5p-128".
  chip: Chip
  shape: tuple[int, ...]  # Chips per torus dimension of one slice.
  num_slices: int

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Which torus dimensions have wraparound links, as Cloud TPU builds the slice: v4 / v5p slices whose
    every dimension is a multiple of 4 (4x4x4 and up) are full tori, smaller ones meshes; v5e / v6e have
    wraparound only as a full 16x16 pod. It matters for the compile: without the wrap libtpu lowers each FSDP
    weight all-gather on a 4x4x4 slice as zeros + dynamic-update-slice + all-reduce (40 ms of the Llama-3-8B
    SFT 4k step on v5p-128; MaxText describes the wrap the same way)."""
    if self.chip.dims == 3:
      full = all(d % 4 == 0 for d in self.shape)
      return (full, full, full)
    return (True, True, False) if tuple(self.shape) == (16, 16) else (False, False, False)

  def devices(self) -> list:
    """The slice's devices, from libtpu's topology description (no TPU needed)."""
    from jax.experimental import topologies
    # Compiling claims no TPU: let two plans (or a plan beside a test) load libtpu at once instead of failing
    # on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    shape = "x".join(map(str, self.shape))
    try:
      desc = topologies.get_topology_desc(topology_name=f"{self.chip.name}:{shape}", platform="tpu",
                                          num_slices=self.num_slices, wrap=self.wrap)
    except Exception as e:  # libtpu missing, or a shape libtpu does not know.
      raise ValueError(f"--topology={self.name}: could not describe {self.chip.name}:{shape} x {self.num_slices} "
                       f"slice(s) ({e}); TPU compiles need libtpu: pip install 'jax[tpu]=={jax.__version__}'") from e
    return list(desc.devices)


def parse(name: str, num_slices: int = 1) -> Topology:
  """'v5p-128', 'v5e-16', 'v5litepod-16', 'v6e-256', 'v4-8' -> a Topology (an error names the known forms)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite)-(\d+)", name.strip().lower())
  if not m:
    raise ValueError(f"--topology={name!r}: expected a Cloud TPU name such as v4-8, v5e-16 (or v5litepod-16), "
                     "v5p-128 or v6e-64")
  chip = CHIPS[ALIASES.get(m.group(1), m.group(1))]
  n = int(m.group(2))
  if n % chip.cores_per_chip:
    raise ValueError(f"--topology={name}: {chip.name}-N counts TensorCores, {chip.cores_per_chip} per chip; "
                     f"N={n} is not a whole number of chips")
  return Topology(name, chip, _shape(n // chip.cores_per_chip, chip.dims, name), max(1, int(num_slices)))


def _shape(chips: int, dims: int, name: str) -> tuple[int, ...]:
  """The slice shape Cloud TPU uses for `chips` chips: as cubic (3-D) or square (2-D) as powers of two allow."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology={name}: {chips} chips is not a power of two")
  shape = [1] * dims
  if dims == 3 and chips >= 4:  # 3-D tori start at 2x2x1 (4 chips).
    shape = [2, 2, 1]
    chips //= 4
  elif dims == 3:
    shape = [chips, 1, 1]
    chips = 1
  while chips > 1:  # Double the smallest dimension, last first, as the Cloud slice shapes do.
    j = min(range(dims), key=lambda k: (shape[k], -k if dims == 3 else k))
    shape[j] *= 2
    chips //= 2
  return tuple(sorted(shape) if dims == 2 else shape)
