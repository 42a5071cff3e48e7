"""Quiets libtpu on hosts without TPUs (imported with smallfour, before any device is used).

jax loads libtpu, when installed (the `tpu` and `test` extras: plans compile for TPUs
that are not here), at every start and on every host. On a host without TPU chips it
has nothing to drive, but it still asks for a TPU VM's accelerator type and worker
hostnames, finds neither and prints warnings, before jax goes on to the GPU or CPU it
would have used anyway. Setting both (only where jax's own PCI scan finds no TPU chip,
and only if unset) silences that and changes nothing else: jax picks the same backend,
and programs compiled for abstract TPUs are identical whatever the values. libtpu also
takes a host-wide lock (`/tmp/libtpu_lockfile`) that guards the chips; without chips it
guards nothing but would stop a second process (two plans, a test beside a plan), so
there it is allowed to load more than once. On a TPU host nothing is touched. Not
`JAX_PLATFORMS=cpu`: that would also hide a host's GPUs.
"""

from __future__ import annotations

import os

# jax's own PCI scan for TPU chips, private: jax has no public way to ask before a backend
# starts (jax.devices() would start libtpu, the thing to quiet). If a jax release moves it,
# nothing is touched here (libtpu only warns again) and tests/test_platforms.py fails,
# naming the symbol.
TPU_SCAN = "jax._src.hardware_utils.num_available_tpu_chips_and_device_id"
try:
  from jax._src.hardware_utils import num_available_tpu_chips_and_device_id as _tpu_scan
except ImportError:
  _tpu_scan = None


def quiet_libtpu_without_tpus(environ=os.environ) -> None:
  if _tpu_scan is None or _tpu_scan()[0]:
    return
  environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
