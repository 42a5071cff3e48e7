"""The released config formats, read and written both ways through the field tables.

`text_fields.FIELDS` places every `TextConfig` field in an HF `config.json` (a `mistral4`
text config, or the `mistral3` wrapper around one; transformers 5.23 semantics) and in a
Mistral-native `params.json` (the semantics of Mistral's serving stack);
`vision_fields.FIELDS` does the same for the `VisionConfig` of a multimodal model. The
readers `from_hf` / `from_params` and the writers `to_hf` / `to_params` all walk them
(`fields.read`, `fields.write`): `from_X(to_X(c)) == c` unless `to_X` raises `ConfigError`
naming a field its format cannot hold.

The release's hub repo ships both files. `from_hub` reads such a pair as Mistral's stack
does (params.json's `yarn.apply_scale` decides the softmax scale) and requires config.json
to describe the same model.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

from smallfour.config import fields, text_fields, vision_fields
from smallfour.config.fields import Fixed, Key, Tokenizer
from smallfour.config.model import ConfigError, RopeConfig, TextConfig, VisionConfig

# params.json paths the readers know; any other is ignored with a warning.
_NATIVE_KNOWN = frozenset(
    [p for f in text_fields.FIELDS + vision_fields.FIELDS if isinstance(f.native, Key)
     for p in f.native.paths]
    + list(text_fields.NATIVE_OTHER)
    + [f"vision_encoder.{k}" for k in vision_fields.NATIVE_CONSTANTS])
# From config.json when params.json does not state it: a limit, not part of the computation.
_HUB_FROM_CONFIG = ("max_position_embeddings",)
# Only the softmax-scale mode depends on these, and params.json decides it.
_HUB_UNCOMPARED = ("rope.mscale", "rope.mscale_all_dim")


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
  for key, expected in text_fields.HF_CONSTANTS.items():
    fields.expect(text, key, expected, where)
  if "q_lora_rank" in text and text["q_lora_rank"] is None:
    raise ConfigError(f"{where}: q_lora_rank is null; uncompressed queries are not supported")
  rope = text.get("rope_parameters") or text.get("rope_scaling")
  if rope is None:
    raise ConfigError(f"{where}: missing required field 'rope_parameters'")
  rwhere = f"{where}:rope_parameters"
  rope_type = rope.get("rope_type", rope.get("type"))
  if rope_type != "yarn":
    raise ConfigError(f"{rwhere}: rope_type={rope_type!r}; only 'yarn' is supported")
  values, _ = fields.read("hf", dict(text, rope_parameters=rope), where, text_fields.FIELDS,
                          text_fields.TYPES)
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
  for key, expected in vision_fields.HF_WRAPPER_CONSTANTS.items():
    fields.expect(config, key, expected, where)
  vision = config["vision_config"]
  vwhere = f"{where}:vision_config"
  for key, expected in vision_fields.HF_PIXTRAL_CONSTANTS.items():
    fields.expect(vision, key, expected, vwhere)
  rope_type = (vision.get("rope_parameters") or {}).get("rope_type", "axial")
  if rope_type != "axial":
    raise ConfigError(f"{vwhere}:rope_parameters: rope_type={rope_type!r}; only 'axial'")
  values, _ = fields.read("hf", config, where, vision_fields.FIELDS, vision_fields.TYPES)
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
  d = {"model_type": "mistral4", **text_fields.HF_CONSTANTS,
       "num_key_value_heads": cfg.num_heads,
       **fields.write("hf", _text_values(cfg), text_fields.FIELDS)}
  d["rope_parameters"].update(rope_type="yarn",
                              partial_rotary_factor=cfg.qk_rope_head_dim / cfg.qk_head_dim)
  if cfg.vision is None:
    return d
  wrapper = fields.write("hf", dataclasses.asdict(cfg.vision), vision_fields.FIELDS, "vision.")
  eps = wrapper.pop("text_config")["rms_norm_eps"]
  if eps != cfg.rms_norm_eps:
    raise ConfigError(f"config.json holds rms_norm_eps and vision.projector_norm_eps in one "
                      f"field, text_config.rms_norm_eps, but they differ ({cfg.rms_norm_eps!r} "
                      f"vs {eps!r})")
  v = cfg.vision
  wrapper["vision_config"].update(
      vision_fields.HF_PIXTRAL_CONSTANTS, head_dim=v.head_dim,
      rope_parameters={"rope_type": "axial", "rope_theta": wrapper["vision_config"].pop(
          "rope_parameters")["rope_theta"]})
  return {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
          "text_config": d, **wrapper, **vision_fields.HF_WRAPPER_CONSTANTS,
          "tie_word_embeddings": False}


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
  for key, expected in vision_fields.NATIVE_CONSTANTS.items():
    fields.expect(encoder, key, expected, f"{where}:vision_encoder")
  sizes = {k: encoder[k] for k in ("image_size", "max_image_size") if k in encoder}
  if len(set(sizes.values())) > 1:
    raise ConfigError(f"{where}:vision_encoder: image_size={sizes['image_size']} and "
                      f"max_image_size={sizes['max_image_size']} differ")
  values, _ = fields.read("native", params, where, vision_fields.FIELDS,
                          vision_fields.TYPES)
  return values


def _read_params(params: Mapping[str, Any], where: str
                 ) -> tuple[dict[str, Any], set[str], str, dict[str, Any] | None]:
  """The fields of `params`, those it states, the softmax-scale mode and the vision
  fields (None for a text-only model)."""
  moe = fields.require(params, "moe", where)
  yarn = fields.require(params, "yarn", where)
  fields.expect(params, "tied_embeddings", False, where)
  fields.expect(moe, "route_every_n", 1, f"{where}:moe")
  apply_scale = yarn.get("apply_scale")
  if apply_scale not in (None, True, False):
    raise ConfigError(f"{where}:yarn: apply_scale={apply_scale!r} is not true or false")
  if unknown := sorted(_unknown(params)):
    warnings.warn(f"{where}: ignoring unknown fields {', '.join(unknown)}", stacklevel=3)
  values, stated = fields.read("native", params, where, text_fields.FIELDS,
                                text_fields.TYPES)
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
  d = fields.write("native", _text_values(cfg), text_fields.FIELDS)
  d.update(head_dim=cfg.qk_head_dim, n_kv_heads=cfg.num_heads, tied_embeddings=False)
  d["yarn"]["apply_scale"] = cfg.softmax_scale_mode == "hf_mscale_fold"
  if cfg.vision is not None:
    d.update(fields.write("native", dataclasses.asdict(cfg.vision), vision_fields.FIELDS,
                            "vision."))
    d["vision_encoder"].update(vision_fields.NATIVE_CONSTANTS, image_size=cfg.vision.image_size)
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
  for f in text_fields.FIELDS:
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
  for f in vision_fields.FIELDS if vision is not None else ():
    if isinstance(f.hf, Key) and isinstance(f.native, Key) and vision[f.name] != hf_vision[
        f.name]:
      raise ConfigError(f"{params_where} and {config_where} disagree on vision.{f.name}: "
                        f"{_label(f.native)}={vision[f.name]!r} vs "
                        f"{_label(f.hf)}={hf_vision[f.name]!r}")
  return _build(params_where, values, mode, vision)
