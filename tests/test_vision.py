"""The Pixtral encoder, the projector and the scatter against transformers' Mistral3, layer by
layer, in float32 with spread weights and identical pixels on both sides."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smallfour import sharding
from smallfour.checkpoint import assemble, keymap
from smallfour.nn import multimodal, vision
from tests import oracle, vision_oracle

ATOL = 1e-4
# (height, width) in pixels, multiples of patch 4 × merge 2: square, wide, tall, one token.
SIZES = [(16, 16), (8, 24), (32, 16), (8, 8)]


@pytest.fixture(scope="module")
def reference():
  config = vision_oracle.hf_config()
  model = vision_oracle.hf_model(config, seed=3)
  cfg = vision_oracle.our_config(config)
  path = multimodal.VisionPath(cfg.vision, cfg.hidden_size, rngs=nnx.Rngs(0),
                               param_dtype=jnp.float32)
  tensors = oracle.state_dict_numpy(model)
  # The model holds the vision path under "vision"; here it stands alone.
  maps = [dataclasses.replace(m, path=m.path[1:])
          for group in keymap.vision_maps(cfg, "model.vision_tower") for m in group]
  assemble.load_into(path, maps, assemble.DictSource(tensors))
  return cfg, model, path


@nnx.jit
def run_path(path, batch):
  return path(batch)


@nnx.jit
def run_encoder(path, batch):
  return path.encoder(batch.patches, batch.rows, batch.cols, batch.segments)


def images_of(sizes, seed=0):
  return [vision_oracle.pixels(h, w, seed + i) for i, (h, w) in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [SIZES[:1], SIZES[1:2], SIZES[2:3], SIZES],
                         ids=["square", "wide", "tall", "four"])
def test_encoder_and_projector_equal_transformers(reference, sizes):
  cfg, model, path = reference
  images = images_of(sizes)
  batch = multimodal.pack(images, cfg.vision)
  ours = np.asarray(run_encoder(path, batch))
  want = vision_oracle.encoder_output(model, images)
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)
  assert np.abs(want).max() > 1.0  # not a vanishing signal
  rows = np.asarray(run_path(path, batch))
  np.testing.assert_allclose(rows, vision_oracle.image_features(model, images), atol=ATOL,
                             rtol=0)


def test_images_never_attend_to_each_other(reference):
  """Packed together, two images of different sizes and aspect ratios give exactly what
  each gives alone, and padding patches change nothing."""
  cfg, _, path = reference
  images = images_of([(16, 24), (32, 8)], seed=7)
  together = np.asarray(run_path(path, multimodal.pack(images, cfg.vision, pad_to=64)))
  alone = [np.asarray(run_path(path, multimodal.pack([i], cfg.vision))) for i in images]
  np.testing.assert_allclose(together[:len(alone[0]) + len(alone[1])],
                             np.concatenate(alone), atol=1e-5, rtol=0)
  # The first image's rows do depend on its own pixels.
  changed = [images[0] + 1.0, images[1]]
  moved = np.asarray(run_path(path, multimodal.pack(changed, cfg.vision, pad_to=64)))
  assert np.abs(moved[:6] - together[:6]).max() > 1e-2
  np.testing.assert_allclose(moved[6:10], together[6:10], atol=1e-5, rtol=0)


def test_query_blocks_equal_one_block(reference, monkeypatch):
  cfg, _, path = reference
  batch = multimodal.pack(images_of([(32, 32), (16, 32)]), cfg.vision, pad_to=128)
  whole = np.asarray(run_encoder(path, batch))
  monkeypatch.setattr(vision, "QUERY_BLOCK", 32)
  blocked = np.asarray(nnx.jit(lambda p, b: p.encoder(b.patches, b.rows, b.cols,
                                                      b.segments))(path, batch))
  np.testing.assert_allclose(blocked, whole, atol=1e-5, rtol=0)


def test_pack_layout():
  cfg = vision_oracle.our_config(vision_oracle.hf_config()).vision
  image = np.arange(3 * 8 * 16, dtype=np.float32).reshape(3, 8, 16)
  batch = multimodal.pack([image], cfg, pad_to=12)
  # 2×4 patches of 4 px; patch (r, c) holds channel-major pixels of its 4×4 square.
  assert batch.patches.shape == (12, 48)
  np.testing.assert_array_equal(batch.patches[5].reshape(3, 4, 4), image[:, 4:8, 4:8])
  np.testing.assert_array_equal(batch.rows[:8], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(batch.cols[:8], [0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(batch.segments, [0] * 8 + [1] * 4)
  # One row of two tokens: patches (0,0),(0,1),(1,0),(1,1) then (0,2),(0,3),(1,2),(1,3).
  np.testing.assert_array_equal(batch.merge_index[:2], [[0, 1, 4, 5], [2, 3, 6, 7]])
  assert multimodal.image_tokens(2, 3, cfg) == [10, 10, 10, 12, 10, 10, 10, 13]
  assert multimodal.image_tokens(1, 1, cfg) == [10, 13]
  with pytest.raises(ValueError, match=r"multiples of 8; got \[3, 12, 16\]"):
    multimodal.pack([np.zeros((3, 12, 16), np.float32)], cfg)
  with pytest.raises(ValueError, match="pad_to=6 must be a multiple of 4 holding 8 patches"):
    multimodal.pack([image], cfg, pad_to=6)


def test_merge_scatters_in_flattened_order():
  h = jnp.zeros((2, 4, 3))
  tokens = jnp.array([[1, 10, 10, 2], [10, 5, 10, 10]])
  rows = jnp.arange(1, 8, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
  out = np.asarray(multimodal.merge(h, tokens, rows, 10))[..., 0]
  np.testing.assert_array_equal(out, [[0, 1, 2, 0], [3, 0, 4, 5]])


def test_vision_parameters_resolve_replicated():
  cfg = vision_oracle.our_config(vision_oracle.hf_config())
  path = nnx.eval_shape(lambda: multimodal.VisionPath(cfg.vision, cfg.hidden_size,
                                                      rngs=nnx.Rngs(0),
                                                      param_dtype=jnp.float32))
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  for path_, s in nnx.to_flat_state(sharding.named_shardings(nnx.state(path, nnx.Param), mesh)):
    spec = s.get_value().spec
    if path_[-1] == "linear_2":  # its output is the text width: `embed`, replicated too
      assert spec == jax.sharding.PartitionSpec(None, None)
    assert all(a is None for a in spec), (path_, spec)
