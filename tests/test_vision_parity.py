"""End to end: our Transformer with its vision path equals transformers'
Mistral3ForConditionalGeneration (mistral4 text, Pixtral tower): logits with images in the
prompt, text only through the same model, and greedy generation."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from smallfour.inference.engine import Engine
from smallfour.nn import multimodal
from tests import oracle, vision_oracle

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
  config = vision_oracle.hf_config()
  model = vision_oracle.hf_model(config, seed=11)
  cfg = vision_oracle.our_config(config)
  return cfg, model, vision_oracle.ours(model, cfg)


@nnx.jit
def forward(model, tokens, images):
  return model(tokens, images=images)


def text(seed, n):
  return list(np.random.default_rng(seed).integers(14, 256, n))


CASES = {
    "one image": ([(16, 24)], 1),
    "two images, different sizes and aspect ratios": ([(32, 8), (16, 40)], 1),
    # (An image of one token is left out: transformers 5.23 squeezes its [1, D] features
    # to [D] in get_image_features and fails.)
    "two rows, one image each": ([(16, 16), (8, 40)], 2),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_with_images(reference, case):
  cfg, model, ours = reference
  sizes, batch = CASES[case]
  images = [vision_oracle.pixels(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
  per_row = len(images) // batch
  rows = [vision_oracle.prompt([[1, 3] + text(r, 5)] + [text(10 * r + j, 3)
                                                         for j in range(per_row)],
                               images[r * per_row:(r + 1) * per_row], cfg)
          for r in range(batch)]
  assert len({len(r) for r in rows}) == 1, "rows of one batch must be equally long"
  want = vision_oracle.logits(model, rows, images)
  got = np.asarray(forward(ours, jnp.asarray(rows), multimodal.pack(images, cfg.vision)))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # The images matter: without them the [IMG] positions' logits move.
  plain = vision_oracle.logits(model, rows, [])
  assert np.abs(plain - want).max() > 1e-2


def test_text_only_through_the_multimodal_model(reference):
  cfg, model, ours = reference
  tokens = np.asarray([[1] + text(3, 40), [1] + text(4, 40)])
  want = vision_oracle.logits(model, tokens, [])
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(ours, jnp.asarray(tokens))),
                             want, atol=ATOL, rtol=0)


def test_greedy_generation_with_images_equals_transformers(reference):
  """Two images in one prompt; prefill writes their rows, decode reads them from the cache."""
  cfg, model, ours = reference
  images = [vision_oracle.pixels(24, 16, seed=5), vision_oracle.pixels(8, 32, seed=6)]
  tokens = vision_oracle.prompt([[1, 3] + text(7, 4), text(8, 3), text(9, 5)], images, cfg)
  values, sizes = vision_oracle.hf_pixels(images)
  with torch.no_grad():
    out = model.generate(input_ids=torch.as_tensor([tokens]), pixel_values=values,
                         image_sizes=sizes, max_new_tokens=12, do_sample=False,
                         attention_mask=torch.ones(1, len(tokens), dtype=torch.long))
  want = out[0, len(tokens):].tolist()
  teacher = vision_oracle.logits(model, [tokens + want[:-1]], images)[0, len(tokens) - 1:]
  oracle.assert_clear_winners(teacher, want)
  engine = Engine(ours, max_len=64)
  assert engine.generate([tokens], 12, images=[images]) == [want]
  streamed = [step[0] for step in engine.stream([tokens], 12, images=[images])]
  assert streamed == want
