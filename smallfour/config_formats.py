"""The released config formats: one field table, read and written both ways.

`FIELDS` places every `TextConfig` field in an HF `config.json` (a `mistral4` text config,
or the `mistral3` wrapper around one; transformers 5.23 semantics) and in a Mistral-native
`params.json` (the semantics of Mistral's serving stack); `VISION_FIELDS` does the same
for the `VisionConfig` of a multimodal model (the wrapper's `vision_config` and top-level
fields; params.json's `vision_encoder`). The readers `from_hf` / `from_params` and the
writers `to_hf` / `to_params` all walk them: `from_X(to_X(c)) == c` unless `to_X` raises
`ConfigError` naming a field its format cannot hold.

The release's hub repo ships both files. `from_hub` reads such a pair as Mistral's stack
does (params.json's `yarn.apply_scale` decides the softmax scale) and requires config.json
to describe the same model.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

from smallfour.config import ConfigError, RopeConfig, TextConfig, VisionConfig, yarn_mscale

_REQUIRED = object()
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Key:
  """Where a format stores a field: a dotted path, or alternatives (the first is written)."""

  path: str | tuple[str, ...]
  default: Any = _REQUIRED  # a value, or a function of the fields read before this one
  falsy: bool = False  # any falsy value means the default, as transformers' `x or d` reads
  nullable: bool = False  # null is a value rather than a missing field

  @property
  def paths(self) -> tuple[str, ...]:
    return (self.path,) if isinstance(self.path, str) else self.path


@dataclasses.dataclass(frozen=True)
class Fixed:
  """A field the format does not hold: its reader assumes `value`, its writer refuses others."""

  value: Any


@dataclasses.dataclass(frozen=True)
class Tokenizer(Fixed):
  """A token id params.json leaves to tekken.json: read as `value`, dropped when written."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field's place in each format."""

  name: str  # a TextConfig (VisionConfig) field; "rope.x" is RopeConfig.x
  hf: Key | Fixed
  native: Key | Fixed


def _hf_attention_factor(v: Mapping[str, Any]) -> float:  # transformers' _compute_yarn_parameters
  factor, mscale, mscale_all_dim = v["rope.factor"], v["rope.mscale"], v["rope.mscale_all_dim"]
  if mscale and mscale_all_dim:
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
  return yarn_mscale(factor, 1.0)


def _yarn_window(v: Mapping[str, Any]) -> int:
  return int(v["rope.factor"] * v["rope.original_max_position_embeddings"])


def _rope(key: str, *args, **kwargs) -> Key:
  return Key(f"rope_parameters.{key}", *args, **kwargs)


