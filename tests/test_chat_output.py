"""Generated ids -> answer: hand-written sequences (spec §3.2, §4.2) and properties of random
ones (parse never raises; the streamed deltas always add up to parse's result)."""

import io
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallfour.chat import ChatTokenizer, StreamPrinter
from smallfour.chat.output import Delta, collect

# Control ids of Small 4's tekken.json (spec §1.3); the library resolves them by name.
EOS, INST, TOOL_CALLS, IMG, PAD, ARGS, THINK, END_THINK = 2, 3, 9, 10, 11, 32, 34, 35


@pytest.fixture(scope="module")
def tok():
  return ChatTokenizer.builtin()


def text(tok, s: str) -> list[int]:
  return tok.mistral.instruct_tokenizer.tokenizer.encode(s, bos=False, eos=False)


def parse(tok, ids):
  """tok.parse, checked against the streaming parser fed the same ids."""
  out = tok.parse(ids, random.Random(0))
  assert collect(stream(tok, ids)) == out
  return out


def stream(tok, ids, finish=True) -> list[Delta]:
  parser = tok.stream_parser(random.Random(0))
  deltas = [d for t in ids for d in parser.feed(t)]
  return deltas + parser.finish() if finish else deltas


def answer(reasoning=None, content=None, tool_calls=(), finish_reason="stop"):
  return {"reasoning": reasoning, "content": content, "tool_calls": list(tool_calls),
          "finish_reason": finish_reason}


def calls(tok, ids) -> list[dict]:
  """The calls without their random ids, checked to be 9 letters or digits."""
  out = parse(tok, ids)["tool_calls"]
  assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in out)
  return [{k: v for k, v in c.items() if k != "id"} for c in out]


def test_spec_output_vector(tok):
  """§6.1: the answer's ids, tokenized the same way as the prompt."""
  assert text(tok, "The capital of France is Paris.") == [1784, 8961, 1307, 5498, 1395, 6993, 1046]
  assert parse(tok, [1784, 8961, 1307, 5498, 1395, 6993, 1046, EOS]) == answer(
      content="The capital of France is Paris.")


def test_reasoning_then_content(tok):
  ids = ([THINK] + text(tok, "17 * 23 = 340 + 51 = 391.") + [END_THINK]
         + text(tok, "17 × 23 = **391**.") + [EOS])
  assert parse(tok, ids) == answer("17 * 23 = 340 + 51 = 391.", "17 × 23 = **391**.")
  assert [d.kind for d in stream(tok, ids)][-1:] == ["finish"]


def test_parallel_calls_with_nested_json(tok):
  paris = '{"city": "Paris", "opts": {"units": ["c", "f"], "at": {"hour": 9, "tz": null}}}'
  ids = ([TOOL_CALLS] + text(tok, "get_weather") + [ARGS] + text(tok, paris)
         + [TOOL_CALLS] + text(tok, "get_time") + [ARGS] + text(tok, '{"tz": "Europe/Rome"}')
         + [EOS])
  out = parse(tok, ids)
  assert out["finish_reason"] == "tool_calls" and out["content"] is None
  assert calls(tok, ids) == [{"name": "get_weather", "arguments": paris},
                             {"name": "get_time", "arguments": '{"tz": "Europe/Rome"}'}]
  assert json.loads(out["tool_calls"][0]["arguments"])["opts"]["at"] == {"hour": 9, "tz": None}
  assert len({c["id"] for c in out["tool_calls"]}) == 2


def test_content_before_calls(tok):
  ids = text(tok, "Let me check.") + [TOOL_CALLS] + text(tok, "f") + [ARGS] + text(tok, "{}")
  out = parse(tok, ids + [EOS])
  assert out["content"] == "Let me check." and out["finish_reason"] == "tool_calls"
  assert calls(tok, ids + [EOS]) == [{"name": "f", "arguments": "{}"}]


