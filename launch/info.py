"""Prints a model's parameter counts, or a serving plan, as JSON, without allocating it.

  python launch/info.py --config=small4_119b
  python launch/info.py --config=/path/to/checkpoint_or_config_dir
  python launch/info.py --config=small4_119b --plan --target=v6e:2x4 --weights_dtype=fp8
  python launch/info.py --config=small4_119b --plan --target=h100 --mesh=data:1,expert:4,tensor:1

`--plan`: does the config fit the target, with how much room, how many tokens of context
the page pool could hold beside the weights, and how fast could its decode and prefill
steps go. The pool (`--cache_tokens`, default batch × max_len, in pages of `--page_size`)
is held whole by every device; prefill is compiled for one prompt chunk of
`--max_num_batched_tokens` (the serving engine's flags of those names). A TPU topology
(v5p:2x2x2, v6e:2x4, tpu7x:2x2x1, ...) is compiled for with libtpu
(`pip install -e ".[tpu]"`; no TPU needed, minutes per step for the 119B; `--noprobe`
halves it); a GPU (h100, h200, b200) is counted from shapes. See smallfour/plan/.
"""

import json

from absl import app, flags

from smallfour import configs, logs, sharding, summary
from smallfour.config import ConfigError
from smallfour.nn import quant
from smallfour.nn.quant import WEIGHTS_DTYPES

_CONFIG = flags.DEFINE_string(
    "config", "tiny", "A preset name or a directory with smallfour_config.json, an HF "
    "config.json or a native params.json.")
_PLAN = flags.DEFINE_bool("plan", False, "Print a serving plan instead of the counts.")
_TARGET = flags.DEFINE_string("target", "v5p:2x2x2",
                              "TPU topology (e.g. v6e:2x4) or GPU (h100, h200, b200).")
_MESH = flags.DEFINE_string("mesh", None, "data:D,expert:E,tensor:T (default: every device "
                            "on expert; for a GPU this also says how many).")
_WEIGHTS_DTYPE = flags.DEFINE_enum("weights_dtype", "bfloat16", WEIGHTS_DTYPES,
                                   "Weights in device memory: bf16, the release's FP8, or "
                                   "int8 / int4 (smallfour/nn/quant.py).")
_GROUP_SIZE = flags.DEFINE_integer("group_size", quant.DEFAULT_GROUP_SIZE,
                                   "int4: inputs per scale (the converter's --group_size).")
_DENSE_DTYPE = flags.DEFINE_enum("dense_dtype", "bfloat16", quant.DENSE_DTYPES,
                                 "int8/int4: attention and shared experts (the converter's).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together (the engine's "
                              "--max_batch).")
_MAX_LEN = flags.DEFINE_integer("max_len", 32768, "Tokens one sequence holds: the decode "
                                "step's window.")
_PREFILL_LEN = flags.DEFINE_integer("prefill_len", None, "Prompt tokens (default max_len): "
                                    "the window of the prompt chunk compiled.")
_CACHE_TOKENS = flags.DEFINE_integer("cache_tokens", None, "Tokens the page pool holds, all "
                                     "sequences together (default batch × max_len).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page of the pool (a power "
                                  "of two).")
_MAX_NUM_BATCHED_TOKENS = flags.DEFINE_integer("max_num_batched_tokens", 512,
                                               "A step's token budget: the prompt chunk "
                                               "compiled for prefill.")
_PROBE = flags.DEFINE_bool("probe", True, "TPU: compile the steps again over half the "
                           "pool, to measure what a cached token costs each.")
_JSON = flags.DEFINE_string("json", None, "Also write the JSON here.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Write each compiled step's HLO here.")


def main(argv):
  del argv
  logs.library_logs_at_warning()  # jax's libtpu probe logs at INFO: --verbosity=0 shows it
  try:
    cfg = configs.resolve(_CONFIG.value)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  if _PLAN.value:
    from smallfour.plan import hardware, report as plan  # noqa: PLC0415 (loads libtpu)
    try:
      mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
      out = plan.make_plan(cfg, _TARGET.value, mesh=mesh, weights_dtype=_WEIGHTS_DTYPE.value,
                           batch=_BATCH.value, max_len=_MAX_LEN.value,
                           prefill_len=_PREFILL_LEN.value, cache_tokens=_CACHE_TOKENS.value,
                           page_size=_PAGE_SIZE.value,
                           max_num_batched_tokens=_MAX_NUM_BATCHED_TOKENS.value,
                           probe=_PROBE.value, hlo_dir=_HLO_DIR.value,
                           group_size=_GROUP_SIZE.value, dense_dtype=_DENSE_DTYPE.value)
    except (sharding.MeshError, hardware.TargetError, quant.QuantError,
            plan.SizeError) as e:
      raise app.UsageError(str(e)) from None
    out = {"config": _CONFIG.value, **out}
  else:
    counts = summary.param_counts(cfg)
    out = {"config": _CONFIG.value, **counts, "bytes_bfloat16": 2 * counts["total_params"],
           "text_config": cfg.to_dict()}
  print(json.dumps(out, indent=2))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