FIELDS: tuple[Field, ...] = (
    Field("vocab_size", Key("vocab_size"), Key("vocab_size")),
    Field("hidden_size", Key("hidden_size"), Key("dim")),
    Field("num_layers", Key("num_hidden_layers"), Key("n_layers")),
    Field("num_heads", Key("num_attention_heads"), Key("n_heads")),
    Field("q_lora_rank", Key("q_lora_rank"), Key("q_lora_rank")),
    Field("kv_lora_rank", Key("kv_lora_rank"), Key("kv_lora_rank")),
    Field("qk_nope_head_dim", Key("qk_nope_head_dim"), Key("qk_nope_head_dim")),
    Field("qk_rope_head_dim", Key("qk_rope_head_dim"), Key("qk_rope_head_dim")),
    Field("v_head_dim", Key("v_head_dim"), Key("v_head_dim")),
    Field("num_experts", Key("n_routed_experts"), Key("moe.num_experts")),
    Field("num_experts_per_tok", Key("num_experts_per_tok"), Key("moe.num_experts_per_tok")),
    Field("n_shared_experts", Key("n_shared_experts", 1), Key("moe.num_shared_experts", 0)),
    Field("moe_intermediate_size", Key("moe_intermediate_size"), Key("moe.expert_hidden_dim")),
    Field("intermediate_size", Key("intermediate_size", 12288), Key("hidden_dim", 0)),
    Field("first_k_dense_replace", Key("first_k_dense_replace", 0, falsy=True),
          Key("moe.first_k_dense_replace", 0)),
    Field("n_group", Key("n_group", 1, falsy=True), Key("moe.num_expert_groups", 1)),
    Field("topk_group", Key("topk_group", 1, falsy=True), Key("moe.num_expert_groups_per_tok", 1)),
    Field("norm_topk_prob", Key("norm_topk_prob", True), Fixed(True)),
    Field("routed_scaling_factor", Key("routed_scaling_factor", 1.0), Key("moe.routed_scale", 1.0)),
    Field("rms_norm_eps", Key("rms_norm_eps", 1e-6), Key("norm_eps")),
    # transformers hard-codes the q_a/kv_a norms' eps; Mistral uses norm_eps everywhere.
    Field("latent_norm_eps", Fixed(1e-6), Key("norm_eps")),
    # Configs older than transformers' rope_parameters keep rope_theta at the top.
    Field("rope.theta", Key(("rope_parameters.rope_theta", "rope_theta"), 10000.0),
          Key("rope_theta", 10000.0)),
    Field("rope.factor", _rope("factor"), Key("yarn.factor")),
    Field("rope.original_max_position_embeddings", _rope("original_max_position_embeddings"),
          Key("yarn.original_max_position_embeddings")),
    Field("rope.beta_fast", _rope("beta_fast", 32.0, falsy=True), Key("yarn.beta", 32.0)),
    Field("rope.beta_slow", _rope("beta_slow", 1.0, falsy=True), Key("yarn.alpha", 1.0)),
    # Mistral's stack never rescales cos/sin; apply_scale alone stands for m(f, 1).
    Field("rope.mscale", _rope("mscale", 0.0), Fixed(1.0)),
    Field("rope.mscale_all_dim", _rope("mscale_all_dim", 0.0), Fixed(1.0)),
    Field("rope.attention_factor", _rope("attention_factor", _hf_attention_factor), Fixed(1.0)),
    Field("rope.truncate", _rope("truncate", True), Fixed(True)),
    Field("rope.llama_4_scaling_beta", _rope("llama_4_scaling_beta"),
          Key("llama_4_scaling.beta", 0.0)),
    # HF has one original window for YaRN and the llama-4 scale alike.
    Field("rope.llama_4_original_max_position_embeddings",
          _rope("original_max_position_embeddings"),
          Key("llama_4_scaling.original_max_position_embeddings",
              lambda v: v["rope.original_max_position_embeddings"])),
    Field("max_position_embeddings", Key("max_position_embeddings", 1048576),
          Key(("max_position_embeddings", "max_seq_len"), _yarn_window)),
    Field("bos_token_id", Key("bos_token_id", 1), Tokenizer(1)),
    Field("eos_token_id", Key("eos_token_id", 2, nullable=True), Tokenizer(2)),
    Field("pad_token_id", Key("pad_token_id", 11), Tokenizer(11)),
)


def _vision(key: str | tuple[str, ...], *args, **kwargs) -> Key:
  keys = (key,) if isinstance(key, str) else key
  return Key(tuple(f"vision_encoder.{k}" for k in keys), *args, **kwargs)


