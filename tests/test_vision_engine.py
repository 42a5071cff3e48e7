"""The engine with images: bad image requests fail before any computation, name the prompt
and image, and leave the engine usable; packed images compile few shapes."""

import numpy as np
import pytest
from flax import nnx

from smallfour import configs
from smallfour.inference import paged
from smallfour.inference.engine import Engine, RequestError
from smallfour.nn import multimodal
from smallfour.nn.decoder import Transformer


@pytest.fixture(scope="module")
def engine():
  return Engine(Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0)), max_len=64)


def image(rows, cols, seed=0):
  return np.random.default_rng(seed).standard_normal((3, 28 * rows, 28 * cols)).astype(
      np.float32)


def prompt_for(*grids):
  vision = configs.resolve("tiny").vision
  ids = [1, 3]
  for r, c in grids:
    ids += multimodal.image_tokens(r, c, vision) + [100]
  return ids


@pytest.mark.parametrize("prompts, images, message", [
    ([prompt_for((1, 2))], [[image(1, 2), image(1, 1)]],
     r"prompt 0 has 2 \[IMG\] tokens but its 2 image\(s\) make 3 image tokens"),
    ([[1, 3, 100], prompt_for((2, 1))], [[], [image(1, 3)]],
     r"prompt 1 has 2 \[IMG\] tokens but its 1 image\(s\) make 3"),
    ([prompt_for((1, 1))], [[np.zeros((3, 30, 28), np.float32)]],
     r"prompt 0, image 0: a preprocessed image is \[3, H, W\] with H and W positive multiples "
     r"of 28; got \[3, 30, 28\]"),
    ([prompt_for((1, 1))], [[np.zeros((28, 28), np.float32)]],
     r"prompt 0, image 0: .* got \[28, 28\]"),
    ([prompt_for((1, 1))], [[image(1, 1)], [image(1, 1)]], "2 image lists for 1 prompts"),
])
def test_bad_image_requests_leave_the_engine_usable(engine, prompts, images, message):
  with pytest.raises(RequestError, match=message):
    engine.generate(prompts, 2, images=images)
  ids = prompt_for((1, 2), (2, 1))
  out = engine.generate([ids], 2, images=[[image(1, 2), image(2, 1)]])
  assert len(out[0]) == 2


def test_text_model_refuses_images():
  cfg = configs.resolve("tiny").replace(vision=None)
  engine = Engine(Transformer(cfg, rngs=nnx.Rngs(0)), max_len=32)
  with pytest.raises(RequestError, match="prompt 0 has images, but the model has no vision"):
    engine.generate([prompt_for((1, 1))], 1, images=[[image(1, 1)]])


def test_images_and_their_rows_equal_teacher_forcing(engine):
  """A paged prompt pass with images (patches padded to a bucket) gives the teacher-forced
  logits."""
  ids = prompt_for((2, 2), (1, 3))
  pixels = [image(2, 2, seed=1), image(1, 3, seed=2)]
  model = nnx.merge(engine.paged.graphdef, engine.paged.state)
  size = paged.bucket(len(ids), engine.page_size)
  tokens = np.zeros((1, size), np.int32)
  tokens[0, :len(ids)] = ids
  table = np.arange(size // engine.page_size, dtype=np.int32)[None]
  logits, _ = paged.forward(model, engine.paged.zeros(), tokens, np.arange(size)[None], table,
                            np.asarray([len(ids) - 1]), engine.paged.encode(pixels))
  forced = model(np.asarray([ids]), images=multimodal.pack(pixels, engine.cfg.vision))
  np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(forced)[0, -1], atol=1e-5,
                             rtol=0)


def test_images_split_over_prompt_chunks_give_the_same_answer():
  """With a 16-token budget the two images' tokens arrive over several chunks."""
  model = Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))
  ids = prompt_for((2, 2), (1, 3))
  pixels = [[image(2, 2, seed=1), image(1, 3, seed=2)]]
  whole = Engine(model, max_len=64, max_batch=1).generate([ids], 4, images=pixels)
  chunked = Engine(model, max_len=64, max_batch=1, page_size=4, max_num_batched_tokens=8)
  assert chunked.generate([ids], 4, images=pixels) == whole
