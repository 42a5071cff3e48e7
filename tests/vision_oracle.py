"""The multimodal oracle: transformers' Mistral3ForConditionalGeneration (a mistral4 text
model and a Pixtral tower) on CPU in float32, with spread weights, fed the same pixels."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import torch
from flax import nnx
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

from smallfour import sharding
from smallfour.config import formats as config_formats
from smallfour.checkpoint import assemble, keymap
from smallfour.config import TextConfig
from smallfour.nn import multimodal
from smallfour.nn.decoder import Transformer
from tests import oracle

IMG, IMG_BREAK, IMG_END = 10, 12, 13


def hf_config(text: dict[str, Any] | None = None, **vision: Any) -> Mistral3Config:
  """A tiny Mistral3Config: oracle.hf_config's text model and a 2-layer Pixtral tower
  (patch 4, 2×2 merge, longest edge 64)."""
  kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            patch_size=4, image_size=64, hidden_act="silu")
  kw.update(vision)
  return Mistral3Config(text_config=oracle.hf_config(**(text or {})).to_dict(),
                        vision_config=PixtralVisionConfig(**kw).to_dict(),
                        image_token_index=IMG, spatial_merge_size=2, tie_word_embeddings=False)


def our_config(config: Mistral3Config) -> TextConfig:
  return config_formats.from_hf(config.to_dict())


def hf_model(config: Mistral3Config, seed: int = 0) -> Mistral3ForConditionalGeneration:
  """Float32, eager attention, spread weights (oracle.spread_weights_; the patch
  convolution drawn with its true fan-in, C·p·p)."""
  config._attn_implementation = "eager"
  config.text_config._attn_implementation = "eager"
  config.vision_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = Mistral3ForConditionalGeneration(config).float().eval()
  oracle.spread_weights_(model, seed)
  conv = model.model.vision_tower.patch_conv.weight
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    conv.copy_(torch.randn(conv.shape, generator=gen) / conv[0].numel() ** 0.5)
  return model


def pixels(height: int, width: int, seed: int) -> np.ndarray:
  """A preprocessed-looking image [3, H, W]: smooth structure plus noise, about unit scale."""
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 3, height), np.linspace(0, 3, width), indexing="ij")
  base = np.stack([np.sin(x + y), np.cos(2 * x - y), np.sin(3 * y)])
  return (base + 0.5 * rng.standard_normal((3, height, width))).astype(np.float32)


def hf_pixels(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
  """(pixel_values [n, 3, Hmax, Wmax] zero-padded bottom/right, image_sizes [n, 2]), as
  transformers' processor batches them."""
  hmax = max(i.shape[1] for i in images)
  wmax = max(i.shape[2] for i in images)
  batch = np.zeros((len(images), 3, hmax, wmax), np.float32)
  for b, image in enumerate(images):
    batch[b, :, :image.shape[1], :image.shape[2]] = image
  sizes = [list(i.shape[1:]) for i in images]
  return torch.as_tensor(batch), torch.as_tensor(sizes)


def prompt(text: Sequence[Sequence[int]], images: Sequence[np.ndarray],
           cfg: TextConfig) -> list[int]:
  """`text[0]`, image 0's tokens, `text[1]`, ...: len(text) == len(images) + 1."""
  ids = list(text[0])
  for part, image in zip(text[1:], images):
    ids += multimodal.image_tokens(*multimodal.grid(image, cfg.vision), cfg.vision) + list(part)
  return ids


def logits(model: Mistral3ForConditionalGeneration, tokens: Sequence[Sequence[int]],
           images: Sequence[np.ndarray]) -> np.ndarray:
  kw = {}
  if images:
    kw["pixel_values"], kw["image_sizes"] = hf_pixels(images)
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(np.asarray(tokens)), **kw).logits.float().numpy()


def image_features(model: Mistral3ForConditionalGeneration,
                   images: Sequence[np.ndarray]) -> np.ndarray:
  """The projected rows of every image, concatenated: [M, D]."""
  values, sizes = hf_pixels(images)
  with torch.no_grad():
    out = model.model.get_image_features(pixel_values=values, image_sizes=sizes,
                                         return_dict=True)
  return torch.cat(out.pooler_output).numpy()


def encoder_output(model: Mistral3ForConditionalGeneration,
                   images: Sequence[np.ndarray]) -> np.ndarray:
  """The Pixtral tower's last layer over all images' patches: [N, Dv]."""
  values, sizes = hf_pixels(images)
  with torch.no_grad():
    return model.model.vision_tower(values, image_sizes=sizes).last_hidden_state[0].numpy()


def ours(hf: Mistral3ForConditionalGeneration | dict[str, np.ndarray], cfg: TextConfig,
         mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Our float32 Transformer (text and vision) holding a Mistral3 model's weights (or its
  `state_dict_numpy`) through the converter's key maps; placed on `mesh` if given."""
  tensors = hf if isinstance(hf, dict) else oracle.state_dict_numpy(hf)
  groups = [*keymap.hf_maps(cfg, "model.language_model"),
            *keymap.vision_maps(cfg, "model.vision_tower")]
  maps = [m for group in groups for m in group]
  assert {s for m in maps for s in m.sources} == set(tensors)  # every tensor used, none invented
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assemble.load_into(model, maps, assemble.DictSource(tensors))
  return model if mesh is None else sharding.place(model, mesh)
