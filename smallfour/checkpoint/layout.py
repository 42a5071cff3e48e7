"""What a converted smallfour checkpoint looks like on disk, and its error type.

  <dst>/smallfour_config.json   our TextConfig (softmax-scale mode recorded), dtype, source
  <dst>/params/                 orbax pytree {"embedder": .., "layers": {"0": {..}}, ..}
  <dst>/tekken.json             the tokenizer, when the source ships one

Kept apart from the converter so that restoring imports neither the writer nor the
safetensors reader.
"""

PARAMS_DIR = "params"
TOKENIZER_FILE = "tekken.json"
# A conversion writes under `<dst><STAGING_SUFFIX>/` and renames it to `<dst>` when done.
STAGING_SUFFIX = ".partial"
# Bumped when the stored parameter layout changes; restore refuses other versions.
# 2: MLA `k_up` [H, R, Dn] and `v_up` [H, Dv, R] (head-major; 1 stored them [R, H, ·]).
FORMAT_VERSION = 2
DTYPES = ("bfloat16", "float32", "fp8", "int8", "int4")
# The dtype of the parameters that are not FP8-resident, by stored `param_dtype`: an fp8
# checkpoint keeps the release's e4m3 linears as `<param>/codes` (e4m3) and
# `<param>/scale` (float32, one per tensor or per expert), the rest in bfloat16. An int8
# or int4 one stores its integer linears the same way (`<param>/codes` int8 or int4,
# `<param>/scale` float32 of the codes' rank, nn/quant.py), how it was quantized under
# "quant" in smallfour_config.json, and the rest in bfloat16.
STORED_DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "fp8": "bfloat16",
                 "int8": "bfloat16", "int4": "bfloat16"}


class CheckpointError(ValueError):
  """A checkpoint (source or converted) is missing, malformed or does not match its config."""