# HF paths are within the mistral3 wrapper; native ones within params.json.
VISION_FIELDS: tuple[Field, ...] = (
    Field("hidden_size", Key("vision_config.hidden_size"), _vision("hidden_size")),
    Field("intermediate_size", Key("vision_config.intermediate_size"),
          _vision("intermediate_size")),
    Field("num_layers", Key("vision_config.num_hidden_layers"), _vision("num_hidden_layers")),
    Field("num_heads", Key("vision_config.num_attention_heads"), _vision("num_attention_heads")),
    Field("patch_size", Key("vision_config.patch_size"), _vision("patch_size")),
    # Mistral's image encoder reads max_image_size (from tekken.json); image_size bounds
    # its 2D positions. The release states both, equal.
    Field("image_size", Key("vision_config.image_size"),
          _vision(("max_image_size", "image_size"))),
    Field("num_channels", Key("vision_config.num_channels", 3), _vision("num_channels", 3)),
    Field("rope_theta", Key(("vision_config.rope_parameters.rope_theta",
                             "vision_config.rope_theta"), 10000.0),
          _vision("rope_theta", 10000.0)),
    Field("spatial_merge_size", Key("spatial_merge_size", 2), _vision("spatial_merge_size")),
    Field("image_token_id", Key(("image_token_index", "image_token_id"), 10),
          _vision("image_token_id", 10)),
    Field("image_break_token_id", Tokenizer(12), _vision("image_break_token_id", 12)),
    Field("image_end_token_id", Tokenizer(13), _vision("image_end_token_id", 13)),
    Field("norm_eps", Fixed(1e-5), Fixed(1e-5)),
    # transformers normalises with the text eps; Mistral's stack hard-codes 1e-5.
    Field("projector_norm_eps", Key("text_config.rms_norm_eps", 1e-6), Fixed(1e-5)),
    Field("image_processor", Fixed("transformers"), Fixed("mistral_common")),
)

_FILES = {"hf": "config.json", "native": "params.json"}
# config.json fields with no TextConfig field: this model allows one value of each.
_HF_CONSTANTS = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
                 "rope_interleave": True}
# mistral3 wrapper fields with no VisionConfig field, and pixtral ones: one value each.
_HF_VISION_CONSTANTS = {"projector_hidden_act": "gelu", "vision_feature_layer": -1,
                        "multimodal_projector_bias": False}
_HF_PIXTRAL_CONSTANTS = {"model_type": "pixtral", "hidden_act": "silu"}
_NATIVE_VISION_CONSTANTS = {"mm_projector_id": "patch_merge",
                            "add_pre_mm_projector_layer_norm": True, "adapter_bias": False}
# params.json fields read outside the tables (checks, the mode), and those that do not
# describe the model or describe only how it is served.
_NATIVE_OTHER = ("head_dim", "n_kv_heads", "tied_embeddings", "yarn.apply_scale",
                 "moe.route_every_n", "moe.expert_parallel", "moe.expert_model_parallel",
                 "quantization", *(f"vision_encoder.{k}" for k in _NATIVE_VISION_CONSTANTS))
_NATIVE_KNOWN = frozenset(
    [p for f in FIELDS + VISION_FIELDS if isinstance(f.native, Key) for p in f.native.paths]
    + list(_NATIVE_OTHER))
# From config.json when params.json does not state it: a limit, not part of the computation.
_HUB_FROM_CONFIG = ("max_position_embeddings",)
# Only the softmax-scale mode depends on these, and params.json decides it.
_HUB_UNCOMPARED = ("rope.mscale", "rope.mscale_all_dim")
# As written: config.py's annotations are strings (`from __future__ import annotations`).
_TYPES = {f.name: f.type for f in dataclasses.fields(TextConfig)} | {
    f"rope.{f.name}": f.type for f in dataclasses.fields(RopeConfig)}
_VISION_TYPES = {f.name: f.type for f in dataclasses.fields(VisionConfig)}


# --------------------------------------------------------------------- table walk


def _get(d: Any, path: str) -> Any:
  for part in path.split("."):
    if not isinstance(d, Mapping) or part not in d:
      return _MISSING
    d = d[part]
  return d


def _lookup(d: Mapping[str, Any], key: Key) -> Any:
  for path in key.paths:
    value = _get(d, path)
    if value is _MISSING or (value is None and not key.nullable) or (key.falsy and not value):
      continue
    return value
  return _MISSING


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in d or d[key] is None:
    raise ConfigError(f"{where}: missing required field {key!r}")
  return d[key]


