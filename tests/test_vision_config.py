"""The vision part of the config: read from both formats, written back, refused clearly."""

import copy
import json

import pytest
from transformers import Mistral3Config

from smallfour import configs
from smallfour.config import files as config_files
from smallfour.config import formats as config_formats
from smallfour import config as config_lib
from smallfour.config import ConfigError, VisionConfig
from tests.test_config import RELEASE_CONFIG, RELEASE_PARAMS, as_transformers_reads


def test_presets_have_the_release_vision_geometry():
  big, tiny = (configs.resolve(n).vision for n in ("small4_119b", "tiny"))
  assert (big.hidden_size, big.num_layers, big.num_heads, big.head_dim) == (1024, 24, 16, 64)
  for v in (big, tiny):
    assert (v.patch_size, v.spatial_merge_size, v.merged_patch, v.image_size) == (14, 2, 28, 1540)
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 12, 13)


def test_each_format_is_read_with_its_own_semantics():
  """params.json: Mistral's stack (projector eps 1e-5, mistral-common's preprocessing);
  config.json: transformers' (the text rms_norm_eps, its PixtralImageProcessor)."""
  native = config_formats.from_params(RELEASE_PARAMS).vision
  hf = config_formats.from_hf(RELEASE_CONFIG).vision
  assert (native.projector_norm_eps, native.image_processor) == (1e-5, "mistral_common")
  assert (hf.projector_norm_eps, hf.image_processor) == (1e-6, "transformers")
  assert native.replace(projector_norm_eps=1e-6, image_processor="transformers") == hf
  # The hub pair reads as Mistral's stack, after checking the two files agree.
  assert config_formats.from_hub(RELEASE_CONFIG, RELEASE_PARAMS).vision == native


def test_smallfour_json_round_trip():
  cfg = configs.resolve("tiny")
  assert config_lib.TextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ConfigError, match=r"unknown VisionConfig fields: \['depth'\]"):
    config_lib.TextConfig.from_dict(dict(cfg.to_dict(), vision={"depth": 3}))


def test_transformers_builds_what_to_hf_writes():
  cfg = as_transformers_reads(configs.resolve("tiny").replace(softmax_scale_mode="hf_mscale_fold"))
  hf = Mistral3Config(**config_formats.to_hf(cfg))
  assert (hf.vision_config.hidden_size, hf.vision_config.num_hidden_layers) == (32, 2)
  assert (hf.vision_config.hidden_act, hf.vision_config.head_dim) == ("silu", 8)
  assert (hf.image_token_id, hf.spatial_merge_size, hf.tie_word_embeddings) == (10, 2, False)
  assert hf.text_config.rms_norm_eps == cfg.vision.projector_norm_eps


def _hf(**changes):
  d = copy.deepcopy(RELEASE_CONFIG)
  for path, value in changes.items():
    *parents, leaf = path.split("__")
    node = d
    for part in parents:
      node = node[part]
    node[leaf] = value
  return d


@pytest.mark.parametrize("change, message", [
    (dict(vision_config__hidden_act="gelu"),
     "config.json:vision_config: hidden_act='gelu' is not supported"),
    (dict(projector_hidden_act="silu"), "projector_hidden_act='silu' is not supported"),
    (dict(vision_feature_layer=-2), "vision_feature_layer=-2 is not supported"),
    (dict(multimodal_projector_bias=True), "multimodal_projector_bias=True is not supported"),
    (dict(vision_config__rope_parameters={"rope_type": "default", "rope_theta": 1.0}),
     "only 'axial'"),
    (dict(vision_config__head_dim=32), "head_dim=32 != hidden_size / num_attention_heads = 64"),
    (dict(vision_config__num_attention_heads=48), "head_dim=64 != hidden_size / num_attenti"),
    (dict(image_token_index=200000), r"vision.image_token_id=200000 outside vocab_size=131072"),
])
def test_bad_hf_vision_names_the_culprit(change, message):
  with pytest.raises(ConfigError, match=message):
    config_formats.from_hf(_hf(**change))


@pytest.mark.parametrize("change, message", [
    (dict(mm_projector_id="mlp"), "vision_encoder: mm_projector_id='mlp' is not supported"),
    (dict(adapter_bias=True), "adapter_bias=True is not supported"),
    (dict(max_image_size=1024), "image_size=1540 and max_image_size=1024 differ"),
    (dict(patch_size=None), "vision_encoder: missing required field 'patch_size'"),
    (dict(image_break_token_id=10), r"\[IMG\], \[IMG_BREAK\], \[IMG_END\] = \(10, 10, 13\)"),
])
def test_bad_native_vision_names_the_culprit(change, message):
  params = copy.deepcopy(RELEASE_PARAMS)
  params["vision_encoder"].update(change)
  params["vision_encoder"] = {k: v for k, v in params["vision_encoder"].items() if v is not None}
  with pytest.raises(ConfigError, match=message):
    config_formats.from_params(params)


def test_hub_pair_must_agree_on_vision():
  with pytest.raises(ConfigError, match="params.json and config.json disagree on "
                     "vision.num_layers: vision_encoder.num_hidden_layers=24 vs "
                     "vision_config.num_hidden_layers=12"):
    config_formats.from_hub(_hf(vision_config__num_hidden_layers=12), RELEASE_PARAMS)
  text_only = {k: v for k, v in RELEASE_PARAMS.items() if k != "vision_encoder"}
  with pytest.raises(ConfigError,
                     match="config.json describes a vision encoder and params.json does not"):
    config_formats.from_hub(RELEASE_CONFIG, text_only)


def test_writers_refuse_the_other_semantics():
  tiny = configs.resolve("tiny")
  with pytest.raises(ConfigError, match="config.json cannot hold vision.image_processor="
                     "'mistral_common'"):
    config_formats.to_hf(tiny.replace(softmax_scale_mode="hf_mscale_fold"))
  with pytest.raises(ConfigError, match="params.json cannot hold vision.projector_norm_eps=1e-06"):
    config_formats.to_params(as_transformers_reads(tiny))
  odd = as_transformers_reads(tiny.replace(softmax_scale_mode="hf_mscale_fold"))
  odd = odd.replace(vision=odd.vision.replace(projector_norm_eps=1e-3))
  with pytest.raises(ConfigError, match="config.json holds rms_norm_eps and "
                     "vision.projector_norm_eps in one field"):
    config_formats.to_hf(odd)


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=5), "vision.hidden_size=32 / num_heads=5 must be a whole head_dim"),
    (dict(num_heads=16), "divisible by 4"),
    (dict(image_size=20), "vision.image_size=20 is smaller than one image token"),
    (dict(image_processor="opencv"), "vision.image_processor='opencv'"),
    (dict(patch_size=0), "vision.patch_size must be a positive integer"),
])
def test_vision_config_checks(change, message):
  with pytest.raises(ConfigError, match=message):
    configs.resolve("tiny").vision.replace(**change)


def test_release_directory_records_its_preprocessing(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(RELEASE_CONFIG))
  assert configs.resolve(str(tmp_path)).vision.image_processor == "transformers"
  (tmp_path / "params.json").write_text(json.dumps(RELEASE_PARAMS))
  assert configs.resolve(str(tmp_path)).vision.image_processor == "mistral_common"
  assert "image_processor=mistral_common" in config_files.read_release_dir(
      str(tmp_path)).describe()
  assert isinstance(configs.resolve(str(tmp_path)).vision, VisionConfig)
