"""Multi-process start-up: what is detected, and what is refused before jax starts."""

import pytest

from smallfour import distributed


@pytest.mark.parametrize("environ, want", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, None),  # one task: a plain process
    ({"SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_NPROCS": "4"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, "mpi"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, "tpu_pod"),
])
def test_cluster_detection(environ, want):
  assert distributed.cluster_detected(environ) == want


def test_single_process_starts_nothing():
  assert distributed.initialize(environ={}) == "single"


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2), "need all of --coordinator_address"),
    (dict(coordinator_address="h:1", process_id=0), "need all of --coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"--process_id=2 is outside \[0, 2\)"),
])
def test_inconsistent_flags_are_refused(kwargs, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.initialize(environ={}, **kwargs)
