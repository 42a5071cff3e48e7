"""Image loading and the two preprocessing paths, each against its own reference, on images
the test makes: 1×1, tall, wide, beyond the longest edge, RGBA, palette (with and without
transparency), grayscale, 16-bit. Bad images fail naming the image."""

import base64
import io

import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
from PIL import Image
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from smallfour import configs
from smallfour.chat import image_processing

# The release's geometry (patch 14 × merge 2 = 28 px) with a 112-px longest edge, so that
# small test images already go beyond it.
CFG = configs.resolve("tiny").vision.replace(image_size=112)


def smooth(height, width, channels=3, seed=0, dtype=np.uint8, top=255):
  """A photo-like image: gradients and blobs, a little noise."""
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  planes = [np.sin(3 * x + c) * np.cos(2 * y - c) for c in range(channels)]
  value = (np.stack(planes, -1) + 1) / 2 + 0.03 * rng.standard_normal((height, width, channels))
  return (np.clip(value, 0, 1) * top).astype(dtype).squeeze()


def palette(transparent: bool) -> Image.Image:
  image = Image.fromarray(smooth(60, 80, seed=3)).convert("P")
  if transparent:
    image.info["transparency"] = int(np.asarray(image)[0, 0])
  return image


IMAGES = {
    "1x1": lambda: Image.fromarray(smooth(1, 1)),
    "tall": lambda: Image.fromarray(smooth(90, 30, seed=1)),
    "wide": lambda: Image.fromarray(smooth(30, 100, seed=2)),
    "beyond the limit": lambda: Image.fromarray(smooth(150, 400, seed=4)),
    "RGBA": lambda: Image.fromarray(smooth(60, 80, 4, seed=5), "RGBA"),
    "palette": lambda: palette(False),
    "palette, transparent": lambda: palette(True),
    "grayscale": lambda: Image.fromarray(smooth(60, 80, 1, seed=6)),
    "16-bit": lambda: Image.fromarray(smooth(60, 80, 1, seed=7, dtype=np.uint16, top=65535)),
}


def transformers_reference(image):
  proc = PixtralImageProcessorPil(patch_size={"height": 28, "width": 28},
                                  size={"longest_edge": CFG.image_size})
  out = proc(images=[image], return_tensors="np")
  h, w = out["image_sizes"][0]
  return out["pixel_values"][0][:, :h, :w]


@pytest.mark.parametrize("kind", IMAGES)
def test_transformers_path_equals_its_processor(kind):
  image = IMAGES[kind]()
  tokens, pixels = image_processing.encode(image, CFG, "transformers")
  want = transformers_reference(image)
  np.testing.assert_array_equal(pixels, want)  # the same operations: bit for bit
  rows, cols = want.shape[1] // 28, want.shape[2] // 28
  assert tokens == ([10] * cols + [12]) * (rows - 1) + [10] * cols + [13]


@pytest.mark.parametrize("kind", IMAGES)
def test_mistral_common_path_equals_its_encoder(kind):
  """Equal to the image encoder of a tekken.json with this geometry, tokens and pixels."""
  image = IMAGES[kind]()
  tokens, pixels = image_processing.encode(image, CFG, "mistral_common")
  want = ImageEncoder(ImageConfig(14, 112, 2), SpecialImageIDs(10, 12, 13))(
      ImageChunk(image=image))
  assert tokens == want.tokens
  np.testing.assert_array_equal(pixels, want.image)


def test_the_two_paths_differ_as_stated():
  """Same layouts on these images; resampling (OpenCV on float32 vs pillow on uint8, both
  bicubic) moves normalised pixels by 0.04-0.38 here (0.38: the downscaled one; up to 2.4
  on pure noise), and a downscaled image may get another size: transformers floors,
  mistral-common rounds."""
  worst = 0.0
  for kind, make in IMAGES.items():
    image = make()
    t_tokens, t_pixels = image_processing.encode(image, CFG, "transformers")
    m_tokens, m_pixels = image_processing.encode(image, CFG, "mistral_common")
    assert t_tokens == m_tokens, kind
    worst = max(worst, float(np.abs(t_pixels - m_pixels).max()))
  assert 1e-3 < worst < 1.0, worst
  # 4620 × 1682 (W × H) scales by 1/3: the height 560.67 floors to 560 (20 rows) in
  # transformers and rounds to 561 (21 rows) in mistral-common.
  big = configs.resolve("small4_119b").vision
  assert image_processing.transformers_size(1682, 4620, big) == (20 * 28, 55 * 28)
  encoder = ImageEncoder(ImageConfig(14, 1540, 2), SpecialImageIDs(10, 12, 13))
  assert encoder._image_to_num_tokens(Image.new("RGB", (4620, 1682))) == (55, 21)


def test_over_the_limit_sizes():
  tall = image_processing.transformers_size(4000, 3000, configs.resolve("small4_119b").vision)
  assert tall == (1540, 1176)  # 3000 · 1540/4000 = 1155 → 42 rows of 28 px
  assert image_processing.transformers_size(10_000, 1, CFG) == (112, 28)  # never a 0-pixel side


def _png(image):
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def test_loads_paths_data_urls_and_bytes(tmp_path):
  image = Image.fromarray(smooth(20, 30))
  data = _png(image)
  (tmp_path / "a.png").write_bytes(data)
  url = "data:image/png;base64," + base64.b64encode(data).decode()
  for source in (str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}", url, data, image):
    np.testing.assert_array_equal(np.asarray(image_processing.load(source)), np.asarray(image))


@pytest.mark.parametrize("source, message", [
    (b"not an image", "photo.png: not a decodable image"),
    ("/no/such/file.png", r"photo.png: cannot read /no/such/file.png \(No such file"),
    ("https://example.com/cat.png", "photo.png: 'https://example.com/cat.png' is a network URL"),
    ("data:image/png;base64,!!!", "photo.png: the data URL's payload is not valid base64"),
    ("data:image/png,raw", "photo.png: a data URL must be data:<type>;base64,<data>"),
    (Image.new("RGB", (0, 5)), r"photo.png: the image has no pixels \(0×5\)"),
])
def test_bad_images_name_the_image(source, message):
  with pytest.raises(image_processing.ImageError, match=message):
    image_processing.load(source, "photo.png")


def test_decompression_bomb_is_refused(monkeypatch):
  data = _png(Image.new("RGB", (64, 64)))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit
  with pytest.raises(image_processing.ImageError,
                     match="bomb.png: refused as a decompression bomb"):
    image_processing.load(data, "bomb.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1× and 2×: pillow only warns
  with pytest.raises(image_processing.ImageError, match="refused as a decompression bomb"):
    image_processing.load(data, "bomb.png")


def test_placeholders_pair_with_images():
  layouts = [[10, 13], [10, 10, 13]]
  expand = image_processing.expand_placeholders
  assert expand([1, 10, 5, 10], layouts, CFG) == [1, 10, 13, 5, 10, 10, 13]
  with pytest.raises(image_processing.ImageError,
                     match=r"2 \[IMG\] placeholder\(s\) \(id 10\) for 1"):
    expand([1, 10, 10], layouts[:1], CFG)
  with pytest.raises(image_processing.ImageError,
                     match=r"0 \[IMG\] placeholder\(s\) \(id 10\) for 2"):
    expand([1, 5], layouts, CFG)
