"""Generated ids -> {reasoning, content, tool_calls, finish_reason}, whole or streamed.

Both parsers work on token ids (shared/spec/CHAT_FORMAT.md §3.2, §4.2, §4.3): the output is
`([THINK] reasoning [/THINK])? content ([TOOL_CALLS] name [ARGS] json)* </s>`, and only the
control ids delimit it, so text that spells a marker is text. Text is decoded per segment
between control ids (control ids add nothing, undecodable bytes become U+FFFD), which is
what mistral-common's decode does and what makes the streamed text equal the whole.

A call's `arguments` are its JSON text as generated (whitespace around it trimmed), not
re-serialised, so that the streamed argument deltas add up to it; mistral-common normalises
them when they are sent back. Malformed output never raises: an unclosed [THINK] makes the
rest reasoning, a stray [/THINK] or a second [THINK] is dropped, a call without [ARGS] is
split at its first "{" (and dropped when it has none, unless the token limit cut it), and
arguments that are not JSON (trailing text included) are kept with an "error". Call ids are
9 random letters and digits (the model never emits one; vLLM's convention), drawn from `rng`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import random
import string
from typing import Callable, Iterable, Sequence

_SYSTEM_RANDOM = random.SystemRandom()
_ID_CHARS = string.ascii_letters + string.digits


@dataclasses.dataclass(frozen=True)
class OutputTokens:
  """What the parsers need from a tokenizer: marker ids (None when it lacks one), the id
  range of text tokens and each text id's bytes."""

  eos: int
  tool_calls: int | None
  args: int | None
  think: int | None
  end_think: int | None
  num_special: int  # ids below this are control tokens
  vocab_size: int
  piece: Callable[[int], bytes]

  def is_text(self, token: int) -> bool:
    return self.num_special <= token < self.vocab_size

  def decode(self, ids: Sequence[int]) -> str:
    """Text ids' bytes, decoded one control-free run at a time."""
    out, run = [], []
    for t in ids:
      if self.is_text(t):
        run.append(self.piece(t))
      elif run:
        out.append(b"".join(run).decode("utf-8", "replace"))
        run = []
    out.append(b"".join(run).decode("utf-8", "replace"))
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Delta:
  """One streamed piece of the answer.

  kind: "reasoning" or "content" (`text` continues that field); "call" (tool call `index`
  starts, with its `id` and `name`); "arguments" (`text` continues call `index`'s
  arguments); "error" (call `index` is malformed, `text` says how); "finish" (`text` is
  the finish_reason, always the last delta).
  """

  kind: str
  text: str = ""
  index: int | None = None
  id: str | None = None
  name: str | None = None


def parse(ids: Iterable[int], tok: OutputTokens, rng: random.Random | None = None) -> dict:
  """Generated ids (prompt excluded) -> {"reasoning", "content", "tool_calls", "finish_reason"}.

  reasoning / content: str, or None when empty. tool_calls: [{"id", "name", "arguments"}]
  plus "error" when the arguments are not JSON. finish_reason: "length" without </s>,
  else "tool_calls" when a call was parsed, else "stop".
  """
  ids = [int(t) for t in ids]
  finished = tok.eos in ids
  if finished:
    ids = ids[:ids.index(tok.eos)]
  cuts = [i for i, t in enumerate(ids) if t == tok.tool_calls]
  reasoning, content = _split_thinking(ids[:cuts[0]] if cuts else ids, tok)
  calls = []
  for n, (start, end) in enumerate(zip(cuts, cuts[1:] + [len(ids)])):
    piece = ids[start + 1:end]
    cut = n == len(cuts) - 1 and not finished
    if tok.args in piece:
      k = piece.index(tok.args)
      name, args = tok.decode(piece[:k]).strip(), tok.decode(piece[k + 1:]).strip()
    else:
      split = _split_without_args(tok.decode(piece), cut)
      if split is None:
        continue
      name, args = split
    calls.append(_call(_call_id(rng), name, args, _args_error(args, cut)))
  return {"reasoning": reasoning or None, "content": content or None, "tool_calls": calls,
          "finish_reason": _finish_reason(finished, bool(calls))}


def collect(deltas: Iterable[Delta]) -> dict:
  """Concatenates streamed deltas into `parse`'s result."""
  out = {"reasoning": None, "content": None, "tool_calls": [], "finish_reason": None}
  for d in deltas:
    if d.kind in ("reasoning", "content"):
      out[d.kind] = (out[d.kind] or "") + d.text
    elif d.kind == "call":
      out["tool_calls"].append({"id": d.id, "name": d.name, "arguments": ""})
    elif d.kind == "arguments":
      out["tool_calls"][d.index]["arguments"] += d.text
    elif d.kind == "error":
      out["tool_calls"][d.index]["error"] = d.text
    else:
      out["finish_reason"] = d.text
  return out


