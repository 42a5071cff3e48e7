"""Images for the prompt: loading with clear errors, and the two references' preprocessing.

Both references resize an image so each side is a multiple of patch × merge (28 px)
under the longest edge, composite transparency onto white, rescale by 1/255 and
normalise with the CLIP mean/std, and lay its tokens out as rows of [IMG] each ended by
[IMG_BREAK], the last by [IMG_END]. They differ in how (spec CHAT_FORMAT.md §2.5):

* "mistral_common": mistral-common's `ImageEncoder` (Mistral's request encoder, vLLM's
  Mistral format): `round` when downscaling, OpenCV bicubic on float32 RGB.
* "transformers": transformers 5.23's `PixtralImageProcessor` with its pillow backend:
  `floor` when downscaling, pillow bicubic on uint8 RGB. Reimplemented here (the runtime
  never imports transformers) and tested against it.

Which one a model uses is its config's `vision.image_processor`: the checkpoint's format
decides (params.json: Mistral's stack; config.json alone: transformers), as for the
softmax scale, and a flag may override it. Token layouts agree between the two except
when rounding lands on another multiple of 28; pixels differ by resampling.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import warnings
from typing import Sequence, Union

import numpy as np
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers import image as mistral_image
from PIL import Image

from smallfour.config import IMAGE_PROCESSORS, VisionConfig
from smallfour.nn import multimodal

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP, RGB
STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = Union[Image.Image, bytes, str, os.PathLike]
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class ImageError(ValueError):
  """An image that cannot be used; the message names it."""


def load(source: ImageSource, name: str = "image") -> Image.Image:
  """A decoded image from a PIL image, encoded bytes, a `data:` URL, a local path or a
  `file://` URL. Network URLs are refused (nothing is fetched). Raises ImageError naming
  `name` for a missing file, undecodable bytes, a decompression bomb (over pillow's
  MAX_IMAGE_PIXELS) or an image with no pixels."""
  if isinstance(source, Image.Image):
    image = source
  else:
    image = _decode(_read(source, name), name)
  if image.width == 0 or image.height == 0:
    raise ImageError(f"{name}: the image has no pixels ({image.width}×{image.height})")
  return image


def _read(source: bytes | str | os.PathLike, name: str) -> bytes:
  if isinstance(source, (bytes, bytearray)):
    return bytes(source)
  text = os.fspath(source)
  if text.startswith("data:"):
    header, comma, payload = text.partition(",")
    if not comma or not header.endswith(";base64"):
      raise ImageError(f"{name}: a data URL must be data:<type>;base64,<data>")
    try:
      return base64.b64decode(payload, validate=True)
    except binascii.Error:
      raise ImageError(f"{name}: the data URL's payload is not valid base64") from None
  if _SCHEME.match(text):
    if not text.startswith("file://"):
      raise ImageError(f"{name}: {text[:40]!r} is a network URL; images are not fetched "
                       "(give a local path or a data: URL)")
    text = text[len("file://"):]
  try:
    with open(text, "rb") as f:
      return f.read()
  except OSError as e:
    raise ImageError(f"{name}: cannot read {text} ({e.strerror})") from None


def _decode(data: bytes, name: str) -> Image.Image:
  with warnings.catch_warnings():
    # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above: both refused.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
      image = Image.open(io.BytesIO(data))
      image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise ImageError(f"{name}: not a decodable image ({e})") from None
  return image


def encode(image: Image.Image, cfg: VisionConfig, processor: str | None = None,
           name: str = "image") -> tuple[list[int], np.ndarray]:
  """A loaded image -> (its prompt tokens, its pixels [C, H, W] float32), by `processor`
  (default the config's: "mistral_common" or "transformers")."""
  processor = processor or cfg.image_processor
  if processor not in IMAGE_PROCESSORS:
    raise ValueError(f"image processor {processor!r}; expected one of {IMAGE_PROCESSORS}")
  if processor == "mistral_common":
    tokens, pixels = _mistral_common(image, cfg, name)
  else:
    pixels = transformers_pixels(image, cfg)
    tokens = multimodal.image_tokens(*multimodal.grid(pixels, cfg), cfg)
  return tokens, pixels


def _mistral_common(image: Image.Image, cfg: VisionConfig,
                    name: str) -> tuple[list[int], np.ndarray]:
  encoder = mistral_image.ImageEncoder(
      mistral_image.ImageConfig(cfg.patch_size, cfg.image_size, cfg.spatial_merge_size),
      mistral_image.SpecialImageIDs(cfg.image_token_id, cfg.image_break_token_id,
                                    cfg.image_end_token_id))
  try:
    encoding = encoder(ImageChunk(image=image))
  except ImportError as e:
    raise ImportError("mistral-common's image encoder needs OpenCV: pip install "
                      "'mistral-common[opencv]'") from e
  except (ValueError, OSError) as e:
    raise ImageError(f"{name}: mistral-common cannot encode it ({e})") from None
  return list(encoding.tokens), np.asarray(encoding.image, np.float32)


def transformers_size(height: int, width: int, cfg: VisionConfig) -> tuple[int, int]:
  """transformers' target (H, W): scaled by `floor` under the longest edge, then rounded
  up to multiples of patch × merge (at least one)."""
  ratio = max(height / cfg.image_size, width / cfg.image_size)
  if ratio > 1:
    height, width = math.floor(height / ratio), math.floor(width / ratio)
  step = cfg.merged_patch
  # transformers would make a 0-pixel side of an extreme aspect ratio; keep one token.
  return max(1, -(-height // step)) * step, max(1, -(-width // step)) * step


def transformers_pixels(image: Image.Image, cfg: VisionConfig) -> np.ndarray:
  """`PixtralImageProcessorPil` (transformers 5.23): RGB with alpha composited on white,
  pillow bicubic resize of the uint8 image, rescale in float64, normalise in float32."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image.convert("RGBA"))
  rgb = np.array(image.convert("RGB"))
  height, width = transformers_size(rgb.shape[0], rgb.shape[1], cfg)
  resized = np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))
  x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
  x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return np.ascontiguousarray(x.transpose(2, 0, 1))


def expand_placeholders(prompt: Sequence[int], image_tokens: Sequence[Sequence[int]],
                        cfg: VisionConfig) -> list[int]:
  """Raw prompt ids where each [IMG] id stands for one image -> the ids with each
  placeholder replaced by that image's tokens, in order. Raises ImageError when the
  placeholders and the images do not pair up."""
  placeholders = sum(int(t) == cfg.image_token_id for t in prompt)
  if placeholders != len(image_tokens):
    raise ImageError(f"the prompt has {placeholders} [IMG] placeholder(s) (id "
                     f"{cfg.image_token_id}) for {len(image_tokens)} image(s)")
  out, images = [], iter(image_tokens)
  for t in prompt:
    out.extend(next(images) if int(t) == cfg.image_token_id else [int(t)])
  return out
