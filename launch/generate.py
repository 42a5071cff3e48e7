"""Generates tokens from a converted checkpoint or a seeded random preset.

  python launch/generate.py --config=tiny --prompt_ids=1,2,3 --max_new_tokens=16
  python launch/generate.py --ckpt=/data/small4-bf16 --prompt_ids=1,1784,3 --temperature=0.7
  python launch/generate.py --ckpt=/data/small4-bf16 --mesh=data:1,expert:8,tensor:1 ...

Tokens are streamed to the terminal as they are produced; `--output_json` writes
{"token_ids": [...]} (prompt excluded). With several processes (launch/multihost/, or
--coordinator_address/--num_processes/--process_id), every process runs this same
command on its share of the mesh and only process 0 prints and writes.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from smallfour import configs
from smallfour import distributed, sharding
from smallfour.checkpoint import restore
from smallfour.checkpoint.assemble import CheckpointError
from smallfour.config import ConfigError
from smallfour.inference.engine import Engine, RequestError
from smallfour.inference.sampling import Sampling
from smallfour.nn.decoder import Transformer

_CKPT = flags.DEFINE_string("ckpt", None, "A checkpoint written by launch/convert.py.")
_CONFIG = flags.DEFINE_string("config", None, "A preset (random weights, seeded) when no --ckpt.")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Prompt token ids, comma separated.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and weight seed for --config).")
_MAX_LEN = flags.DEFINE_integer("max_len", 4096, "Cache length per sequence (prompt + output).")
_MESH = flags.DEFINE_string("mesh", "data:1,expert:1,tensor:1",
                            "Device mesh axis sizes over all processes' devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs "
                                   "(default: auto-detect SLURM / MPI / TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype; default the checkpoint's stored dtype.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write {'token_ids': [...]} here.")


def _mesh(cfg) -> jax.sharding.Mesh | None:
  """The --mesh over all devices of all processes; None for one device."""
  try:
    sizes = sharding.parse_mesh(_MESH.value)
    mesh = sharding.make_mesh(sizes, cfg)
  except sharding.MeshError as e:
    raise app.UsageError(str(e)) from None
  return None if mesh.size == 1 else mesh


def _load_model() -> tuple[Transformer, jax.sharding.Mesh | None]:
  if (_CKPT.value is None) == (_CONFIG.value is None):
    raise app.UsageError("give exactly one of --ckpt and --config")
  try:
    if _CKPT.value:
      cfg = restore.read_config(_CKPT.value)
      mesh = _mesh(cfg)
      return restore.restore_model(_CKPT.value, mesh=mesh, dtype=_DTYPE.value), mesh
    cfg = configs.resolve(_CONFIG.value)
  except (CheckpointError, ConfigError) as e:
    raise app.UsageError(str(e)) from None
  dtype = jnp.dtype(_DTYPE.value or "float32")
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(_SEED.value), param_dtype=dtype)  # noqa: E731
  mesh = _mesh(cfg)
  return (make() if mesh is None else sharding.init_sharded(make, mesh)), mesh


def main(argv):
  del argv
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except distributed.DistributedError as e:
    raise app.UsageError(str(e)) from None
  leader = distributed.is_leader()
  if not _PROMPT_IDS.value:
    raise app.UsageError("--prompt_ids is required (text and chat input arrive later)")
  try:
    prompt = [int(t) for t in _PROMPT_IDS.value]
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise app.UsageError(f"bad sampling or prompt flag: {e}") from None
  model, mesh = _load_model()
  engine = Engine(model, max_len=_MAX_LEN.value, mesh=mesh)
  start = time.perf_counter()
  generated = []
  try:
    for step in engine.stream([prompt], _MAX_NEW.value, sampling, seed=_SEED.value):
      if step[0] is None:
        break
      generated.append(step[0])
      if leader:
        print(step[0], end=" ", flush=True)
  except RequestError as e:
    raise app.UsageError(str(e)) from None
  seconds = time.perf_counter() - start
  if not leader:
    return
  where = f"mesh {dict(mesh.shape)}" if mesh is not None else "1 device"
  print(f"\n[{len(generated)} tokens in {seconds:.2f} s incl. compilation, "
        f"backend {jax.default_backend()}, {where}, {jax.process_count()} process(es)]",
        file=sys.stderr)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({"token_ids": generated, "prompt_ids": prompt}, f)


if __name__ == "__main__":
  app.run(main)