def _expect(d: Mapping[str, Any], key: str, expected: Any, where: str) -> None:
  value = d.get(key, expected)
  if value != expected:
    raise ConfigError(f"{where}: {key}={value!r} is not supported (expected {expected!r})")


def _coerce(name: str, value: Any, where: str, types: Mapping[str, str]) -> Any:
  kind = types[name]
  if kind == "int | None" and isinstance(value, list):  # transformers allows several EOS ids
    return value[0]
  convert = {"float": float, "bool": bool}.get(kind)
  if kind == "int" and name.startswith("rope."):
    convert = int
  try:
    return convert(value) if convert else value
  except (TypeError, ValueError):
    raise ConfigError(f"{where}: {name}={value!r} is not a number") from None


def _read(fmt: str, d: Mapping[str, Any], where: str, fields: tuple[Field, ...] = FIELDS,
          types: Mapping[str, str] = _TYPES) -> tuple[dict[str, Any], set[str]]:
  """Every field's value in `d`, and the names of those `d` states (not defaulted)."""
  values: dict[str, Any] = {}
  stated = set()
  for f in fields:
    spec = getattr(f, fmt)
    if isinstance(spec, Fixed):
      values[f.name] = spec.value
      continue
    value = _lookup(d, spec)
    if value is _MISSING:
      if spec.default is _REQUIRED:
        parent, _, leaf = spec.paths[0].rpartition(".")
        at = ":".join([where, *filter(None, parent.split("."))])
        raise ConfigError(f"{at}: missing required field {leaf!r}")
      value = spec.default(values) if callable(spec.default) else spec.default
    else:
      stated.add(f.name)
    values[f.name] = _coerce(f.name, value, where, types)
  return values, stated


def _write(fmt: str, values: Mapping[str, Any], fields: tuple[Field, ...] = FIELDS,
           prefix: str = "") -> dict[str, Any]:
  """The file fragment holding `values` ({field: value}); errors name `prefix` + field."""
  file = _FILES[fmt]
  out: dict[str, Any] = {}
  held: dict[str, tuple[str, Any]] = {}  # path -> (field, value)
  for f in fields:
    spec, value, name = getattr(f, fmt), values[f.name], prefix + f.name
    if isinstance(spec, Tokenizer):
      continue
    if isinstance(spec, Fixed):
      if value != spec.value:
        raise ConfigError(f"{file} cannot hold {name}={value!r} "
                          f"(its readers assume {spec.value!r})")
      continue
    path = spec.paths[0]
    if path in held:
      if held[path][1] != value:
        raise ConfigError(f"{file} holds {held[path][0]} and {name} in one field, {path}, "
                          f"but they differ ({held[path][1]!r} vs {value!r})")
      continue
    if spec.falsy and not value and value != spec.default:
      raise ConfigError(f"{file} cannot hold {name}={value!r} (read back as {spec.default!r})")
    held[path] = (name, value)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def _text_values(cfg: TextConfig) -> dict[str, Any]:
  values = cfg.to_dict()
  del values["vision"]
  values.update({f"rope.{k}": v for k, v in values.pop("rope").items()})
  return values


def _build(where: str, values: Mapping[str, Any], mode: str,
           vision: Mapping[str, Any] | None = None) -> TextConfig:
  rope = {k[len("rope."):]: v for k, v in values.items() if k.startswith("rope.")}
  top = {k: v for k, v in values.items() if not k.startswith("rope.")}
  try:
    return TextConfig(rope=RopeConfig(**rope), softmax_scale_mode=mode,
                      vision=None if vision is None else VisionConfig(**vision), **top)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- HF


