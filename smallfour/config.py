"""Model hyperparameters for the Mistral Small 4 text decoder.

Frozen dataclasses hold the architecture only; runtime choices (dtype, mesh, MoE
kernel, cache length) live elsewhere. Two readers build a `TextConfig` from the
released formats, each with the semantics of its own reference implementation:

* `from_hf`: an HF `config.json` (the `Mistral3` wrapper with `text_config`, or a bare
  `mistral4` config), read as transformers 5.23 reads it.
* `from_params`: a Mistral-native `params.json`, read as Mistral's serving stack reads it.

Every inconsistency raises `ConfigError` naming the field (spec: ARCHITECTURE.md §1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal, Mapping

SoftmaxScaleMode = Literal["plain", "hf_mscale_fold"]
SOFTMAX_SCALE_MODES: tuple[str, ...] = ("plain", "hf_mscale_fold")

# Our own config file, written next to converted weights.
SMALLFOUR_CONFIG_FILE = "smallfour_config.json"


class ConfigError(ValueError):
  """A model configuration is missing a field or is inconsistent."""


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN magnitude `m(f, k) = 1 + 0.1·k·ln f` (1 when f ≤ 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """YaRN rotary embedding and the llama-4 long-context query scale (spec §2.4–2.5)."""

  theta: float = 10000.0
  factor: float = 128.0
  original_max_position_embeddings: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  # Multiplier on cos/sin. Derived from mscale/mscale_all_dim as transformers does.
  attention_factor: float = 1.0
  truncate: bool = True
  # λ(p) = 1 + β·ln(1 + floor(p / L)); β = 0 disables the scale.
  llama_4_scaling_beta: float = 0.1
  llama_4_original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Hyperparameters of the text decoder (HF names in comments where they differ)."""

  vocab_size: int
  hidden_size: int
  num_layers: int  # num_hidden_layers
  num_heads: int  # num_attention_heads
  q_lora_rank: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  num_experts: int  # n_routed_experts
  num_experts_per_tok: int
  n_shared_experts: int
  moe_intermediate_size: int
  intermediate_size: int  # width of the dense MLP in the first_k_dense_replace layers
  first_k_dense_replace: int = 0
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  rms_norm_eps: float = 1e-6
  # transformers hard-codes 1e-6 for q_a/kv_a norms; Mistral uses norm_eps everywhere.
  latent_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  softmax_scale_mode: SoftmaxScaleMode = "plain"
  max_position_embeddings: int = 1048576
  bos_token_id: int = 1
  eos_token_id: int | None = 2  # None: generation stops only on length
  pad_token_id: int = 11

  def __post_init__(self):
    _validate(self)

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    """τ of spec §2.6: qk_head_dim^-1/2, times m(f, mscale_all_dim)² when folded."""
    scale = self.qk_head_dim**-0.5
    if self.softmax_scale_mode == "hf_mscale_fold":
      m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
      scale *= m * m
    return scale

  def is_moe_layer(self, layer: int) -> bool:
    return layer >= self.first_k_dense_replace

  def replace(self, **changes: Any) -> "TextConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TextConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - known):
      raise ConfigError(f"unknown TextConfig fields: {unknown}")
    rope = d.pop("rope", {})
    return cls(rope=RopeConfig(**rope), **d)


