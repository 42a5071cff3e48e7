"""Chat requests with images: ids and pixels equal mistral-common's own encoding; the
transformers processor relays each image's tokens; bad image parts name the culprit."""

import base64
import io

import numpy as np
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from smallfour import configs
from smallfour.chat import image_processing
from smallfour.chat import ChatRequestError, ChatTokenizer
from smallfour.chat.images import encode_with_images

VISION = configs.resolve("tiny").vision


def png(height, width, seed=0):
  image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3),
                                                              dtype=np.uint8))
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def data_url(data):
  return "data:image/png;base64," + base64.b64encode(data).decode()


def part(url):
  return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def tok():
  return ChatTokenizer.builtin()


def test_ids_and_pixels_equal_mistral_commons(tok, tmp_path):
  (tmp_path / "b.png").write_bytes(png(100, 30, seed=2))
  request = {"messages": [
      {"role": "system", "content": "Look closely."},
      {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                   part(data_url(png(40, 60, seed=1))),
                                   {"type": "text", "text": "with"},
                                   part(str(tmp_path / "b.png"))]},
      {"role": "assistant", "content": "Done."},
      {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                   {"type": "image_url", "image_url": data_url(png(50, 50))}]},
  ], "reasoning_effort": "high"}
  ids, pixels = encode_with_images(tok, request, VISION)
  as_urls = [dict(m) for m in request["messages"]]
  as_urls[1] = {**as_urls[1], "content": [*as_urls[1]["content"][:3],
                                           part(data_url(png(100, 30, seed=2)))]}
  want = tok.mistral.encode_chat_completion(ChatCompletionRequest.from_openai(
      as_urls, reasoning_effort="high"))
  assert ids == list(want.tokens)
  assert len(pixels) == len(want.images) == 3
  for got, expected in zip(pixels, want.images):
    np.testing.assert_array_equal(got, expected)
  assert sum(t == VISION.image_end_token_id for t in ids) == 3


def test_transformers_processor_lays_out_its_own_tokens(tok):
  """4620 × 1682: transformers floors the height to 560 px (20 rows), mistral-common rounds
  to 561 (21 rows); with the transformers processor both tokens and pixels are its."""
  request = {"messages": [{"role": "user", "content": [
      {"type": "text", "text": "Hi"}, part(data_url(png(1682, 4620)))]}]}
  mc_ids, mc_pixels = encode_with_images(tok, request, VISION)
  hf_ids, hf_pixels = encode_with_images(tok, request, VISION, "transformers")
  assert mc_pixels[0].shape == (3, 21 * 28, 55 * 28)
  assert hf_pixels[0].shape == (3, 20 * 28, 55 * 28)
  assert len(mc_ids) - len(hf_ids) == 56  # one row of 55 [IMG] and its break
  image = image_processing.load(data_url(png(1682, 4620)))
  np.testing.assert_array_equal(hf_pixels[0], image_processing.transformers_pixels(image, VISION))


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": [part("https://example.com/x.png")]}],
     r"messages\[0\].content\[0\]: 'https://example.com/x.png' is a network URL"),
    ([{"role": "user", "content": [part("/no/such.png")]}],
     r"messages\[0\].content\[0\]: cannot read /no/such.png"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}, part("data:image/png;base64,"
                                                                      "aGVsbG8=")]}],
     r"messages\[0\].content\[1\]: not a decodable image"),
    ([{"role": "system", "content": [part(data_url(png(8, 8)))]},
      {"role": "user", "content": "hi"}],
     r"messages\[0\].content\[0\]: images go in user and tool messages, not 'system'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}],
     r"messages\[0\].content\[0\]: expected"),
    ([{"role": "assistant", "content": "hi"}], r"messages\[0\].role: a conversation starts"),
])
def test_bad_image_parts_name_the_culprit(tok, messages, message):
  with pytest.raises(ChatRequestError, match=message):
    encode_with_images(tok, {"messages": messages}, VISION)


def test_tokenizer_must_match_the_models_images(tok):
  request = {"messages": [{"role": "user", "content": [part(data_url(png(8, 8)))]}]}
  with pytest.raises(ChatRequestError, match=r"are not the model's \(16, 1540, 2"):
    encode_with_images(tok, request, VISION.replace(patch_size=16))