def test_call_cut_by_max_tokens(tok):
  ids = ([TOOL_CALLS] + text(tok, "a") + [ARGS] + text(tok, '{"x": 1}')
         + [TOOL_CALLS] + text(tok, "b") + [ARGS] + text(tok, '{"city": "Pa'))
  out = parse(tok, ids)
  assert out["finish_reason"] == "length"
  (done, cut) = calls(tok, ids)
  assert done == {"name": "a", "arguments": '{"x": 1}'}
  assert cut["name"] == "b" and cut["arguments"] == '{"city": "Pa'
  assert cut["error"].startswith("cut off by the token limit: arguments are not valid JSON")
  # Cut before its [ARGS]: still reported, with no arguments.
  assert calls(tok, [TOOL_CALLS] + text(tok, "get_wea"))[0]["name"] == "get_wea"


def test_invalid_json_keeps_the_raw_text(tok):
  ids = [TOOL_CALLS] + text(tok, "f") + [ARGS] + text(tok, " {city: Paris} ") + [EOS]
  (call,) = calls(tok, ids)
  assert call["arguments"] == "{city: Paris}"
  assert call["error"].startswith("arguments are not valid JSON")
  assert parse(tok, ids)["finish_reason"] == "tool_calls"
  assert parse(tok, ids)["content"] is None  # never moved into the content


def test_think_without_end(tok):
  ids = text(tok, "Hmm. ") + [THINK] + text(tok, "still thinking")
  assert parse(tok, ids) == answer("still thinking", "Hmm. ", finish_reason="length")
  assert parse(tok, ids + [EOS]) == answer("still thinking", "Hmm. ")


def test_stray_and_repeated_think_markers_are_dropped(tok):
  stray = text(tok, "a") + [END_THINK] + text(tok, "b") + [EOS]
  assert parse(tok, stray) == answer(content="ab")
  twice = ([THINK] + text(tok, "r") + [END_THINK] + text(tok, "c")
           + [THINK] + text(tok, "d") + [END_THINK] + [EOS])
  assert parse(tok, twice) == answer("r", "cd")


def test_text_that_spells_markers_is_text(tok):
  spoof = 'Write [TOOL_CALLS]f[ARGS]{} or [THINK]x[/THINK] and </s>.'
  ids = text(tok, spoof)
  assert not {EOS, TOOL_CALLS, ARGS, THINK, END_THINK} & set(ids)
  assert parse(tok, ids + [EOS]) == answer(content=spoof)


def test_control_tokens_never_leak(tok):
  ids = [INST] + text(tok, "a") + [PAD, IMG, 1, 999] + text(tok, "b") + [ARGS, EOS]
  assert parse(tok, ids) == answer(content="ab")


def test_call_without_args_marker(tok):
  """Split at the first "{"; a finished piece with no "{" is dropped."""
  ids = [TOOL_CALLS] + text(tok, 'f{"a": 1}') + [TOOL_CALLS] + text(tok, "nothing") + [EOS]
  assert calls(tok, ids) == [{"name": "f", "arguments": '{"a": 1}'}]
  assert parse(tok, [TOOL_CALLS] + text(tok, "nothing") + [EOS])["finish_reason"] == "stop"


def test_ids_after_eos_and_out_of_range_ids_are_ignored(tok):
  assert parse(tok, text(tok, "ok") + [-5, 131072, 10**9, EOS] + text(tok, "more")) == answer(
      content="ok")


def test_streaming_deltas(tok):
  """§4.3: reasoning, then content, then each call's name at its [ARGS] and its arguments
  as they come; complete characters only, even when a character spans tokens."""
  utf8 = [1337, 1240, 1159, 1142, 1137]  # é, then 🎉 as four single bytes (spec §1.2)
  assert tok.output.decode(utf8) == "é🎉"
  ids = ([THINK] + text(tok, "plan") + [END_THINK] + utf8 + [TOOL_CALLS] + text(tok, "f")
         + [ARGS] + text(tok, ' {"a": "é"} ') + [EOS])
  deltas = stream(tok, ids, finish=False)
  assert "\ufffd" not in "".join(d.text for d in deltas)
  assert [d.kind for d in deltas if d.kind != "arguments"] == [
      "reasoning", "content", "content", "call", "finish"]
  assert deltas[3] == Delta("call", index=0, id=deltas[3].id, name="f")
  assert collect(deltas) == parse(tok, ids)
  assert collect(deltas)["tool_calls"][0]["arguments"] == '{"a": "é"}'


