"""The OpenAI chat-completions wire format: request bodies in, responses and errors out.

A body is split into what changes the prompt (messages, tools, reasoning_effort: the chat
encoder's, which names a bad message itself) and how to generate (`Params`). Fields that
would need what the engine does not do (n > 1, logprobs, penalties, logit bias, constrained
decoding) are refused with a 400 naming them rather than silently ignored.

Sampling defaults follow the model card (`sampling.BY_REASONING_EFFORT`): greedy with
reasoning_effort "none", temperature 0.7 with "high"; top_p 1 and no top_k either way.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any

from smallfour.inference.sampling import BY_REASONING_EFFORT, Sampling

MAX_STOP = 4
# Keys that change the prompt; the encoder checks them.
CHAT_KEYS = ("messages", "tools", "reasoning_effort")
# Accepted when they ask for what the engine does anyway.
NEUTRAL = {"n": (1,), "logprobs": (False,), "presence_penalty": (0, 0.0),
           "frequency_penalty": (0, 0.0), "logit_bias": ({},), "tool_choice": ("auto",),
           "response_format": ({"type": "text"},), "parallel_tool_calls": (True,)}


class ApiError(Exception):
  """An OpenAI-shaped error: HTTP `status`, `message` and the `param` at fault."""

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                   kind, code)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}


def bad_request(message: str) -> ApiError:
  """A 400 whose `param` is the field the message starts with ("messages[2].role: ...")."""
  culprit = re.match(r"([A-Za-z_]\w*(?:\[\d+\]|\.\w+)*): ", message)
  return ApiError(400, message, culprit.group(1) if culprit else None)


@dataclasses.dataclass(frozen=True)
class Params:
  """How to generate one answer."""

  sampling: Sampling
  max_tokens: int | None  # None: as many as the cache holds
  seed: int | None  # None: a fresh one per request
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool


def split(body: Any) -> tuple[dict, Params]:
  """A request body -> (the chat request for the encoder, Params); raises ApiError."""
  if not isinstance(body, dict):
    raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
  for key, allowed in NEUTRAL.items():
    if key in body and body[key] is not None and body[key] not in allowed:
      raise ApiError(400, f"{key}: {body[key]!r} is not supported (only {allowed[0]!r})", key)
  default = BY_REASONING_EFFORT.get(body.get("reasoning_effort"), Sampling())
  temperature = _number(body, "temperature", default.temperature, 0.0, 2.0)
  top_p = _number(body, "top_p", default.top_p, 0.0, 1.0)
  if top_p == 0:
    raise ApiError(400, "top_p: must lie in (0, 1]", "top_p")
  top_k = _integer(body, "top_k", 0, -1)
  stream = body.get("stream") or False
  if not isinstance(stream, bool):
    raise ApiError(400, f"stream: expected a boolean, got {stream!r}", "stream")
  options = body.get("stream_options") or {}
  if not isinstance(options, dict) or (options and not stream):
    raise ApiError(400, "stream_options: an object, only with stream", "stream_options")
  params = Params(
      sampling=Sampling(temperature, max(top_k, 0), top_p),
      max_tokens=_max_tokens(body), seed=_integer(body, "seed", None, 0, 2**32 - 1),
      stop=_stop(body.get("stop")), stream=stream,
      include_usage=bool(options.get("include_usage")))
  return {k: body[k] for k in CHAT_KEYS if k in body}, params


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
    raise ApiError(400, f"{key}: expected a number in [{lo}, {hi}], got {value!r}", key)
  return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None
             ) -> int | None:
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
      hi is not None and value > hi):
    upper = f", at most {hi}" if hi is not None else ""
    raise ApiError(400, f"{key}: expected an integer of at least {lo}{upper}, got {value!r}",
                   key)
  return value


def _max_tokens(body: dict) -> int | None:
  for key in ("max_completion_tokens", "max_tokens"):
    value = _integer(body, key, None, 1)
    if value is not None:
      return value
  return None


def _stop(stop: Any) -> tuple[str, ...]:
  stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
  if (not isinstance(stops, list) or len(stops) > MAX_STOP
      or not all(isinstance(s, str) and s for s in stops)):
    raise ApiError(400, f"stop: expected a non-empty string or a list of at most {MAX_STOP}, "
                   f"got {stop!r}", "stop")
  return tuple(stops)


def max_new_tokens(params: Params, prompt_tokens: int, max_len: int) -> int:
  """The tokens this request may generate: each but the last is fed back into the cache."""
  room = max_len - prompt_tokens + 1
  if room < 1:
    raise ApiError(400, f"messages: the prompt has {prompt_tokens} tokens; the server's "
                   f"context holds {max_len}", "messages")
  if params.max_tokens is not None and params.max_tokens > room:
    raise ApiError(400, f"max_tokens: {params.max_tokens} new tokens do not fit after a "
                   f"{prompt_tokens}-token prompt in a {max_len}-token context (at most {room})",
                   "max_tokens")
  return params.max_tokens or room


@dataclasses.dataclass(frozen=True)
class Envelope:
  """What every response and chunk of one completion shares."""

  model: str
  id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
    return {**self._head("chat.completion.chunk"), "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

  def usage_chunk(self, usage: dict) -> dict:
    return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}

  def response(self, message: dict, finish_reason: str, usage: dict) -> dict:
    return {**self._head("chat.completion"), "choices": [
        {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}

  def _head(self, kind: str) -> dict:
    return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
  """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache served."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}
