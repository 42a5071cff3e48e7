"""Multi-process start-up: one process per host (or per GPU), all driving one global mesh.

`initialize` starts `jax.distributed` from explicit arguments, or lets jax auto-detect
the cluster (SLURM, Open MPI, Cloud TPU pods) when the environment says this process is
one of several; a lone process on a workstation starts nothing. Only process 0 should
print or write files (`is_leader`).
"""

from __future__ import annotations

import os

import jax


class DistributedError(ValueError):
  """Inconsistent multi-process settings."""


def cluster_detected(environ=os.environ) -> str | None:
  """The name of the multi-process launcher this process runs under, if any."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1"))) > 1:
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu_pod"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ=os.environ) -> str:
  """Starts `jax.distributed` if this is one of several processes; returns how.

  Call before anything touches a jax device. Explicit arguments win (all three are
  needed); otherwise a detected cluster is initialised by jax itself. Returns
  "explicit", the detected cluster's name, or "single" when nothing was started.
  """
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise DistributedError("multi-process runs need all of --coordinator_address, "
                           "--num_processes and --process_id (or none, to auto-detect)")
  how = "explicit" if all(given) else cluster_detected(environ)
  if how is None:
    return "single"
  if all(given) and not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id={process_id} is outside [0, {num_processes})")
  # CPU processes need a collectives backend to talk to each other (GPU/TPU ignore it).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if how == "explicit":
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return how


def is_leader() -> bool:
  """True on the one process that prints and writes (process 0)."""
  return jax.process_index() == 0
