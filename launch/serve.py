"""An OpenAI-compatible chat server with continuous batching.

  python launch/serve.py --config=tiny --max_len=1024
  python launch/serve.py --ckpt=/data/small4-bf16 --mesh=data:1,expert:8,tensor:1 \
      --max_batch=16 --max_len=32768 --port=8000

Then any OpenAI client talks to it:

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model="small4", reasoning_effort="high",
                                 messages=[{"role": "user", "content": "What is 17 * 23?"}])

Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health, GET
/metrics (Prometheus). Requests are encoded by mistral-common (smallfour.chat):
reasoning_effort none|high, tools, tool results; answers are split on token ids into
reasoning_content, content and tool_calls. `--max_batch` sequences decode together over a
paged latent cache of `--cache_tokens` tokens in pages of `--page_size`, each step feeding
at most `--max_num_batched_tokens` (decode tokens, then prompt chunks); prompts that start
alike share their cached pages (`--noprefix_caching` turns that off). Up to `--max_queue`
more requests wait (then 429). If the engine thread fails, the server shuts down and this
exits with an error. One process: the mesh spans this process's devices.
"""

import logging
import os

from absl import app, flags

from smallfour import loading, logs
from smallfour.inference.engine import Engine, EngineFailed
from smallfour.serve.server import Server

_CKPT = flags.DEFINE_string("ckpt", None, "A checkpoint written by launch/convert.py.")
_CONFIG = flags.DEFINE_string("config", None, "A preset (random weights, seeded) when no --ckpt.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tekken.json (overrides the default).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MESH = flags.DEFINE_string("mesh", "data:1,expert:1,tensor:1", "Device mesh axis sizes.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Sequences decoded together (slots).")
_MAX_LEN = flags.DEFINE_integer("max_len", 4096,
                                "Tokens one sequence may hold: prompt plus answer (the "
                                "context).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64,
                                  "Requests that may wait for a slot; more get a 429.")
_ENGINE = loading.define_engine_flags()
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype; default the checkpoint's stored dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Weight seed for --config.")
_WEIGHTS = loading.define_weights_flags()
_MODEL_NAME = flags.DEFINE_string("model_name", None,
                                  "The name /v1/models lists (default from --ckpt/--config).")
_WARMUP = flags.DEFINE_bool("warmup", True,
                            "Compile the decode step and prompt chunk shapes before serving.")


def main(argv):
  del argv
  logs.library_logs_at_warning()
  for flag in (_MAX_BATCH, _MAX_LEN, _MAX_QUEUE):
    if flag.value < (0 if flag is _MAX_QUEUE else 1):
      raise app.UsageError(f"--{flag.name} must be positive, got {flag.value}")
  cfg = loading.config_from_flags(_CKPT.value, _CONFIG.value)
  try:
    tok = loading.tokenizer(cfg, ckpt=_CKPT.value, config=_CONFIG.value, path=_TOKENIZER.value)
    model, mesh = loading.model(cfg, ckpt=_CKPT.value, mesh_spec=_MESH.value,
                                dtype=_DTYPE.value, seed=_SEED.value, **_WEIGHTS.values())
  except loading.LoadError as e:
    loading.fail(str(e))
  engine = Engine(model, max_batch=_MAX_BATCH.value, max_len=_MAX_LEN.value,
                  max_queue=_MAX_QUEUE.value, eos_id=tok.eos_id, mesh=mesh, **_ENGINE.values())
  if _WARMUP.value:
    logging.getLogger("smallfour.serve").info("compiled %s", engine.warmup())
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_CKPT.value or _CONFIG.value))
  try:
    Server(engine, tok, name, host=_HOST.value, port=_PORT.value).run()
  except EngineFailed as e:
    loading.fail(str(e))


if __name__ == "__main__":
  app.run(main)