def _read_hf(config: Mapping[str, Any], where: str) -> dict[str, Any]:
  if "text_config" in config:
    if config.get("model_type", "mistral3") != "mistral3":
      raise ConfigError(f"{where}: model_type={config.get('model_type')!r} with a text_config; "
                        "expected 'mistral3'")
    text = config["text_config"]
    where = f"{where}:text_config"
  else:
    text = config
  if text.get("model_type") != "mistral4":
    raise ConfigError(f"{where}: model_type={text.get('model_type')!r}; expected 'mistral4'")
  for key, expected in _HF_CONSTANTS.items():
    _expect(text, key, expected, where)
  if "q_lora_rank" in text and text["q_lora_rank"] is None:
    raise ConfigError(f"{where}: q_lora_rank is null; uncompressed queries are not supported")
  rope = text.get("rope_parameters") or text.get("rope_scaling")
  if rope is None:
    raise ConfigError(f"{where}: missing required field 'rope_parameters'")
  rwhere = f"{where}:rope_parameters"
  rope_type = rope.get("rope_type", rope.get("type"))
  if rope_type != "yarn":
    raise ConfigError(f"{rwhere}: rope_type={rope_type!r}; only 'yarn' is supported")
  values, _ = _read("hf", dict(text, rope_parameters=rope), where)
  heads = values["num_heads"]
  if text.get("num_key_value_heads") not in (None, heads):
    raise ConfigError(f"{where}: num_key_value_heads={text['num_key_value_heads']} must equal "
                      f"num_attention_heads={heads} (MLA expands one latent into every head)")
  nope, rdim = values["qk_nope_head_dim"], values["qk_rope_head_dim"]
  partial = rope.get("partial_rotary_factor", rdim / (nope + rdim))
  if int((nope + rdim) * partial) != rdim:
    raise ConfigError(f"{rwhere}: partial_rotary_factor={partial} does not give "
                      f"qk_rope_head_dim={rdim} of head_dim={nope + rdim}")
  return values


def _read_hf_vision(config: Mapping[str, Any], where: str) -> dict[str, Any] | None:
  """The VisionConfig fields of a mistral3 wrapper; None for a bare text config."""
  if "text_config" not in config or config.get("vision_config") is None:
    return None
  for key, expected in _HF_VISION_CONSTANTS.items():
    _expect(config, key, expected, where)
  vision = config["vision_config"]
  vwhere = f"{where}:vision_config"
  for key, expected in _HF_PIXTRAL_CONSTANTS.items():
    _expect(vision, key, expected, vwhere)
  rope_type = (vision.get("rope_parameters") or {}).get("rope_type", "axial")
  if rope_type != "axial":
    raise ConfigError(f"{vwhere}:rope_parameters: rope_type={rope_type!r}; only 'axial'")
  values, _ = _read("hf", config, where, VISION_FIELDS, _VISION_TYPES)
  head_dim = values["hidden_size"] // values["num_heads"]
  if vision.get("head_dim", head_dim) != head_dim:
    raise ConfigError(f"{vwhere}: head_dim={vision['head_dim']} != hidden_size / "
                      f"num_attention_heads = {head_dim}")
  return values


def _hf_mode(mscale_all_dim: float) -> str:
  # Mistral4Attention folds m(f, mscale_all_dim)² into τ whenever mscale_all_dim is set.
  return "hf_mscale_fold" if mscale_all_dim else "plain"


def from_hf(config: Mapping[str, Any], where: str = "config.json") -> TextConfig:
  """Reads an HF `config.json` dict with transformers 5.23 semantics.

  Shape-defining fields are required; behavioural fields missing from the file take the
  `Mistral4Config` class defaults, exactly as transformers would.
  """
  values = _read_hf(config, where)
  return _build(where, values, _hf_mode(values["rope.mscale_all_dim"]),
                _read_hf_vision(config, where))


