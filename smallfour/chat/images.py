"""Chat requests with images: OpenAI `image_url` parts -> prompt ids and pixels.

    ids, pixels = encode_with_images(tok, request, cfg.vision)
    engine.generate([ids], n, images=[pixels])

Each image part of a user or tool message (`{"type": "image_url", "image_url": {"url":
...}}` or `"image_url": "..."`) is loaded here (`image_processing.load`: data URLs and
local paths; network URLs refused), then mistral-common encodes the request with the
loaded images (its v15 rules: images only in user and tool turns, a lone trailing image
moved to the front). Pixels and image tokens follow the model's image processor: with
"transformers", each image's token block is laid out again from transformers' size rule
and its pixels are transformers', so that prompt and pixels come from one rule.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, ImageURLChunk
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from smallfour.chat import checks, image_processing
from smallfour.chat.checks import ChatRequestError
from smallfour.chat.tokenizer import ChatTokenizer
from smallfour.config import VisionConfig

_IMAGE_PARTS = ("image_url", "image")


def encode_with_images(tok: ChatTokenizer, request: dict[str, Any], vision: VisionConfig,
                       processor: str | None = None) -> tuple[list[int], list[np.ndarray]]:
  """An OpenAI-style request with images -> (prompt ids, each image's pixels [C, H, W] in
  prompt order); raises ChatRequestError naming the message, part or image."""
  if not isinstance(request, dict):
    raise ChatRequestError(f"a request is a JSON object, got {type(request).__name__}")
  messages, loaded = _split_images(request.get("messages"))
  _check_tokenizer(tok, vision)
  checked = checks.checked_messages(_without_images(messages))
  # The checks flatten assistant content only: user and tool parts keep their places.
  checked = [{**c, "content": m["content"]} if m.get("role") in ("user", "tool") else c
             for m, c in zip(messages, checked)]
  tools = checks.checked_tools(request.get("tools"))
  effort = request.get("reasoning_effort")
  if effort is not None and effort not in tok.reasoning_efforts:
    allowed = ", ".join(repr(v) for v in tok.reasoning_efforts)
    raise ChatRequestError(f"reasoning_effort: {effort!r} is not one of {allowed}")
  try:
    parsed = ChatCompletionRequest.from_openai(checked, tools=tools, reasoning_effort=effort)
    for message in parsed.messages:
      if isinstance(message.content, list):
        message.content = [ImageChunk(image=loaded[int(c.get_url())])
                           if isinstance(c, ImageURLChunk) else c for c in message.content]
    encoded = tok.mistral.encode_chat_completion(parsed)
  except (MistralCommonException, ValueError, KeyError, TypeError, AssertionError) as e:
    raise ChatRequestError(f"mistral-common rejected the request: {checks.one_line(e)}") from e
  ids, pixels = list(encoded.tokens), [np.asarray(p, np.float32) for p in encoded.images]
  if (processor or vision.image_processor) == "transformers":
    # Images keep their order in the prompt (only a message's lone image ever moves).
    ids, pixels = _as_transformers(ids, loaded, vision)
  return ids, pixels


def _split_images(messages: Any) -> tuple[Any, list]:
  """The messages with each image part's URL replaced by its index into the loaded
  images (mistral-common keeps an image_url chunk unread until encoding)."""
  if not isinstance(messages, list):
    return messages, []
  out, loaded = copy.copy(messages), []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
      continue
    content = []
    for j, part in enumerate(m["content"]):
      kind = part.get("type") if isinstance(part, dict) else None
      if kind in _IMAGE_PARTS:
        where = f"messages[{i}].content[{j}]"
        if m.get("role") not in ("user", "tool"):
          raise ChatRequestError(f"{where}: images go in user and tool messages, not "
                                 f"{m.get('role')!r} ones")
        try:
          loaded.append(image_processing.load(_url(part, where), where))
        except image_processing.ImageError as e:
          raise ChatRequestError(str(e)) from None
        part = {"type": "image_url", "image_url": {"url": str(len(loaded) - 1)}}
      content.append(part)
    out[i] = {**m, "content": content}
  return out, loaded


def _url(part: dict, where: str) -> str:
  value = part.get(part["type"])
  url = value.get("url") if isinstance(value, dict) else value
  if not isinstance(url, str):
    raise ChatRequestError(f'{where}: expected {{"type": "image_url", "image_url": {{"url": '
                           '"data:... or a local path"}}')
  return url


def _without_images(messages: Any) -> Any:
  """For the text checks, which know text chunks only: images as empty text chunks."""
  if not isinstance(messages, list):
    return messages
  return [{**m, "content": [{"type": "text", "text": ""} if isinstance(p, dict) and p.get(
      "type") == "image_url" else p for p in m["content"]]}
          if isinstance(m, dict) and isinstance(m.get("content"), list) else m
          for m in messages]


def _check_tokenizer(tok: ChatTokenizer, vision: VisionConfig) -> None:
  encoder = tok.mistral.instruct_tokenizer.image_encoder
  if encoder is None:
    raise ChatRequestError(f"tokenizer {tok.path} has no image encoder (no 'image' section)")
  got = (encoder.image_config.image_patch_size, encoder.image_config.max_image_size,
         encoder.image_config.spatial_merge_size, encoder.special_ids.img,
         encoder.special_ids.img_break, encoder.special_ids.img_end)
  want = (vision.patch_size, vision.image_size, vision.spatial_merge_size,
          vision.image_token_id, vision.image_break_token_id, vision.image_end_token_id)
  if got != want:
    raise ChatRequestError(f"tokenizer {tok.path}'s images (patch, longest edge, merge, ids "
                           f"{got}) are not the model's {want}")


def _as_transformers(ids: list[int], loaded: list, vision: VisionConfig
                     ) -> tuple[list[int], list[np.ndarray]]:
  """mistral-common's ids with each image's token block laid out by transformers' rule,
  and transformers' pixels."""
  out, pixels, k, i = [], [], 0, 0
  block = (vision.image_token_id, vision.image_break_token_id)
  while i < len(ids):
    if ids[i] not in block:
      out.append(ids[i])
      i += 1
      continue
    while ids[i] != vision.image_end_token_id:
      i += 1
    tokens, image = image_processing.encode(loaded[k], vision, "transformers")
    out += tokens
    pixels.append(image)
    i, k = i + 1, k + 1
  return out, pixels
