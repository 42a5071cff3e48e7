"""Model hyperparameters for Mistral Small 4: the text decoder and its vision path.

Frozen dataclasses hold the architecture only; runtime choices (dtype, mesh, MoE
kernel, cache length) live elsewhere. Every inconsistency raises `ConfigError` naming
the field (spec: ARCHITECTURE.md §1). `TextConfig` is the model's one config object:
its `vision` field holds the Pixtral encoder and projector of the multimodal wrapper
(None for a text-only model), so that everything that reads, stores or restores a
config carries both.

The released formats are read and written by `smallfour.config.formats` (`from_hf`,
`from_params`, `to_hf`, `to_params`, `from_hub`: the field tables of `text_fields` and
`vision_fields`, each format with its own reference's semantics) and directories by
`smallfour.config.files` (`load_dir`, `load_file`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

SoftmaxScaleMode = Literal["plain", "hf_mscale_fold"]
SOFTMAX_SCALE_MODES: tuple[str, ...] = ("plain", "hf_mscale_fold")
# Which reference's image preprocessing a checkpoint is read with (smallfour.chat.image_processing).
ImageProcessor = Literal["transformers", "mistral_common"]
IMAGE_PROCESSORS: tuple[str, ...] = ("transformers", "mistral_common")

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
class VisionConfig:
  """The Pixtral encoder, the patch-merger projector and the image tokens (spec §1.3, §5).

  `image_size` is the longest edge an image is resized under; the encoder itself takes
  any grid of patches. The encoder's norms use `norm_eps` (hard-coded 1e-5 by both
  references); the projector's norm eps differs between them: transformers takes the
  text `rms_norm_eps`, Mistral's stack 1e-5. `image_processor` names the reference whose
  preprocessing (resize rule and library) the checkpoint is read with, as
  `softmax_scale_mode` does for the attention scale.
  """

  hidden_size: int
  intermediate_size: int
  num_layers: int  # num_hidden_layers
  num_heads: int  # num_attention_heads
  patch_size: int
  image_size: int
  num_channels: int = 3
  rope_theta: float = 10000.0
  spatial_merge_size: int = 2
  image_token_id: int = 10  # [IMG]; image_token_index in HF
  image_break_token_id: int = 12  # [IMG_BREAK]
  image_end_token_id: int = 13  # [IMG_END]
  norm_eps: float = 1e-5
  projector_norm_eps: float = 1e-6
  image_processor: ImageProcessor = "mistral_common"

  def __post_init__(self):
    _validate_vision(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def merged_patch(self) -> int:
    """Pixels per side of one image token: patch_size × spatial_merge_size."""
    return self.patch_size * self.spatial_merge_size

  def replace(self, **changes: Any) -> "VisionConfig":
    return dataclasses.replace(self, **changes)


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
  vision: VisionConfig | None = None  # the multimodal wrapper's vision path, if any

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
    vision = d.pop("vision", None)
    if vision is not None:
      unknown = sorted(set(vision) - {f.name for f in dataclasses.fields(VisionConfig)})
      if unknown:
        raise ConfigError(f"unknown VisionConfig fields: {unknown}")
      vision = VisionConfig(**vision)
    return cls(rope=RopeConfig(**rope), vision=vision, **d)


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
    raise ConfigError(f"first_k_dense_replace={c.first_k_dense_replace} must lie in "
                      f"[0, num_layers={c.num_layers}]")
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
  if c.vision is not None:
    for tok in ("image_token_id", "image_break_token_id", "image_end_token_id"):
      if not 0 <= getattr(c.vision, tok) < c.vocab_size:
        raise ConfigError(f"vision.{tok}={getattr(c.vision, tok)} outside "
                          f"vocab_size={c.vocab_size}")


def _validate_vision(v: VisionConfig) -> None:
  positive = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
              "image_size", "num_channels", "spatial_merge_size")
  for name in positive:
    value = getattr(v, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"vision.{name} must be a positive integer, got {value!r}")
  if v.hidden_size % v.num_heads or v.head_dim % 4:
    # 2D RoPE: half of each head's rotary pairs turn with the row, half with the column.
    raise ConfigError(f"vision.hidden_size={v.hidden_size} / num_heads={v.num_heads} must be "
                      "a whole head_dim divisible by 4 (2D rotary pairs)")
  if v.image_size < v.merged_patch:
    raise ConfigError(f"vision.image_size={v.image_size} is smaller than one image token "
                      f"({v.merged_patch} pixels)")
  for name in ("norm_eps", "projector_norm_eps", "rope_theta"):
    if not getattr(v, name) > 0:
      raise ConfigError(f"vision.{name} must be > 0, got {getattr(v, name)!r}")
  ids = (v.image_token_id, v.image_break_token_id, v.image_end_token_id)
  if len(set(ids)) != 3:
    raise ConfigError(f"vision image token ids must differ, got [IMG], [IMG_BREAK], "
                      f"[IMG_END] = {ids}")
  if v.image_processor not in IMAGE_PROCESSORS:
    raise ConfigError(f"vision.image_processor={v.image_processor!r}; expected one of "
                      f"{IMAGE_PROCESSORS}")