def to_hf(cfg: TextConfig) -> dict[str, Any]:
  """The `mistral4` config.json from which transformers 5.23 builds `cfg`.

  config.json has no softmax-scale field: transformers folds m(f, mscale_all_dim)² in
  whenever mscale_all_dim is set. So a plain config with mscale_all_dim set (the
  release's) cannot be written alone; the hub pairs it with params.json (`from_hub`).
  """
  implied = _hf_mode(cfg.rope.mscale_all_dim)
  if cfg.softmax_scale_mode != implied:
    raise ConfigError(f"config.json cannot hold softmax_scale_mode={cfg.softmax_scale_mode!r} "
                      f"with mscale_all_dim={cfg.rope.mscale_all_dim}: transformers reads "
                      f"{implied!r}")
  d = {"model_type": "mistral4", **_HF_CONSTANTS, "num_key_value_heads": cfg.num_heads,
       **_write("hf", _text_values(cfg))}
  d["rope_parameters"].update(rope_type="yarn",
                              partial_rotary_factor=cfg.qk_rope_head_dim / cfg.qk_head_dim)
  if cfg.vision is None:
    return d
  wrapper = _write("hf", dataclasses.asdict(cfg.vision), VISION_FIELDS, "vision.")
  eps = wrapper.pop("text_config")["rms_norm_eps"]
  if eps != cfg.rms_norm_eps:
    raise ConfigError(f"config.json holds rms_norm_eps and vision.projector_norm_eps in one "
                      f"field, text_config.rms_norm_eps, but they differ ({cfg.rms_norm_eps!r} "
                      f"vs {eps!r})")
  v = cfg.vision
  wrapper["vision_config"].update(
      _HF_PIXTRAL_CONSTANTS, head_dim=v.head_dim,
      rope_parameters={"rope_type": "axial", "rope_theta": wrapper["vision_config"].pop(
          "rope_parameters")["rope_theta"]})
  return {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
          "text_config": d, **wrapper, **_HF_VISION_CONSTANTS, "tie_word_embeddings": False}


# ----------------------------------------------------------------------- native


def _unknown(d: Mapping[str, Any], prefix: str = ""):
  for key, value in d.items():
    path = prefix + key
    if path in _NATIVE_KNOWN:
      continue
    if isinstance(value, Mapping) and any(k.startswith(path + ".") for k in _NATIVE_KNOWN):
      yield from _unknown(value, path + ".")
    else:
      yield path


def _read_params_vision(params: Mapping[str, Any], where: str) -> dict[str, Any] | None:
  """The VisionConfig fields of params.json's `vision_encoder`; None without one."""
  encoder = params.get("vision_encoder")
  if encoder is None:
    return None
  for key, expected in _NATIVE_VISION_CONSTANTS.items():
    _expect(encoder, key, expected, f"{where}:vision_encoder")
  sizes = {k: encoder[k] for k in ("image_size", "max_image_size") if k in encoder}
  if len(set(sizes.values())) > 1:
    raise ConfigError(f"{where}:vision_encoder: image_size={sizes['image_size']} and "
                      f"max_image_size={sizes['max_image_size']} differ")
  values, _ = _read("native", params, where, VISION_FIELDS, _VISION_TYPES)
  return values


def _read_params(params: Mapping[str, Any], where: str
                 ) -> tuple[dict[str, Any], set[str], str, dict[str, Any] | None]:
  """The fields of `params`, those it states, the softmax-scale mode and the vision
  fields (None for a text-only model)."""
  moe = _require(params, "moe", where)
  yarn = _require(params, "yarn", where)
  _expect(params, "tied_embeddings", False, where)
  _expect(moe, "route_every_n", 1, f"{where}:moe")
  apply_scale = yarn.get("apply_scale")
  if apply_scale not in (None, True, False):
    raise ConfigError(f"{where}:yarn: apply_scale={apply_scale!r} is not true or false")
  if unknown := sorted(_unknown(params)):
    warnings.warn(f"{where}: ignoring unknown fields {', '.join(unknown)}", stacklevel=3)
  values, stated = _read("native", params, where)
  heads = values["num_heads"]
  if params.get("n_kv_heads", heads) != heads:
    raise ConfigError(f"{where}: n_kv_heads={params['n_kv_heads']} must equal n_heads={heads}")
  head_dim = values["qk_nope_head_dim"] + values["qk_rope_head_dim"]
  if params.get("head_dim", head_dim) != head_dim:
    raise ConfigError(f"{where}: head_dim={params['head_dim']} != qk_nope_head_dim + "
                      f"qk_rope_head_dim = {head_dim}")
  mode = "hf_mscale_fold" if apply_scale else "plain"
  return values, stated, mode, _read_params_vision(params, where)


