"""Converting a multimodal checkpoint: the vision tower and projector travel with the text
model (HF names on disk and in memory, native names with permuted q/k), and the restored
model reproduces transformers' logits with images in the prompt."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from smallfour.checkpoint import convert as convert_lib
from smallfour.checkpoint import restore as restore_lib
from smallfour.nn import multimodal
from tests import checkpoints, oracle, vision_oracle

IMAGES = [vision_oracle.pixels(16, 24, seed=1), vision_oracle.pixels(32, 8, seed=2)]


@pytest.fixture(scope="module")
def reference():
  config = vision_oracle.hf_config()
  model = vision_oracle.hf_model(config, seed=5)
  return config, model, oracle.state_dict_numpy(model)


@nnx.jit
def forward(model, tokens, images):
  return model(tokens, images=images)


def prompt(cfg):
  rng = np.random.default_rng(0)
  text = [[1, 3, *rng.integers(14, 256, 6)], list(rng.integers(14, 256, 4)),
          list(rng.integers(14, 256, 30))]  # 30 more: past original_max=32
  return [vision_oracle.prompt(text, IMAGES, cfg)]


def check_logits(ckpt, hf_model):
  model = restore_lib.restore_model(ckpt)
  tokens = prompt(model.cfg)
  got = np.asarray(forward(model, jnp.asarray(tokens), multimodal.pack(IMAGES, model.cfg.vision)))
  np.testing.assert_allclose(got, vision_oracle.logits(hf_model, tokens, IMAGES), atol=1e-4,
                             rtol=0)


def test_hf_disk_layout_round_trip(reference, tmp_path, caplog):
  config, model, tensors = reference
  checkpoints.write_mistral3_disk(str(tmp_path / "hf"), config, tensors)
  with caplog.at_level(logging.INFO):
    convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "out"), dtype="float32",
                        progress=False)
  assert "image_processor=transformers" in caplog.text
  meta = restore_lib.read_metadata(str(tmp_path / "out"))
  assert meta["text"]["vision"]["image_processor"] == "transformers"
  check_logits(str(tmp_path / "out"), model)
  # The flag overrides what the format implies; a text-only source has nothing to override.
  with caplog.at_level(logging.INFO):
    convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "mc"), dtype="float32",
                        image_processor="mistral_common", progress=False)
  assert "--image_processor=mistral_common overrides it" in caplog.text
  meta = restore_lib.read_metadata(str(tmp_path / "mc"))
  assert meta["text"]["vision"]["image_processor"] == "mistral_common"
  with pytest.raises(convert_lib.CheckpointError, match="--image_processor='pillow'"):
    convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "bad"), image_processor="pillow",
                        progress=False)


def test_save_pretrained_round_trip(reference, tmp_path):
  config, model, _ = reference
  model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
  convert_lib.convert(str(tmp_path / "hf"), str(tmp_path / "out"), dtype="float32",
                      progress=False)
  check_logits(str(tmp_path / "out"), model)


def test_native_round_trip(reference, tmp_path, caplog):
  """FP8 text, bf16 vision with q/k rows in the native pair layout; read with Mistral's
  semantics: plain softmax scale, projector norm eps 1e-5, mistral-common's images."""
  config, _, tensors = reference
  held = checkpoints.write_native_multimodal(str(tmp_path / "native"), config, tensors)
  native = vision_oracle.hf_model(config)
  native.load_state_dict({k: torch.as_tensor(v) for k, v in held.items()})
  for layer in native.model.language_model.layers:
    layer.self_attn.scaling = layer.self_attn.qk_head_dim ** -0.5
  native.model.multi_modal_projector.norm.variance_epsilon = 1e-5
  with caplog.at_level(logging.INFO):
    convert_lib.convert(str(tmp_path / "native"), str(tmp_path / "out"), dtype="float32",
                        progress=False)
  assert "softmax_scale_mode=plain" in caplog.text
  assert "image_processor=mistral_common" in caplog.text
  check_logits(str(tmp_path / "out"), native)


def test_text_only_config_skips_vision_tensors(reference, tmp_path, caplog):
  """A checkpoint whose config describes no vision encoder converts its text model and
  says what it left out."""
  config, model, tensors = reference
  checkpoints.write_mistral3_disk(str(tmp_path / "hf"), config, tensors)
  text_only = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
  (tmp_path / "hf" / "config.json").write_text(json.dumps(text_only))
  renamed = tmp_path / "hf"
  index = json.loads((renamed / "model.safetensors.index.json").read_text())
  assert any(k.startswith("language_model.") for k in index["weight_map"])
  with caplog.at_level(logging.WARNING):
    convert_lib.convert(str(renamed), str(tmp_path / "out"), dtype="float32", progress=False)
  assert "vision tensors are not converted: the config describes no vision encoder" in (
      caplog.text)
  restored = restore_lib.restore_model(str(tmp_path / "out"))
  assert restored.vision is None
  tokens = np.asarray([[1, *np.random.default_rng(1).integers(14, 256, 20)]])
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(restored, jnp.asarray(tokens))),
                             vision_oracle.logits(model, tokens, []), atol=1e-4, rtol=0)