def _validate(c: TextConfig) -> None:
  positive = (
      "vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank",
      "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
      "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
      "topk_group",
  )
  for name in positive:
    value = getattr(c, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"{name} must be a positive integer, got {value!r}")
  if c.qk_rope_head_dim % 2:
    raise ConfigError(f"qk_rope_head_dim must be even (rotary pairs), got {c.qk_rope_head_dim}")
  if not 0 <= c.first_k_dense_replace <= c.num_layers:
    raise ConfigError(
        f"first_k_dense_replace={c.first_k_dense_replace} must lie in [0, num_layers={c.num_layers}]")
  if c.first_k_dense_replace and c.intermediate_size <= 0:
    raise ConfigError("intermediate_size must be positive when first_k_dense_replace > 0")
  if c.n_shared_experts < 0:
    raise ConfigError(f"n_shared_experts must be >= 0, got {c.n_shared_experts}")
  if c.num_experts % c.n_group:
    raise ConfigError(
        f"n_routed_experts={c.num_experts} is not divisible by n_group={c.n_group}")
  if c.n_group > 1 and c.num_experts // c.n_group < 2:
    raise ConfigError(
        f"group scores sum the top-2 experts of a group: n_routed_experts/n_group="
        f"{c.num_experts // c.n_group} must be >= 2")
  if c.topk_group > c.n_group:
    raise ConfigError(f"topk_group={c.topk_group} exceeds n_group={c.n_group}")
  selectable = c.topk_group * (c.num_experts // c.n_group)
  if c.num_experts_per_tok > selectable:
    raise ConfigError(
        f"num_experts_per_tok={c.num_experts_per_tok} exceeds the {selectable} experts "
        f"in topk_group={c.topk_group} groups")
  if c.softmax_scale_mode not in SOFTMAX_SCALE_MODES:
    raise ConfigError(
        f"softmax_scale_mode={c.softmax_scale_mode!r}; expected one of {SOFTMAX_SCALE_MODES}")
  for name in ("rms_norm_eps", "latent_norm_eps"):
    if not getattr(c, name) > 0:
      raise ConfigError(f"{name} must be > 0, got {getattr(c, name)!r}")
  r = c.rope
  if r.theta <= 0 or r.factor <= 0:
    raise ConfigError(f"rope theta and factor must be > 0, got {r.theta}, {r.factor}")
  if r.original_max_position_embeddings <= 0 or r.llama_4_original_max_position_embeddings <= 0:
    raise ConfigError("original_max_position_embeddings must be > 0")
  for tok in ("bos_token_id", "eos_token_id"):
    if getattr(c, tok) is not None and not 0 <= getattr(c, tok) < c.vocab_size:
      raise ConfigError(f"{tok}={getattr(c, tok)} outside vocab_size={c.vocab_size}")


# --------------------------------------------------------------------------- HF


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in d or d[key] is None:
    raise ConfigError(f"{where}: missing required field {key!r}")
  return d[key]


def _expect(d: Mapping[str, Any], key: str, expected: Any, where: str, default: Any) -> None:
  value = d.get(key, default)
  if value != expected:
    raise ConfigError(f"{where}: {key}={value!r} is not supported (expected {expected!r})")


def from_hf(config: Mapping[str, Any], where: str = "config.json") -> TextConfig:
  """Reads an HF `config.json` dict with transformers 5.23 semantics.

  Shape-defining fields are required; behavioural fields missing from the file take the
  `Mistral4Config` class defaults, exactly as transformers would.
  """
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

  req = lambda key: _require(text, key, where)  # noqa: E731
  _expect(text, "hidden_act", "silu", where, "silu")
  _expect(text, "attention_bias", False, where, False)
  _expect(text, "tie_word_embeddings", False, where, False)
  _expect(text, "rope_interleave", True, where, True)
  heads = req("num_attention_heads")
  if text.get("num_key_value_heads") not in (None, heads):
    raise ConfigError(f"{where}: num_key_value_heads={text['num_key_value_heads']} must equal "
                      f"num_attention_heads={heads} (MLA expands one latent into every head)")
  if text.get("q_lora_rank") is None:
    raise ConfigError(f"{where}: q_lora_rank is null; uncompressed queries are not supported")

  rope = text.get("rope_parameters") or text.get("rope_scaling")
  if rope is None:
    raise ConfigError(f"{where}: missing required field 'rope_parameters'")
  rwhere = f"{where}:rope_parameters"
  rope_type = rope.get("rope_type", rope.get("type"))
  if rope_type != "yarn":
    raise ConfigError(f"{rwhere}: rope_type={rope_type!r}; only 'yarn' is supported")
  nope, rdim = req("qk_nope_head_dim"), req("qk_rope_head_dim")
  partial = rope.get("partial_rotary_factor", rdim / (nope + rdim))
  if int((nope + rdim) * partial) != rdim:
    raise ConfigError(f"{rwhere}: partial_rotary_factor={partial} does not give "
                      f"qk_rope_head_dim={rdim} of head_dim={nope + rdim}")
  factor = float(_require(rope, "factor", rwhere))
  mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
  attention_factor = rope.get("attention_factor")
  if attention_factor is None:  # transformers' _compute_yarn_parameters
    if mscale and mscale_all_dim:
      attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = yarn_mscale(factor, 1.0)
  original_max = int(_require(rope, "original_max_position_embeddings", rwhere))
  rope_cfg = RopeConfig(
      theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
      factor=factor,
      original_max_position_embeddings=original_max,
      beta_fast=float(rope.get("beta_fast") or 32.0),
      beta_slow=float(rope.get("beta_slow") or 1.0),
      mscale=float(mscale or 0.0),
      mscale_all_dim=float(mscale_all_dim or 0.0),
      attention_factor=float(attention_factor),
      truncate=bool(rope.get("truncate", True)),
      llama_4_scaling_beta=float(_require(rope, "llama_4_scaling_beta", rwhere)),
      llama_4_original_max_position_embeddings=original_max,
  )
  # Mistral4Attention folds m(f, mscale_all_dim)² into τ whenever mscale_all_dim is set.
  mode = "hf_mscale_fold" if mscale_all_dim else "plain"
  eos = text.get("eos_token_id", 2)
  return _build(
      where,
      vocab_size=req("vocab_size"),
      hidden_size=req("hidden_size"),
      num_layers=req("num_hidden_layers"),
      num_heads=heads,
      q_lora_rank=req("q_lora_rank"),
      kv_lora_rank=req("kv_lora_rank"),
      qk_nope_head_dim=nope,
      qk_rope_head_dim=rdim,
      v_head_dim=req("v_head_dim"),
      num_experts=req("n_routed_experts"),
      num_experts_per_tok=req("num_experts_per_tok"),
      n_shared_experts=text.get("n_shared_experts", 1),
      moe_intermediate_size=req("moe_intermediate_size"),
      intermediate_size=text.get("intermediate_size", 12288),
      first_k_dense_replace=text.get("first_k_dense_replace") or 0,
      n_group=text.get("n_group") or 1,
      topk_group=text.get("topk_group") or 1,
      norm_topk_prob=bool(text.get("norm_topk_prob", True)),
      routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
      rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
      latent_norm_eps=1e-6,
      rope=rope_cfg,
      softmax_scale_mode=mode,
      max_position_embeddings=text.get("max_position_embeddings", 1048576),
      bos_token_id=text.get("bos_token_id", 1),
      eos_token_id=eos[0] if isinstance(eos, list) else eos,
      pad_token_id=text.get("pad_token_id", 11),
  )


# ----------------------------------------------------------------------- native


def from_params(params: Mapping[str, Any], where: str = "params.json") -> TextConfig:
  """Reads a Mistral-native `params.json` dict with Mistral's own semantics.

  `yarn.apply_scale` decides the softmax scale (false → plain τ0, true → τ0·m(f,1)²);
  cos/sin are never rescaled (mscale = mscale_all_dim = 1).
  """
  req = lambda key: _require(params, key, where)  # noqa: E731
  moe = req("moe")
  mwhere = f"{where}:moe"
  yarn = req("yarn")
  ywhere = f"{where}:yarn"
  if params.get("tied_embeddings", False):
    raise ConfigError(f"{where}: tied_embeddings=true is not supported")
  heads = req("n_heads")
  if params.get("n_kv_heads", heads) != heads:
    raise ConfigError(f"{where}: n_kv_heads={params['n_kv_heads']} must equal n_heads={heads}")
  nope, rdim = req("qk_nope_head_dim"), req("qk_rope_head_dim")
  if "head_dim" in params and params["head_dim"] != nope + rdim:
    raise ConfigError(f"{where}: head_dim={params['head_dim']} != qk_nope_head_dim + "
                      f"qk_rope_head_dim = {nope + rdim}")
  original_max = int(_require(yarn, "original_max_position_embeddings", ywhere))
  llama4 = params.get("llama_4_scaling") or {}
  rope_cfg = RopeConfig(
      theta=float(params.get("rope_theta", 10000.0)),
      factor=float(_require(yarn, "factor", ywhere)),
      original_max_position_embeddings=original_max,
      beta_fast=float(yarn.get("beta", 32.0)),
      beta_slow=float(yarn.get("alpha", 1.0)),
      mscale=1.0,
      mscale_all_dim=1.0,
      attention_factor=1.0,
      llama_4_scaling_beta=float(llama4.get("beta", 0.0)),
      llama_4_original_max_position_embeddings=int(
          llama4.get("original_max_position_embeddings", original_max)),
  )
  norm_eps = float(req("norm_eps"))
  return _build(
      where,
      vocab_size=req("vocab_size"),
      hidden_size=req("dim"),
      num_layers=req("n_layers"),
      num_heads=heads,
      q_lora_rank=req("q_lora_rank"),
      kv_lora_rank=req("kv_lora_rank"),
      qk_nope_head_dim=nope,
      qk_rope_head_dim=rdim,
      v_head_dim=req("v_head_dim"),
      num_experts=_require(moe, "num_experts", mwhere),
      num_experts_per_tok=_require(moe, "num_experts_per_tok", mwhere),
      n_shared_experts=moe.get("num_shared_experts", 0),
      moe_intermediate_size=_require(moe, "expert_hidden_dim", mwhere),
      intermediate_size=params.get("hidden_dim", 0),
      first_k_dense_replace=moe.get("first_k_dense_replace", 0),
      n_group=moe.get("num_expert_groups", 1),
      topk_group=moe.get("num_expert_groups_per_tok", 1),
      norm_topk_prob=True,
      routed_scaling_factor=float(moe.get("routed_scale", 1.0)),
      rms_norm_eps=norm_eps,
      latent_norm_eps=norm_eps,
      rope=rope_cfg,
      softmax_scale_mode="hf_mscale_fold" if yarn.get("apply_scale", False) else "plain",
      max_position_embeddings=params.get("max_position_embeddings",
                                         params.get("max_seq_len", 1048576)),
  )


def _build(where: str, **fields: Any) -> TextConfig:
  try:
    return TextConfig(**fields)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


def load_file(file: str, reader) -> TextConfig:
  """Parses the JSON `file` and reads it with `reader` (from_hf, from_params, ...)."""
  try:
    with open(file) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: not valid JSON ({e})") from None
  except OSError as e:
    raise ConfigError(f"{file}: cannot be read ({e.strerror})") from None
  return reader(data, file)


def load_dir(path: str) -> TextConfig:
  """Reads the config of a directory: ours, an HF config.json, or a native params.json."""
  for name, reader in ((SMALLFOUR_CONFIG_FILE, _from_smallfour_json), ("config.json", from_hf),
                       ("params.json", from_params)):
    file = os.path.join(path, name)
    if os.path.exists(file):
      return load_file(file, reader)
  raise ConfigError(f"{path}: no {SMALLFOUR_CONFIG_FILE}, config.json or params.json found")


def _from_smallfour_json(data: Mapping[str, Any], where: str) -> TextConfig:
  try:
    return TextConfig.from_dict(data["text"])
  except (KeyError, TypeError) as e:
    raise ConfigError(f"{where}: malformed ({e!r})") from None
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
