"""A model and its tokenizer from a converted checkpoint or a preset, for the launchers.

    cfg = loading.config(ckpt="/data/small4-bf16")    # or config="tiny" / a directory
    model, mesh = loading.model(cfg, ckpt=..., mesh_spec="data:1,expert:8,tensor:1")
    tok = loading.tokenizer(cfg, ckpt=...)            # --tokenizer, the checkpoint's, built-in

Every input fault (a checkpoint that is not one, a mesh that does not fit, a tokenizer file
that is missing or does not fit the model) is a `LoadError` whose message fits on one line;
a launcher ends with it through `fail` ("error: ...", no usage text).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NoReturn

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from smallfour import configs, sharding
from smallfour.chat import ChatTokenizer, TokenizerFileError
from smallfour.checkpoint import restore
from smallfour.checkpoint.layout import CheckpointError
from smallfour.config import ConfigError, TextConfig
from smallfour.nn import quant as quant_lib
from smallfour.nn.decoder import Transformer


class LoadError(ValueError):
  """A checkpoint, preset, mesh or tokenizer that cannot be used; the message says why."""


def fail(message: str) -> NoReturn:
  """A launcher's input (checkpoint, tokenizer, request) is wrong: exits with one line,
  without the usage text that `app.UsageError` prints."""
  raise SystemExit(f"error: {message}")


def config(*, ckpt: str | None = None, config: str | None = None) -> TextConfig:
  """The model config of exactly one of a checkpoint and a preset (name or directory).

  Giving both or neither is a usage error (`app.UsageError`: a launcher shows its flags).
  """
  if (ckpt is None) == (config is None):
    raise app.UsageError("give exactly one of --ckpt and --config")
  try:
    return restore.read_config(ckpt) if ckpt else configs.resolve(config)
  except (CheckpointError, ConfigError) as e:
    raise LoadError(str(e)) from None


def config_from_flags(ckpt: str | None, preset: str | None) -> TextConfig:
  """`config` for a launcher's --ckpt and --config values; `fail`s on a LoadError."""
  try:
    return config(ckpt=ckpt, config=preset)
  except LoadError as e:
    fail(str(e))


def mesh(cfg: TextConfig, spec: str) -> jax.sharding.Mesh | None:
  """The mesh "data:D,expert:E,tensor:T" over all devices; None for a single device."""
  try:
    built = sharding.make_mesh(sharding.parse_mesh(spec), cfg)
  except sharding.MeshError as e:
    raise LoadError(str(e)) from None
  return None if built.size == 1 else built


def model(cfg: TextConfig, *, ckpt: str | None = None, mesh_spec: str = "data:1,expert:1,tensor:1",
          dtype: str | None = None, seed: int = 0, weights_dtype: str | None = None,
          group_size: int | None = None, dense_dtype: str | None = None
          ) -> tuple[Transformer, jax.sharding.Mesh | None]:
  """The checkpoint's weights, or seeded random ones for a preset (float32 by default),
  placed on the mesh by the rule table.

  weights_dtype: how weights are held (`restore.restore_model`); for a preset, "fp8",
  "int8" and "int4" quantize the random weights at init (int: `group_size`, default 128,
  and `dense_dtype`, default bfloat16, as the converter's flags).
  """
  placed = mesh(cfg, mesh_spec)
  if ckpt:
    try:
      return restore.restore_model(ckpt, mesh=placed, dtype=dtype, weights_dtype=weights_dtype,
                                   group_size=group_size, dense_dtype=dense_dtype), placed
    except (CheckpointError, ConfigError, quant_lib.QuantError) as e:
      raise LoadError(str(e)) from None
  quant = None
  if weights_dtype in quant_lib.INT_DTYPES:
    try:
      quant = quant_lib.Quant(weights_dtype, group_size or quant_lib.DEFAULT_GROUP_SIZE,
                              dense_dtype or "bfloat16")
      quant_lib.check(cfg, quant)
    except quant_lib.QuantError as e:
      raise LoadError(str(e)) from None

  def make() -> Transformer:
    built = Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(dtype or "float32"),
                        fp8=weights_dtype == "fp8")
    return built if quant is None else quant_lib.apply(built, quant)

  return (make() if placed is None else sharding.init_sharded(make, placed)), placed