class StreamParser:
  """Parses generated ids one at a time (§4.3): `feed(id)` and, when generation stopped
  without </s>, `finish()` return the new deltas. `collect` of all of them equals `parse`
  of all the ids (with an equally seeded `rng`)."""

  def __init__(self, tok: OutputTokens, rng: random.Random | None = None):
    self._tok = tok
    self._rng = rng
    self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
    self._state = "content"  # -> "reasoning" -> "content" -> "tools" -> "done"
    self._thought = False  # the one [THINK] block was opened
    self._calls = 0
    self._piece: list[int] = []  # the current call's ids before its [ARGS]
    self._in_args = False
    self._args = ""  # the current call's arguments emitted so far
    self._space = ""  # whitespace held back: the arguments are trimmed

  def feed(self, token: int) -> list[Delta]:
    tok, token = self._tok, int(token)
    if self._state == "done":
      return []
    if token == tok.eos:
      return self._end(finished=True)
    if self._state == "tools" and not self._in_args and token not in (tok.tool_calls,
                                                                      tok.args):
      self._piece.append(token)
      return []
    if tok.is_text(token):
      return self._text(self._decoder.decode(tok.piece(token)))
    out = self._flush()
    if token == tok.tool_calls:
      if self._state == "tools":
        out += self._close_call(cut=False)
      self._state, self._piece, self._in_args = "tools", [], False
    elif token == tok.args and self._state == "tools" and not self._in_args:
      out.append(Delta("call", index=self._calls, id=_call_id(self._rng),
                       name=tok.decode(self._piece).strip()))
      self._in_args, self._args, self._space = True, "", ""
    elif token == tok.think and self._state == "content" and not self._thought:
      self._state, self._thought = "reasoning", True
    elif token == tok.end_think and self._state == "reasoning":
      self._state = "content"
    return out

  def finish(self) -> list[Delta]:
    """Ends a stream cut by the token limit (finish_reason "length"); a no-op after </s>."""
    return [] if self._state == "done" else self._end(finished=False)

  def _flush(self) -> list[Delta]:
    """A control id ends the current text segment: incomplete bytes become U+FFFD."""
    return self._text(self._decoder.decode(b"", final=True))

  def _text(self, text: str) -> list[Delta]:
    if not text:
      return []
    if self._state != "tools":
      return [Delta(self._state, text)]
    text = self._space + text if self._args else (self._space + text).lstrip()
    body = text.rstrip()
    self._space = text[len(body):]
    if not body:
      return []
    self._args += body
    return [Delta("arguments", body, index=self._calls)]

  def _close_call(self, cut: bool) -> list[Delta]:
    if self._in_args:
      out, args = [], self._args
    else:
      split = _split_without_args(self._tok.decode(self._piece), cut)
      if split is None:
        return []
      name, args = split
      out = [Delta("call", index=self._calls, id=_call_id(self._rng), name=name)]
      if args:
        out.append(Delta("arguments", args, index=self._calls))
    error = _args_error(args, cut)
    if error is not None:
      out.append(Delta("error", error, index=self._calls))
    self._calls += 1
    return out

  def _end(self, finished: bool) -> list[Delta]:
    out = self._flush()
    if self._state == "tools":
      out += self._close_call(cut=not finished)
    self._state = "done"
    return out + [Delta("finish", _finish_reason(finished, self._calls > 0))]


def _split_thinking(ids: list[int], tok: OutputTokens) -> tuple[str, str]:
  """The pre-tool ids -> (reasoning, content): the first [THINK] up to the first [/THINK]
  after it (or the end) is reasoning, everything around it content."""
  if tok.think not in ids:
    return "", tok.decode(ids)
  start = ids.index(tok.think)
  rest = ids[start + 1:]
  end = rest.index(tok.end_think) if tok.end_think in rest else len(rest)
  return tok.decode(rest[:end]), tok.decode(ids[:start]) + tok.decode(rest[end + 1:])


def _split_without_args(text: str, cut: bool) -> tuple[str, str] | None:
  """A call piece with no [ARGS]: name and arguments split at the first "{" (as vLLM does);
  without one, the piece is dropped unless the token limit cut it before its [ARGS]."""
  k = text.find("{")
  if k >= 0:
    return text[:k].strip(), text[k:].strip()
  return (text.strip(), "") if cut else None


def _args_error(args: str, cut: bool) -> str | None:
  try:
    json.loads(args)
  except (ValueError, RecursionError) as e:
    why = f"arguments are not valid JSON ({e})"
    return f"cut off by the token limit: {why}" if cut else why
  return None


def _call(call_id: str, name: str, args: str, error: str | None) -> dict:
  call = {"id": call_id, "name": name, "arguments": args}
  return call if error is None else {**call, "error": error}


def _call_id(rng: random.Random | None) -> str:
  return "".join((rng or _SYSTEM_RANDOM).choice(_ID_CHARS) for _ in range(9))


def _finish_reason(finished: bool, called: bool) -> str:
  return "length" if not finished else "tool_calls" if called else "stop"