def test_stream_printer_puts_each_part_under_its_header():
  out = io.StringIO()
  printer = StreamPrinter(out, dim=False)
  printer.show([Delta("reasoning", "plan"), Delta("reasoning", " more"), Delta("content", "Hi"),
                Delta("call", index=0, id="a1", name="f"), Delta("arguments", '{"x":', index=0),
                Delta("arguments", " 1}", index=0), Delta("call", index=1, id="b2", name="g"),
                Delta("error", "not JSON", index=1), Delta("finish", "tool_calls")])
  assert out.getvalue() == ('[reasoning]\nplan more\n[answer]\nHi\n[tool call 0] f (id a1)\n'
                            '{"x": 1}\n[tool call 1] g (id b2)\n[tool call 1: not JSON]\n')


# Random sequences: the output grammar's parts (spec §4.1) with any of them left out, plus noise
# inserted anywhere: markers, other control ids, out-of-range ids. Text comes as pieces of JSON,
# names and whitespace, single bytes (which split characters) and arbitrary ids.
PIECES = ['{"', '":', ' "', '"}', "{", "}", "[", "]", ",", ":", " ", "  ", "\n", "\t", "a",
          "get_weather", "Paris", "é", "🎉", "null", "1", "[TOOL_CALLS]", "{city"]
MARKERS = [EOS, TOOL_CALLS, ARGS, THINK, END_THINK]
NOISE = MARKERS + [0, 1, INST, 4, IMG, PAD, 33, 36, 999, -1, 131072]


@st.composite
def id_sequences(draw):
  pieces = [text(ChatTokenizer.builtin(), p) for p in PIECES]
  texts = st.lists(st.one_of(st.sampled_from(pieces), st.sampled_from(pieces),
                             st.lists(st.integers(1000, 1255), min_size=1, max_size=4),
                             st.lists(st.integers(1000, 131071), min_size=1, max_size=2)),
                   max_size=5).map(lambda parts: [t for p in parts for t in p])
  maybe = st.booleans()
  ids = []
  if draw(maybe):
    ids += [THINK] + draw(texts) + ([END_THINK] if draw(maybe) else [])
  ids += draw(texts)
  for _ in range(draw(st.integers(0, 3))):
    ids += [TOOL_CALLS] + draw(texts) + ([ARGS] if draw(maybe) else []) + draw(texts)
  if draw(maybe):
    ids += [EOS] + draw(texts)
  for _ in range(draw(st.integers(0, 6))):
    noise = st.one_of(st.sampled_from(MARKERS), st.sampled_from(NOISE))
    ids.insert(draw(st.integers(0, len(ids))), draw(noise))
  return ids


PROPERTY = settings(max_examples=400, derandomize=True, database=None, deadline=None)


@PROPERTY
@given(id_sequences())
def test_parse_never_raises(ids):
  out = ChatTokenizer.builtin().parse(ids)
  assert set(out) == {"reasoning", "content", "tool_calls", "finish_reason"}
  assert out["finish_reason"] == ("length" if EOS not in ids else
                                  "tool_calls" if out["tool_calls"] else "stop")
  assert len(out["tool_calls"]) <= ids.count(TOOL_CALLS)
  for call in out["tool_calls"]:
    assert set(call) - {"error"} == {"id", "name", "arguments"}


@PROPERTY
@given(id_sequences())
def test_stream_adds_up_to_parse(ids):
  tok = ChatTokenizer.builtin()
  deltas = stream(tok, ids)
  assert collect(deltas) == parse(tok, ids)
  assert deltas[-1].kind == "finish" and all(d.text for d in deltas if d.kind != "call")