def tokenizer(cfg: TextConfig, *, ckpt: str | None = None, config: str | None = None,
              path: str | None = None) -> ChatTokenizer:
  """`path`, else the checkpoint's (or config directory's) tekken.json, else, for a preset,
  the built-in one; it must fit the model (ids within its vocabulary, the same EOS)."""
  if path is None and ckpt:
    path = os.path.join(ckpt, "tekken.json")
    if not os.path.isfile(path):
      raise LoadError(f"no tokenizer: {path} does not exist; pass --tokenizer=PATH to a "
                      "tekken.json")
  elif path is None and config is not None and config not in configs.PRESETS:
    path = os.path.join(config, "tekken.json")
    path = path if os.path.isfile(path) else None
  try:
    tok = ChatTokenizer.from_file(path) if path else ChatTokenizer.builtin()
  except TokenizerFileError as e:
    raise LoadError(str(e)) from None
  if tok.vocab_size > cfg.vocab_size or tok.eos_id != cfg.eos_token_id:
    raise LoadError(f"tokenizer {tok.path} (vocab {tok.vocab_size}, </s> {tok.eos_id}) does "
                    f"not fit the model (vocab {cfg.vocab_size}, eos {cfg.eos_token_id})")
  return tok


@dataclasses.dataclass(frozen=True)
class WeightsFlags:
  """`--weights_dtype`, `--group_size` and `--dense_dtype`: how a launcher holds weights."""

  weights_dtype: flags.FlagHolder
  group_size: flags.FlagHolder
  dense_dtype: flags.FlagHolder

  def values(self) -> dict[str, str | int | None]:
    """The `model` keyword arguments the flags give."""
    return {f.name: getattr(self, f.name).value for f in dataclasses.fields(self)}


def define_weights_flags() -> WeightsFlags:
  """Defines the weight-format flags (once per launcher, at import)."""
  return WeightsFlags(
      flags.DEFINE_enum(
          "weights_dtype", None, quant_lib.WEIGHTS_DTYPES,
          "fp8: keep the e4m3 linears FP8-resident (a checkpoint converted with --dtype=fp8; "
          "for --config, quantized at init); int8 / int4: integer weights (a checkpoint "
          "converted with that --dtype; for --config, quantized at init, "
          "smallfour/nn/quant.py). Default: as the checkpoint stores them (bfloat16 for "
          "--config)."),
      flags.DEFINE_integer(
          "group_size", None,
          "int4: inputs per scale (default: the checkpoint's; 128 for --config)."),
      flags.DEFINE_enum(
          "dense_dtype", None, quant_lib.DENSE_DTYPES,
          "int8/int4: attention and shared experts as int8 or bfloat16 (default: the "
          "checkpoint's; bfloat16 for --config)."))


@dataclasses.dataclass(frozen=True)
class EngineFlags:
  """`--page_size`, `--cache_tokens`, `--max_num_batched_tokens`, `--prefix_caching`: the
  paged cache and the step budget of a launcher's `Engine`."""

  page_size: flags.FlagHolder
  cache_tokens: flags.FlagHolder
  max_num_batched_tokens: flags.FlagHolder
  prefix_caching: flags.FlagHolder

  def values(self) -> dict[str, int | bool | None]:
    """The `Engine` keyword arguments the flags give; a bad value exits in one line."""
    out = {f.name: getattr(self, f.name).value for f in dataclasses.fields(self)}
    page = out["page_size"]
    if page < 1 or page & (page - 1):
      fail(f"--page_size must be a power of two, got {page}")
    if out["cache_tokens"] is not None and out["cache_tokens"] < page:
      fail(f"--cache_tokens={out['cache_tokens']} holds not one page of {page} tokens")
    if out["max_num_batched_tokens"] < page:
      fail(f"--max_num_batched_tokens={out['max_num_batched_tokens']} is less than a page "
           f"({page}): prompt chunks are whole pages")
    return out


def define_engine_flags() -> EngineFlags:
  """Defines the engine's cache and scheduling flags (once per launcher, at import)."""
  return EngineFlags(
      flags.DEFINE_integer("page_size", 16, "Tokens per page of the latent cache (a power "
                           "of two)."),
      flags.DEFINE_integer("cache_tokens", None,
                           "Tokens the cache's page pool holds, all sequences together "
                           "(default max_batch × max_len)."),
      flags.DEFINE_integer("max_num_batched_tokens", 512,
                           "Tokens one step feeds: a decode token per running sequence, then "
                           "prompt chunks; bounds how long a new prompt pauses the streams."),
      flags.DEFINE_bool("prefix_caching", True,
                        "Keep full pages keyed by their tokens, so prompts that start alike "
                        "(system prompts, earlier turns) reuse them."))
