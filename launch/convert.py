"""Converts a released Mistral Small 4 checkpoint into a smallfour (orbax) checkpoint.

  python launch/convert.py --src=/path/Mistral-Small-4-119B-2603 --dst=/path/small4-bf16

The source is an HF directory (config.json + model*.safetensors), a Mistral-native one
(params.json + consolidated*.safetensors) or the hub's, holding both (params.json then
sets the softmax scale); FP8 weights are dequantized, or kept as they are with
--dtype=fp8 (half the bytes; restore them FP8-resident). The destination holds the weights,
our config and tekken.json, and is all `launch/generate.py --ckpt` needs. Host memory
stays about one decoder layer whatever the model size.
"""

import json

from absl import app, flags, logging

from smallfour import logs
from smallfour.checkpoint import convert as convert_lib
from smallfour.checkpoint.assemble import CheckpointError
from smallfour.config import IMAGE_PROCESSORS, SOFTMAX_SCALE_MODES, ConfigError
from smallfour.nn import quant as quant_lib

_SRC = flags.DEFINE_string("src", None, "Released checkpoint directory (HF or native).",
                           required=True)
_DST = flags.DEFINE_string("dst", None, "New directory to write; must not exist.", required=True)
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", convert_lib.DTYPES,
    "Stored dtype. fp8 keeps an FP8 release's e4m3 linears and their scales as they are "
    "(the rest bfloat16), for --weights_dtype=fp8 at generation. int8 / int4 quantize the "
    "routed experts (int8 per output channel, int4 in groups of --group_size inputs) and "
    "attention and shared experts as --dense_dtype; embeddings, norms, router and LM head "
    "stay bfloat16 (smallfour/nn/quant.py).")
_GROUP_SIZE = flags.DEFINE_integer(
    "group_size", quant_lib.DEFAULT_GROUP_SIZE,
    "--dtype=int4: inputs per scale; must divide hidden_size and moe_intermediate_size.")
_DENSE_DTYPE = flags.DEFINE_enum(
    "dense_dtype", "bfloat16", quant_lib.DENSE_DTYPES,
    "--dtype=int8/int4: attention, shared experts and dense MLPs left bfloat16, or int8 "
    "per channel (0.8% fewer bytes, ~50x the KL from bf16 on the tiny fine-tuned model).")
_SOFTMAX_SCALE = flags.DEFINE_enum(
    "softmax_scale", None, SOFTMAX_SCALE_MODES,
    "Override the softmax-scale mode the source implies: params.json's yarn.apply_scale "
    "when the directory has one (plain unless true), else config.json -> hf_mscale_fold.")
_IMAGE_PROCESSOR = flags.DEFINE_enum(
    "image_processor", None, IMAGE_PROCESSORS,
    "Override the image preprocessing the source implies: mistral_common when the "
    "directory has params.json, else transformers (see smallfour/chat/image_processing.py).")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "hf", "native"],
                            "Source tensors; auto prefers HF when a directory holds both.")


def main(argv):
  del argv
  logs.library_logs_at_warning()
  try:
    stats = convert_lib.convert(_SRC.value, _DST.value, dtype=_DTYPE.value,
                                softmax_scale=_SOFTMAX_SCALE.value, kind=_FORMAT.value,
                                image_processor=_IMAGE_PROCESSOR.value,
                                group_size=_GROUP_SIZE.value, dense_dtype=_DENSE_DTYPE.value)
  except (CheckpointError, ConfigError) as e:
    logging.error("conversion failed: %s", e)
    raise SystemExit(f"error: {e}") from None
  stats["source_gb_per_s"] = stats["source_bytes"] / stats["seconds"] / 1e9
  print(json.dumps({"dst": _DST.value, **stats}))


if __name__ == "__main__":
  app.run(main)
