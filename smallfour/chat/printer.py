"""Streamed answers shown as they come, for a terminal or a notebook.

    printer = StreamPrinter()
    for token in tokens:
      printer.show(parser.feed(token))   # parser: ChatTokenizer.stream_parser()
    printer.show(parser.finish())
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

from smallfour.chat.output import Delta


class StreamPrinter:
  """Writes deltas as they arrive: reasoning (dimmed on a terminal) and the answer under
  their own headers, each tool call as `[tool call i] name (id ...)` over its arguments,
  a malformed call's error under its own header; raw ids (no tokenizer) as numbers.

  The "finish" delta prints nothing: callers report the finish reason with their own
  summary.
  """

  def __init__(self, out: TextIO | None = None, dim: bool | None = None):
    """out: default sys.stdout (as it is when constructed); dim: default out.isatty()."""
    self.out = out or sys.stdout
    self.dim = self.out.isatty() if dim is None else dim
    self.header: str | None = None
    self._line_open = False  # the last write did not end a line

  def raw(self, token: int) -> None:
    self._write(f"{token} ")
    self.out.flush()

  def show(self, deltas: Iterable[Delta]) -> None:
    for d in deltas:
      if d.kind == "reasoning":
        self._under("[reasoning]")
        self._write(f"\033[2m{d.text}\033[0m" if self.dim else d.text)
      elif d.kind == "content":
        self._under("[answer]")
        self._write(d.text)
      elif d.kind == "call":
        self._under(f"[tool call {d.index}] {d.name} (id {d.id})")
      elif d.kind == "arguments":
        self._write(d.text)
      elif d.kind == "error":
        self._under(f"[tool call {d.index}: {d.text}]")
    self.out.flush()

  def _under(self, header: str) -> None:
    """Starts a new part (on its own line) unless `header` is the current one."""
    if header != self.header:
      self._write(("\n" if self._line_open else "") + header + "\n")
      self.header = header

  def _write(self, text: str) -> None:
    if text:
      self.out.write(text)
      self._line_open = not text.endswith("\n")
