"""Fine-tunes a converted checkpoint or a seeded random preset on chat data (SFT).

  python launch/train.py --config=tiny --data=launch/examples/train_tiny.jsonl \
      --steps=60 --batch_size=4 --max_seq_len=128 --learning_rate=3e-3 --out=/tmp/run
  python launch/train.py --ckpt=/data/small4-bf16 --data=chats.jsonl --lora_rank=16 \
      --steps=1000 --mesh=data:1,expert:8,tensor:1 --out=/data/run --metrics=/data/run.jsonl
  python launch/generate.py --ckpt=/tmp/run --prompt="..."  # the merged result

Each line of --data is a request object ({"messages": [...], "tools"?, "reasoning_effort"?})
ending with the assistant turn it teaches; only assistant tokens are trained on (the mask
comes from mistral-common's encoding, smallfour.chat). Rerunning the same command with a
larger --steps resumes from the latest checkpoint in --out. After the last step --out
also holds the merged model as a regular checkpoint, with its tekken.json (--noexport
skips it; the same command run again later trains nothing and exports).
"""

import json
import os
import sys

import jax
from absl import app, flags

from smallfour import loading, logs
from smallfour.chat import ChatTokenizer
from smallfour.config import TextConfig
from smallfour.nn.decoder import Transformer
from smallfour.train import data, loop
from smallfour.train.lora import TARGETS, LoraConfig
from smallfour.train.optimizer import OptimizerConfig
from smallfour.train.step import StepConfig

_CKPT = flags.DEFINE_string("ckpt", None, "A checkpoint written by launch/convert.py.")
_CONFIG = flags.DEFINE_string("config", None, "A preset (random weights, seeded) when no --ckpt.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "A tekken.json (default: the checkpoint's, or the built-in "
                                 "one for a preset).")
_DATA = flags.DEFINE_string("data", None, "JSONL, one chat request per line.", required=True)
_OUT = flags.DEFINE_string("out", None, "Run directory: checkpoints, then the merged model.",
                           required=True)
_STEPS = flags.DEFINE_integer("steps", None, "Train until this many steps are done.",
                              required=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 1024,
                                    "Positions per sequence; longer examples are cut.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate (AdamW).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.")
_DECAY = flags.DEFINE_integer("decay_steps", 1000,
                              "Cosine decay to 10% after warmup; constant after. Independent "
                              "of --steps, so a resumed run follows the same schedule.")
_SEED = flags.DEFINE_integer("seed", 0, "Data order, adapters (and preset weights).")
_MESH = flags.DEFINE_string("mesh", "data:1,expert:1,tensor:1", "Device mesh axis sizes.")
_METRICS = flags.DEFINE_string("metrics", None,
                               "Write one JSON line per step here (step, loss, aux_loss, "
                               "grad_norm, learning_rate, tokens, tokens_per_s, padding, "
                               "expert_fractions).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Parameter and compute dtype (default: the checkpoint's; float32 "
                           "for a preset).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA rank; 0 trains without adapters.")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", ["attn"],
                                  f"Where adapters go: {', '.join(TARGETS)}.")
_TRAINABLE = flags.DEFINE_string(
    "trainable", None, "What is trained: `all`, `lora`, and/or regular expressions over "
    "parameter paths like layers/3/attn/q_a_proj, comma separated (default: lora with "
    "--lora_rank, else all).")
_AUX = flags.DEFINE_float("aux_loss_coef", 0.0,
                          "Weight of the MoE load-balancing loss (always logged).")
_BAD_LINES = flags.DEFINE_enum("bad_lines", "refuse", data.ON_BAD_LINE,
                               "A malformed --data line stops the run, or is skipped with a "
                               "warning.")
_EXPORT = flags.DEFINE_bool("export", True,
                            "After the last step, write the merged model into --out as a "
                            "regular checkpoint (rerun the same command to export later).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 100,
                                         "Save a checkpoint every this many steps (and at "
                                         "the last).")


def _mesh(cfg: TextConfig) -> jax.sharding.Mesh | None:
  try:
    return loading.mesh(cfg, _MESH.value)
  except loading.LoadError as e:
    raise app.UsageError(str(e)) from None


def _model(cfg: TextConfig) -> Transformer:
  try:
    return loading.model(cfg, ckpt=_CKPT.value, mesh_spec=_MESH.value, dtype=_DTYPE.value,
                         seed=_SEED.value)[0]
  except loading.LoadError as e:
    loading.fail(str(e))


def _base() -> dict:
  """What the model is built from, as run.json and the exported checkpoint record it."""
  if _CKPT.value:
    return {"ckpt": os.path.abspath(_CKPT.value), "dtype": _DTYPE.value}
  return {"config": _CONFIG.value, "seed": _SEED.value, "dtype": _DTYPE.value or "float32"}


def _tokenizer(cfg: TextConfig) -> ChatTokenizer:
  try:
    return loading.tokenizer(cfg, ckpt=_CKPT.value, config=_CONFIG.value, path=_TOKENIZER.value)
  except loading.LoadError as e:
    loading.fail(str(e))


def main(argv):
  del argv
  logs.library_logs_at_warning()  # orbax logs every save at INFO
  cfg = loading.config_from_flags(_CKPT.value, _CONFIG.value)
  tok = _tokenizer(cfg)
  lora = LoraConfig(_LORA_RANK.value, tuple(_LORA_TARGETS.value)) if _LORA_RANK.value else None
  run = loop.RunConfig(
      data=_DATA.value, out=_OUT.value, steps=_STEPS.value, batch_size=_BATCH_SIZE.value,
      max_seq_len=_MAX_SEQ_LEN.value, seed=_SEED.value,
      optimizer=OptimizerConfig(learning_rate=_LEARNING_RATE.value,
                                warmup_steps=_WARMUP.value, decay_steps=_DECAY.value),
      step=StepConfig(aux_loss_coef=_AUX.value), lora=lora, trainable=_TRAINABLE.value,
      on_bad_line=_BAD_LINES.value, checkpoint_every=_CHECKPOINT_EVERY.value,
      metrics=_METRICS.value, export=_EXPORT.value)
  mesh = _mesh(cfg)
  try:
    history = loop.train(lambda: _model(cfg), cfg, tok, run, mesh=mesh, base=_base(),
                         log=lambda m: print(m, file=sys.stderr))
  except (data.DataError, loop.RunError) as e:
    loading.fail(str(e))
  if history:
    first, last = history[0], history[-1]
    speed = sum(r["tokens_per_s"] for r in history[1:]) / max(len(history) - 1, 1)
    print(json.dumps({"steps": last["step"], "first_loss": first["loss"],
                      "last_loss": last["loss"], "tokens_per_s": round(speed, 1)}))


if __name__ == "__main__":
  app.run(main)
