"""One answer as it is generated: engine events -> OpenAI deltas and the whole message.

Streamed and whole answers come from the same deltas (`ChatTokenizer.stream_parser`, which
splits on token ids: reasoning, content, tool calls), so a stream concatenates to the
answer the same request gets unstreamed. Stop strings end the answer at their first
occurrence in the content (the reasoning and tool-call arguments are not searched); content
that may be the start of one is held back until it is known not to be.
"""

from __future__ import annotations

import logging

from smallfour.chat import ChatTokenizer, Delta
from smallfour.inference.requests import Event

log = logging.getLogger(__name__)


class Answer:
  """Feed it the engine's events; it returns the OpenAI `delta` objects to send."""

  def __init__(self, tok: ChatTokenizer, stop: tuple[str, ...] = ()):
    self._parser = tok.stream_parser()
    self._stop = stop
    self._held = ""  # content that may begin a stop string
    self.tokens = 0  # generated tokens, EOS included
    self.finish_reason: str | None = None
    self.stopped = False  # a stop string ended it: the generation should be cancelled
    self.reasoning, self.content, self.calls = "", "", []

  def feed(self, event: Event) -> list[dict]:
    """The deltas `event` completes; nothing once the answer is finished."""
    if self.finish_reason is not None:
      return []
    out = []
    if event.token is not None:
      self.tokens += 1
      out = self._deltas(self._parser.feed(event.token))
    if event.finish_reason is not None and self.finish_reason is None:
      out += self._deltas(self._parser.finish())  # cut short: by the token limit
    return out

  def message(self) -> dict:
    """The whole answer as an OpenAI assistant message."""
    message = {"role": "assistant", "content": self.content or None,
               "reasoning_content": self.reasoning or None}
    if self.calls:
      message["tool_calls"] = self.calls
    return message

  def _deltas(self, deltas: list[Delta]) -> list[dict]:
    out = []
    for d in deltas:
      if self.finish_reason is not None:
        break
      if d.kind == "content":
        out += self._content(d.text)
        continue
      out += self._release()
      if d.kind == "reasoning":
        self.reasoning += d.text
        out.append({"reasoning_content": d.text})
      elif d.kind == "call":
        self.calls.append(_call(d))
        out.append({"tool_calls": [{"index": d.index, **_call(d)}]})  # not shared: it grows
      elif d.kind == "arguments":
        self.calls[d.index]["function"]["arguments"] += d.text
        out.append({"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]})
      elif d.kind == "error":
        log.warning("tool call %d: %s", d.index, d.text)
      elif d.kind == "finish":
        self.finish_reason = d.text
    return out

  def _content(self, text: str) -> list[dict]:
    text = self._held + text
    hits = [(text.find(s), s) for s in self._stop if s in text]
    if hits:
      self._held = ""
      self.stopped, self.finish_reason = True, "stop"
      return self._emit(text[:min(hits)[0]])
    keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])),
               default=0)
    self._held = text[len(text) - keep:] if keep else ""
    return self._emit(text[:len(text) - keep])

  def _release(self) -> list[dict]:
    """Held-back content that turned out not to start a stop string."""
    text, self._held = self._held, ""
    return self._emit(text)

  def _emit(self, text: str) -> list[dict]:
    if not text:
      return []
    self.content += text
    return [{"content": text}]


def _call(d: Delta) -> dict:
  return {"id": d.id, "type": "function", "function": {"name": d.name, "arguments": ""}}
