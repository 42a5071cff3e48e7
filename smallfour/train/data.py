"""Chat examples from JSONL, and fixed-shape padded batches of them.

Each line is a request object, `{"messages": [...], "tools"?: [...],
"reasoning_effort"?: ...}` as `launch/generate.py --messages` takes (a bare list of
messages works too), ending with the assistant turn it teaches. `ChatTokenizer.
encode_for_training` gives its ids and the mask of assistant tokens, the only ones
trained on.

Padding, not packing: every sequence is padded to the run's length, so one step
compiles once and attention never crosses examples (packing would need per-example
positions and a block-diagonal mask, which the chunked causal attention does not take).
The cost is the padding's compute, reported per step as `padding` (the fraction of
padded positions); sort or trim the data to keep it low.

Order: epoch e visits the examples in a permutation drawn from (seed, e); the batch of
step s holds examples s·B .. s·B + B - 1 of that endless sequence, so the data position
is s·B and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable

import numpy as np

from smallfour.chat import ChatRequestError, ChatTokenizer

ON_BAD_LINE = ("refuse", "skip")


class DataError(ValueError):
  """A dataset that cannot be trained on; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
  ids: np.ndarray  # [L] int32, L <= max_seq_len + 1
  mask: np.ndarray  # [L] bool: assistant tokens
  line: int


@dataclasses.dataclass(frozen=True)
class Dataset:
  examples: tuple[Example, ...]
  lines: int  # non-blank lines read
  skipped: int  # bad lines skipped (on_bad_line="skip")
  truncated: int  # examples cut at max_seq_len + 1 tokens


def read_jsonl(path: str, tokenizer: ChatTokenizer, max_seq_len: int, vocab_size: int,
               on_bad_line: str = "refuse",
               warn: Callable[[str], None] = logging.warning) -> Dataset:
  """Reads and encodes every line; raises DataError.

  A bad line (not JSON, a request the chat encoder refuses, no assistant message, no
  assistant token within the first max_seq_len + 1) stops the run ("refuse") or is
  skipped with a warning naming it ("skip"). A dataset left with no example is refused
  either way: a run never trains on nothing.
  """
  if on_bad_line not in ON_BAD_LINE:
    raise ValueError(f"on_bad_line={on_bad_line!r}; expected one of {ON_BAD_LINE}")
  if tokenizer.vocab_size > vocab_size:
    raise DataError(f"the tokenizer has {tokenizer.vocab_size} ids; the model's vocabulary "
                    f"{vocab_size}")
  examples, lines, skipped, truncated = [], 0, 0, 0
  try:
    with open(path, encoding="utf-8") as f:
      numbered = list(enumerate(f, 1))
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read {path}: {e}") from None
  for number, text in numbered:
    if not text.strip():
      continue
    lines += 1
    try:
      ids, mask, cut = _encode(text, tokenizer, max_seq_len)
    except (ValueError, ChatRequestError) as e:
      message = f"{path}:{number}: {e}"
      if on_bad_line == "refuse":
        raise DataError(message + " (--bad_lines=skip skips such lines)") from None
      warn(f"skipping {message}")
      skipped += 1
      continue
    truncated += cut
    examples.append(Example(ids, mask, number))
  if not examples:
    raise DataError(f"{path}: nothing to train on ({lines} lines, {skipped} skipped)")
  return Dataset(tuple(examples), lines, skipped, truncated)


def _encode(text: str, tokenizer: ChatTokenizer, max_seq_len: int
            ) -> tuple[np.ndarray, np.ndarray, bool]:
  try:
    request: Any = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
  if isinstance(request, list):
    request = {"messages": request}
  ids, mask = tokenizer.encode_for_training(request)
  cut = len(ids) > max_seq_len + 1
  ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
  if not any(mask[1:]):  # targets are ids[1:]
    raise ValueError(f"no assistant token within the first {max_seq_len + 1} tokens "
                     f"(--max_seq_len={max_seq_len})")
  return np.asarray(ids, np.int32), np.asarray(mask, bool), cut


def sequence_layout(max_seq_len: int, chunk: int) -> tuple[int, int]:
  """(padded length S, attention chunk): S ≥ max_seq_len, a whole number of chunks of at
  most `chunk` positions, each a multiple of 8."""
  chunks = -(-max_seq_len // chunk)
  size = -(-max_seq_len // chunks)
  size = -(-size // 8) * 8
  return chunks * size, size


class Batches:
  """Fixed-shape batches [B, S]: tokens, targets (the next token), loss_mask (targets that
  are assistant tokens), valid (real positions)."""

  def __init__(self, dataset: Dataset, batch_size: int, seq_len: int, seed: int):
    self.examples = dataset.examples
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self._orders: dict[int, np.ndarray] = {}

  def example(self, position: int) -> Example:
    """The example at this position of the endless, epoch-shuffled sequence."""
    epoch, index = divmod(position, len(self.examples))
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
          len(self.examples))}
    return self.examples[self._orders[epoch][index]]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    b, s = self.batch_size, self.seq_len
    out = {"tokens": np.zeros((b, s), np.int32), "targets": np.zeros((b, s), np.int32),
           "loss_mask": np.zeros((b, s), bool), "valid": np.zeros((b, s), bool)}
    for row in range(b):
      ex = self.example(step * b + row)
      n = len(ex.ids) - 1
      out["tokens"][row, :n] = ex.ids[:-1]
      out["targets"][row, :n] = ex.ids[1:]
      out["loss_mask"][row, :n] = ex.mask[1:]
      out["valid"][row, :n] = True
    return out
