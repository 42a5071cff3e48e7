"""Generates tokens from a converted checkpoint or a seeded random preset.

  python launch/generate.py --config=tiny --prompt_ids=1,2,3 --max_new_tokens=16
  python launch/generate.py --ckpt=/data/small4-bf16 --prompt_ids=1,1784,3 --temperature=0.7

Tokens are streamed to the terminal as they are produced; `--output_json` writes
{"token_ids": [...]} (prompt excluded).
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import configs
from smallfour import sharding
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
_MESH = flags.DEFINE_string("mesh", "data:1,expert:1,tensor:1", "Device mesh axis sizes.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype; default the checkpoint's stored dtype.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write {'token_ids': [...]} here.")


def _parse_mesh(spec: str) -> dict[str, int]:
  try:
    sizes = sharding.parse_mesh(spec)
  except sharding.MeshError as e:
    raise app.UsageError(str(e)) from None
  if sizes["data"] * sizes["expert"] * sizes["tensor"] != 1:
    raise app.UsageError(f"--mesh={spec!r}: only a single-device mesh is supported so far")
  return sizes


def _load_model() -> Transformer:
  if (_CKPT.value is None) == (_CONFIG.value is None):
    raise app.UsageError("give exactly one of --ckpt and --config")
  try:
    if _CKPT.value:
      return restore.restore_model(_CKPT.value, dtype=_DTYPE.value)
    cfg = configs.resolve(_CONFIG.value)
  except (CheckpointError, ConfigError) as e:
    raise app.UsageError(str(e)) from None
  dtype = jnp.dtype(_DTYPE.value or "float32")
  return Transformer(cfg, rngs=nnx.Rngs(_SEED.value), param_dtype=dtype)


def main(argv):
  del argv
  _parse_mesh(_MESH.value)
  if not _PROMPT_IDS.value:
    raise app.UsageError("--prompt_ids is required (text and chat input arrive later)")
  try:
    prompt = [int(t) for t in _PROMPT_IDS.value]
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise app.UsageError(f"bad sampling or prompt flag: {e}") from None
  model = _load_model()
  engine = Engine(model, max_len=_MAX_LEN.value)
  start = time.perf_counter()
  generated = []
  try:
    for step in engine.stream([prompt], _MAX_NEW.value, sampling, seed=_SEED.value):
      if step[0] is None:
        break
      generated.append(step[0])
      print(step[0], end=" ", flush=True)
  except RequestError as e:
    raise app.UsageError(str(e)) from None
  seconds = time.perf_counter() - start
  print(f"\n[{len(generated)} tokens in {seconds:.2f} s incl. compilation, "
        f"backend {jax.default_backend()}]", file=sys.stderr)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({"token_ids": generated, "prompt_ids": prompt}, f)


if __name__ == "__main__":
  app.run(main)
