"""The accelerators a plan can target: TPU topologies (compiled for) and GPUs (on paper).

A TPU target is a topology name as libtpu resolves it (`v5p:2x2x2`: 8 chips); its
devices come from `jax.experimental.topologies` and exist only abstractly, so a program
can be compiled for them on a machine without TPUs. GPUs have no compiler here: their
figures are arithmetic.

Per-device figures: HBM is what XLA:TPU reports as available to a program (read from its
out-of-memory message on a program too large for each kind); GPU HBM is the device
total as nvidia-smi reports it. Bandwidth and bf16 peak are the vendors' per-chip
figures, divided among the devices a chip shows as (v4 and TPU7x chips are two devices
each in these topologies).
"""

from __future__ import annotations

import dataclasses

from jax.experimental import topologies

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One kind of accelerator chip."""

  name: str
  hbm_bytes: float  # per device (see module docstring)
  bandwidth: float  # HBM bytes/s per chip
  bf16_flops: float  # dense peak per chip


# Keyed by `device.device_kind` of libtpu's abstract devices.
TPU_CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("TPU v4", 15.25 * GIB, 1.228e12, 275e12),
    "TPU v5 lite": Chip("TPU v5e", 15.75 * GIB, 0.819e12, 197e12),
    "TPU v5": Chip("TPU v5p", 95.74 * GIB, 2.765e12, 459e12),
    "TPU v6 lite": Chip("TPU v6e", 31.25 * GIB, 1.64e12, 918e12),
    "TPU7x": Chip("TPU7x", 94.75 * GIB, 7.37e12, 2307e12),
}

GPU_CHIPS: dict[str, Chip] = {
    "h100": Chip("H100 SXM 80GB", 81559 * 2**20, 3.35e12, 989e12),
    "h200": Chip("H200 141GB", 143771 * 2**20, 4.8e12, 989e12),
    "b200": Chip("B200 180GB", 183359 * 2**20, 8.0e12, 2250e12),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """What a plan is for: `devices` (abstract TPU devices, None for a GPU) or `count`."""

  name: str
  chip: Chip
  count: int  # devices
  devices_per_chip: int
  devices: tuple | None  # libtpu's abstract devices; None: arithmetic only

  @property
  def compiled(self) -> bool:
    return self.devices is not None

  @property
  def bandwidth(self) -> float:
    """HBM bytes/s of one device."""
    return self.chip.bandwidth / self.devices_per_chip

  @property
  def flops(self) -> float:
    """Peak bf16 FLOP/s of one device."""
    return self.chip.bf16_flops / self.devices_per_chip


class TargetError(ValueError):
  """A target name that is neither a known GPU nor a TPU topology libtpu resolves."""


def resolve(name: str, gpus: int | None = None) -> Target:
  """`h100` / `h200` / `b200` (with `gpus` devices) or a TPU topology like `v6e:2x4`."""
  if name.lower() in GPU_CHIPS:
    if not gpus:
      raise TargetError(f"--target={name}: say how many GPUs (the mesh's size)")
    return Target(name.lower(), GPU_CHIPS[name.lower()], gpus, 1, None)
  try:
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # libtpu's errors for unknown names are plain RuntimeErrors
    raise TargetError(f"--target={name!r} is neither a GPU ({', '.join(GPU_CHIPS)}) nor a "
                      f"TPU topology libtpu resolves (e.g. v5p:2x2x2, v6e:2x4): {e}") from None
  devices = tuple(topology.devices)
  kind = devices[0].device_kind
  if kind not in TPU_CHIPS:
    raise TargetError(f"--target={name}: no figures for {kind!r} (known: {sorted(TPU_CHIPS)})")
  per_chip = 1 + max(int(getattr(d, "core_on_chip", 0)) for d in devices)
  return Target(name, TPU_CHIPS[kind], len(devices), per_chip, devices)

