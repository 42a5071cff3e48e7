"""Which ops of a compiled program move which bytes, read from its optimized HLO text.

XLA's cost analysis gives one total (`bytes accessed`); this splits it the way it is
counted, per top-level instruction (a fusion counts the bytes of its operands and its
result), and attributes each to the source line that produced it (the HLO's stack
frames), so a step's bytes can be traced to the code. Instructions in a loop body count
once, as in XLA's static estimate, with the loop's trip count shown when XLA knows it.
"""

from __future__ import annotations

import collections
import dataclasses
import re

_ITEMSIZE = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
             "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(, .*)?$")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
         "conditional", "call", "copy-done", "after-all", "partition-id", "replica-id",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "opt-barrier", "send-done", "recv-done", "slice-done"}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string such as `bf16[8,4096]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _ITEMSIZE:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      total += n * _ITEMSIZE[dtype]
  return total


@dataclasses.dataclass
class _Op:
  name: str
  opcode: str
  shape: str
  operands: list[str]
  attributes: str
  root: bool
  argument: str  # the raw operand text (a parameter's index)


def _parse(text: str) -> tuple[dict[str, list[_Op]], str, dict[int, str]]:
  """({computation: ops}, entry name, {stack frame id: "file:line"})."""
  computations: dict[str, list[_Op]] = {}
  entry, current = "", None
  files, locations, frames = {}, {}, {}
  section = None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    if section and (m := re.match(r"^(\d+) (.*)$", line)):
      key, value = int(m.group(1)), m.group(2)
      if section == "FileNames":
        files[key] = value.strip('"').split("/smallfour/")[-1]
      elif section == "FileLocations":
        f, ln = re.search(r"file_name_id=(\d+).*? line=(\d+)", value).groups()
        locations[key] = f"{files.get(int(f), '?')}:{ln}"
      elif section == "StackFrames":
        frames[key] = locations.get(int(re.search(r"file_location_id=(\d+)", value).group(1)))
      continue
    section = None
    if m := _COMPUTATION.match(line):
      current = m.group(2)
      computations[current] = []
      if m.group(1):
        entry = current
    elif current and (m := _INSTRUCTION.match(line)):
      root, name, shape, opcode, operands, attributes = m.groups()
      computations[current].append(_Op(name, opcode, shape,
                                       re.findall(r"%([\w.\-]+)", operands),
                                       attributes or "", bool(root), operands))
  return computations, entry, frames


_SLICES = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # opcode -> operand index of the update
_VIEWS = {"bitcast", "reshape"}


def _relayout(ops: list[_Op]) -> bool:
  """A nested fusion that only copies its one operand into another layout: inside the
  fusion that holds it, read as a view (XLA:TPU relayouts FP8 codes this way before a
  dynamic slice, which still reads only the slice)."""
  return (len(ops) == 2 and any(op.root and op.opcode in ("copy", *_VIEWS) for op in ops))


def _fusion_bytes(computations: dict[str, list[_Op]], fused: str,
                  operand_bytes: list[int]) -> int:
  """Bytes a fusion moves, counted as XLA's cost analysis does: an operand only sliced
  inside (nested fusions included) counts the slices, the buffer an in-place update
  writes into counts nothing, and the result of an in-place update counts the update."""

  def read(computation: str, index: int, full: int) -> int:
    ops = computations[computation]
    param = next(op.name for op in ops if op.opcode == "parameter" and int(op.argument) == index)
    return read_value(ops, param, full)

  def read_value(ops: list[_Op], name: str, full: int) -> int:
    total = 0
    for user in ops:
      for i, operand in enumerate(user.operands):
        if operand != name:
          continue
        nested = re.search(r"calls=%([\w.\-]+)", user.attributes)
        if user.opcode in _VIEWS or (user.opcode == "fusion" and nested
                                     and _relayout(computations[nested.group(1)])):
          total += read_value(ops, user.name, full)
        elif user.opcode == "fusion" and nested:
          total += read(nested.group(1), i, full)
        elif user.opcode in _SLICES and i == 0:
          total += shape_bytes(user.shape)
        elif not (user.opcode in _IN_PLACE and i == 0):
          return full
    return min(total, full)

  ops = computations[fused]
  by_name = {op.name: op for op in ops}
  moved = sum(read(fused, int(op.argument), operand_bytes[int(op.argument)])
              for op in ops if op.opcode == "parameter")
  root = next(op for op in ops if op.root)
  for out in [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]:
    if out.opcode in _IN_PLACE:
      moved += shape_bytes(by_name[out.operands[_IN_PLACE[out.opcode]]].shape)
    else:
      moved += shape_bytes(out.shape)
  return moved


def _tuple_element(shape: str, index: int) -> str:
  """The `index`-th top-level element of a tuple shape string `(a, (b, c), d)`."""
  depth, start, parts = 0, 1, []
  for i, ch in enumerate(shape):  # dims [..] and layouts {..} hold commas too
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
      parts.append(shape[start:i].strip())
      start = i + 1
  return parts[index] if index < len(parts) else ""


def top_ops(text: str, count: int = 20) -> list[dict]:
  """The `count` source lines whose top-level instructions move the most bytes.

  Each: {"bytes", "ops" (instructions), "where" (file:line), "what" (jax op names),
  "loop" (trip count of the enclosing loop, if any)}.
  """
  computations, entry, frames = _parse(text)
  shapes = {op.name: op.shape for ops in computations.values() for op in ops}
  defining = {op.name: op for ops in computations.values() for op in ops}
  rows: dict[tuple, dict] = collections.defaultdict(lambda: {"bytes": 0, "ops": 0,
                                                             "what": set()})

  def visit(computation: str, loop: str | None) -> None:
    for op in computations.get(computation, []):
      if op.opcode == "while":
        body = re.search(r"body=%([\w.\-]+)", op.attributes).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', op.attributes)
        visit(body, trips.group(1) if trips else "?")
        continue
      if op.opcode in ("conditional", "call"):
        for callee in re.findall(r"(?:branch_computations=\{|to_apply=|calls=)%?([\w.\-]+)",
                                 op.attributes):
          visit(callee, loop)
        continue
      if op.opcode in _FREE:
        continue
      operand_bytes = [shape_bytes(shapes.get(o, "")) for o in op.operands]
      fused = re.search(r"calls=%([\w.\-]+)", op.attributes)
      if op.opcode == "fusion" and fused:
        moved = _fusion_bytes(computations, fused.group(1), operand_bytes)
      elif op.opcode in _IN_PLACE:
        moved = 2 * operand_bytes[_IN_PLACE[op.opcode]]
      elif op.opcode in _SLICES:
        moved = 2 * shape_bytes(op.shape)
      elif op.opcode == "slice-start":  # ((source), slice, context): reads and writes the slice
        moved = 2 * shape_bytes(_tuple_element(op.shape, 1))
      elif op.opcode.endswith("-start"):  # result (destination, source, context): one copy
        moved = 2 * sum(operand_bytes)
      else:
        moved = sum(operand_bytes) + shape_bytes(op.shape)
      frame = re.search(r"stack_frame_id=(\d+)", op.attributes)
      where = frames.get(int(frame.group(1))) if frame else None
      what = re.search(r'op_name="([^"]*)"', op.attributes)
      if where is None:  # XLA's own copies (prefetches, relayouts): name what they copy
        source = defining.get(op.operands[0]) if op.operands else None
        name = re.search(r'op_name="([^"]*)"', source.attributes) if source else None
        where = f"{op.opcode} of " + (re.sub(r"\[\\?'?(\d+)\\?'?\]", "[*]", name.group(1))
                                      if name else "?")
      row = rows[(where, loop)]
      row["bytes"] += moved
      row["ops"] += 1
      if what:
        row["what"].add(what.group(1).split("/")[-1])

  visit(entry, None)
  ranked = sorted(rows.items(), key=lambda kv: -kv[1]["bytes"])[:count]
  return [{"bytes": r["bytes"], "ops": r["ops"], "where": where, "loop": loop,
           "what": sorted(r["what"])} for (where, loop), r in ranked]
