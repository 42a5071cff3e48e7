"""What the engine is asked and what it answers: requests, their events and tickets."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np

from smallfour.inference.sampling import Sampling

GREEDY = Sampling()


class RequestError(ValueError):
  """A request the engine cannot serve; nothing was queued and the engine stays usable."""


class QueueFull(RuntimeError):
  """Every slot is busy, or about to be, and `max_queue` requests already wait."""


class EngineFailed(RuntimeError):
  """The engine thread died; no request can be served any more."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation: up to `max_new_tokens` after `prompt`, stopping at EOS.

  `images`: the prompt's preprocessed images [C, H, W] in the order of their [IMG] tokens,
  which must number exactly their image tokens; none makes any [IMG] id an ordinary token.
  """

  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: Sampling = GREEDY
  seed: int = 0
  images: tuple[np.ndarray, ...] = dataclasses.field(default=(), compare=False)

  def image_digest(self) -> bytes:
    """A hash of the images' pixels (their prefix-cache key), b"" without images."""
    if not self.images:
      return b""
    h = hashlib.blake2b(digest_size=16)
    for pixels in self.images:
      a = np.ascontiguousarray(pixels, np.float32)
      h.update(repr(a.shape).encode())
      h.update(a.tobytes())
    return h.digest()


@dataclasses.dataclass(frozen=True)
class Event:
  """What a request's sink receives, once per token: `token`, and with the last one (or
  alone) `finish_reason`: "stop" (EOS, kept as the token), "length" (max_new_tokens or a
  full context), "cancelled" or "error" (then `error` says why)."""

  token: int | None = None
  finish_reason: str | None = None
  error: str | None = None


Sink = Callable[[Event], None]


class Ticket:
  """A submitted request: `cancel()` it from any thread. `cached_tokens`: how many of its
  prompt tokens the prefix cache served (set when it is first admitted)."""

  def __init__(self, request: Request, sink: Sink, on_cancel: Callable[["Ticket"], None]):
    self.request, self.sink = request, sink
    self.cancelled = False
    self.cached_tokens = 0
    self._on_cancel = on_cancel

  def cancel(self) -> None:
    """Stops the request: a waiting one leaves the queue at once, a running one frees its
    pages before the next step. A no-op once it has finished."""
    if not self.cancelled:
      self.cancelled = True
      self._on_cancel(self)