def from_params(params: Mapping[str, Any], where: str = "params.json") -> TextConfig:
  """Reads a Mistral-native `params.json` dict with Mistral's own semantics.

  `yarn.apply_scale` decides the softmax scale (false or absent → plain τ0, true →
  τ0·m(f,1)²); cos/sin are never rescaled. Without `max_position_embeddings` (or the
  older `max_seq_len`) the context is YaRN's: factor × original_max_position_embeddings.
  Unknown fields are ignored with a warning naming them.
  """
  values, _, mode, vision = _read_params(params, where)
  return _build(where, values, mode, vision)


def to_params(cfg: TextConfig) -> dict[str, Any]:
  """The params.json from which Mistral's stack builds `cfg` (token ids: tekken.json's)."""
  d = _write("native", _text_values(cfg))
  d.update(head_dim=cfg.qk_head_dim, n_kv_heads=cfg.num_heads, tied_embeddings=False)
  d["yarn"]["apply_scale"] = cfg.softmax_scale_mode == "hf_mscale_fold"
  if cfg.vision is not None:
    d.update(_write("native", dataclasses.asdict(cfg.vision), VISION_FIELDS, "vision."))
    d["vision_encoder"].update(_NATIVE_VISION_CONSTANTS, image_size=cfg.vision.image_size)
  return d


# -------------------------------------------------------------------------- hub


def _label(spec: Key | Fixed) -> str:
  return spec.paths[0] if isinstance(spec, Key) else "(implied)"


def from_hub(config: Mapping[str, Any], params: Mapping[str, Any],
             config_where: str = "config.json", params_where: str = "params.json") -> TextConfig:
  """Reads the hub repo's config.json + params.json pair as Mistral's stack does.

  params.json gives the config, its `yarn.apply_scale` the softmax scale; config.json
  adds the token ids (tekken.json's in Mistral's stack) and any max_position_embeddings
  params.json omits. Every other field config.json can state must agree with params.json,
  or ConfigError names it.
  """
  hf = _read_hf(config, config_where)
  native, stated, mode, vision = _read_params(params, params_where)
  values = dict(native)
  for f in FIELDS:
    if isinstance(f.native, Tokenizer) or (f.name in _HUB_FROM_CONFIG and f.name not in stated):
      values[f.name] = hf[f.name]
    elif (isinstance(f.hf, Key) and f.name not in _HUB_UNCOMPARED
          and native[f.name] != hf[f.name]):
      raise ConfigError(f"{params_where} and {config_where} disagree on {f.name}: "
                        f"{_label(f.native)}={native[f.name]!r} vs "
                        f"{_label(f.hf)}={hf[f.name]!r}")
  hf_vision = _read_hf_vision(config, config_where)
  if (vision is None) != (hf_vision is None):
    has, lacks = (params_where, config_where) if hf_vision is None else (config_where,
                                                                          params_where)
    raise ConfigError(f"{has} describes a vision encoder and {lacks} does not")
  for f in VISION_FIELDS if vision is not None else ():
    if isinstance(f.hf, Key) and isinstance(f.native, Key) and vision[f.name] != hf_vision[
        f.name]:
      raise ConfigError(f"{params_where} and {config_where} disagree on vision.{f.name}: "
                        f"{_label(f.native)}={vision[f.name]!r} vs "
                        f"{_label(f.hf)}={hf_vision[f.name]!r}")
  return _build(params_where, values, mode, vision)
