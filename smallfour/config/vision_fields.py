"""The vision field table: where each `VisionConfig` field sits in config.json and params.json.

HF paths are within the `mistral3` wrapper (its `vision_config` and top-level fields),
native ones within params.json (its `vision_encoder`).
"""

from __future__ import annotations

import dataclasses

from smallfour.config.fields import Field, Fixed, Key, Tokenizer
from smallfour.config.model import VisionConfig


def _vision(key: str | tuple[str, ...], *args, **kwargs) -> Key:
  keys = (key,) if isinstance(key, str) else key
  return Key(tuple(f"vision_encoder.{k}" for k in keys), *args, **kwargs)


FIELDS: tuple[Field, ...] = (
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

# mistral3 wrapper fields with no VisionConfig field, and pixtral ones: one value each.
HF_WRAPPER_CONSTANTS = {"projector_hidden_act": "gelu", "vision_feature_layer": -1,
                        "multimodal_projector_bias": False}
HF_PIXTRAL_CONSTANTS = {"model_type": "pixtral", "hidden_act": "silu"}
NATIVE_CONSTANTS = {"mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True,
                    "adapter_bias": False}
TYPES = {f.name: f.type for f in dataclasses.fields(VisionConfig)}
