"""Chat requests -> prompt ids: equal to mistral-common's own encoding and to the spec's
vectors (shared/spec/CHAT_FORMAT.md §1.2, §6); bad requests fail naming the culprit."""

import json
import pathlib

import mistral_common
import pytest
from flax import nnx
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from smallfour import configs
from smallfour.chat import vocab as chat_vocab
from smallfour.chat import ChatRequestError, ChatTokenizer, TokenizerFileError
from smallfour.inference.engine import Engine, RequestError
from smallfour.nn.decoder import Transformer

EXAMPLES = pathlib.Path(__file__).parent.parent / "launch" / "examples"

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK = {"role": "user", "content": "Which city is this? What is the weather there?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "Xy7pQ2mZ9", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "Xy7pQ2mZ9", "content": '{"temp_c": 18, "sky": "cloudy"}'}


def _call(call_id, city):
  return {"id": call_id, "type": "function",
          "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


REQUESTS = {
    "plain": {"messages": [{"role": "user", "content": "Name the capital of France."}]},
    "system": {"messages": [{"role": "system", "content": "You are a concise assistant."},
                            {"role": "user", "content": "Name the capital of France."}]},
    "reasoning_none": {"messages": [{"role": "user", "content": "What is 17 * 23?"}],
                       "reasoning_effort": "none"},
    "reasoning_high": {"messages": [{"role": "user", "content": "What is 17 * 23?"}],
                       "reasoning_effort": "high"},
    "tools": {"messages": [SYSTEM, ASK], "tools": [WEATHER], "reasoning_effort": "high"},
    "round_trip": {"messages": [SYSTEM, ASK, CALL, RESULT], "tools": [WEATHER],
                   "reasoning_effort": "high"},
    # Parallel calls, reasoning sent back, results out of order, then a new user turn.
    "multi_call": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning_content": "Need two calls.", "content": "",
         "tool_calls": [_call("callParis", "Paris"), _call("callRome0", "Rome")]},
        {"role": "tool", "tool_call_id": "callRome0", "content": "22C"},
        {"role": "tool", "tool_call_id": "callParis", "content": "18C"},
        {"role": "assistant", "content": "Paris 18C, Rome 22C."},
        {"role": "user", "content": "Thanks"}]},
    "unicode": {"messages": [{"role": "system", "content": "Réponds en français 🇫🇷"},
                             {"role": "user", "content": "función común días 日本語 🎉"}]},
}
REQUESTS.update({f"examples/{p.name}": json.loads(p.read_text()) for p in EXAMPLES.glob("*.json")})


@pytest.fixture(scope="module")
def tok():
  return ChatTokenizer.builtin()


def text(tok, s):
  return tok.mistral.instruct_tokenizer.tokenizer.encode(s, bos=False, eos=False)


@pytest.fixture(scope="module")
def reference(tok):
  """mistral-common on its own, from the same file."""
  return MistralTokenizer.from_file(tok.path)


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_ids_equal_mistral_commons_encoding(tok, reference, name):
  request = REQUESTS[name]
  expected = reference.encode_chat_completion(
      ChatCompletionRequest.from_openai(request["messages"], tools=request.get("tools"),
                                        reasoning_effort=request.get("reasoning_effort")))
  assert tok.encode(request) == expected.tokens


def test_spec_text_vectors(tok):
  """§1.2: plain text through the built-in vocabulary (BOS added)."""
  for s, ids in [("Hello, world!", [1, 22177, 1044, 4304, 1033]),
                 ("The quick brown fox jumps over the lazy dog.",
                  [1, 1784, 7586, 22980, 94137, 72993, 2136, 1278, 42757, 10575, 1046]),
                 ("función común días 日本語 🎉",
                  [1, 12127, 1963, 35239, 20608, 30367, 15199, 119685, 1142, 1137])]:
    assert [1] + text(tok, s) == ids


def test_spec_prompt_vectors(tok):
  """§6.1 and §6.2, id for id; reasoning_effort defaults to none and only changes one id."""
  settings = [36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 17670, 46005, 37]
  assert tok.encode(REQUESTS["system"]) == [
      1, 17, 4568, 1584, 1261, 104335, 27089, 1046, 18, *settings,
      3, 2266, 1278, 8961, 1307, 5498, 1046, 4]
  high = [1, *settings[:9], 24871, *settings[10:],
          3, 7493, 1395, 1032, 1049, 1055, 1364, 1032, 1050, 1051, 1063, 4]
  assert tok.encode(REQUESTS["reasoning_high"]) == high
  none = tok.encode(REQUESTS["reasoning_none"])
  assert none == high[:10] + [17670] + high[11:]
  assert tok.encode({"messages": REQUESTS["reasoning_none"]["messages"]}) == none


def test_spec_tool_round_trip(tok):
  """§6.3 without its image: tools and settings before the first [INST]; round 2 is round 1
  plus the call (arguments normalised), </s> and the result."""
  first = tok.encode(REQUESTS["tools"])
  assert first[:2] == [1, 17] and first[first.index(18) + 1:][:4] == [5, 1091, 19227, 4994]
  high = [36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 24871, 46005, 37]
  assert first[-27:] == [27028, 6, *high, 3, 45184, 5970, 1395, 1593, 1063, 5675, 1395, 1278,
                         17253, 2156, 1063, 4]
  second = tok.encode(REQUESTS["round_trip"])
  assert second == first + [
      9, 1689, 1095, 45629, 32, 19227, 29363, 2811, 1429, 42572, 46005, 2,
      7, 19227, 20298, 3480, 2811, 1032, 1049, 1056, 1044, 1429, 27452, 2811, 1429, 42161,
      1121, 46005, 8]


def test_spec_layouts(tok):
  """§6.4, as text with the control tokens spelled out."""
  multi = tok.render(tok.encode(REQUESTS["multi_call"]))
  assert multi.endswith(
      '[INST]Weather in Paris and Rome?[/INST][THINK]Need two calls.[/THINK]'
      '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]'
      '{"city": "Rome"}</s>[TOOL_RESULTS]18C[/TOOL_RESULTS][TOOL_RESULTS]22C[/TOOL_RESULTS]'
      'Paris 18C, Rome 22C.</s>[INST]Thanks[/INST]')
  assert multi.count("[AVAILABLE_TOOLS]") == multi.count("[MODEL_SETTINGS]") == 1
  two_systems = tok.render(tok.encode({"messages": [
      {"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
      {"role": "user", "content": "hi"}]}))
  assert two_systems.startswith(
      "<s>[SYSTEM_PROMPT]S1[/SYSTEM_PROMPT][SYSTEM_PROMPT]S2[/SYSTEM_PROMPT][MODEL_SETTINGS]")
  check = tok.render(tok.encode({"messages": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [
          {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}))
  assert check.endswith(
      "[INST]hi[/INST]Let me check.[TOOL_CALLS]f[ARGS]{}</s>[TOOL_RESULTS]ok[/TOOL_RESULTS]")


def test_thinking_sent_back_in_either_form(tok):
  """OpenAI `reasoning_content`, or Mistral's chunks with the thinking as text chunks."""
  def history(assistant):
    return {"messages": [{"role": "user", "content": "hi"}, assistant,
                         {"role": "user", "content": "and?"}]}
  openai = tok.encode(history({"role": "assistant", "reasoning_content": "hmm",
                               "content": "hello"}))
  mistral = tok.encode(history({"role": "assistant", "content": [
      {"type": "thinking", "thinking": [{"type": "text", "text": "h"},
                                        {"type": "text", "text": "mm"}]},
      {"type": "text", "text": "hello"}]}))
  assert openai == mistral
  assert "[/INST][THINK]hmm[/THINK]hello</s>[INST]and?" in tok.render(openai)


@pytest.fixture(scope="module")
def engine():
  model = Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))
  return Engine(model, max_len=64)


def _messages(*extra):
  return [{"role": "user", "content": "hi"}, *extra]


@pytest.mark.parametrize("request_, match", [
    ({"messages": [{"role": "bot", "content": "hi"}]},
     r"messages\[0\]\.role: unknown role 'bot'"),
    ({"messages": _messages({"role": "assistant", "tool_calls": [_call("callParis", "Paris")]},
                            {"role": "tool", "tool_call_id": "nope", "content": "18C"})},
     r"messages\[2\]\.tool_call_id: 'nope' answers no tool call .*\['callParis'\]"),
    ({"messages": _messages({"role": "tool", "tool_call_id": "x", "content": "18C"})},
     r"messages\[1\]\.tool_call_id: 'x' answers no tool call"),
    ({"messages": _messages(), "reasoning_effort": "low"},
     r"reasoning_effort: 'low' is not one of 'none', 'high'"),
    ({"messages": _messages({"role": "assistant", "content": "Hello"})},
     r"messages\[1\]\.role: the request ends with a message of role 'assistant'"),
    ({"messages": _messages(), "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array", "items": {}}}}]},
     r"tools\[0\]\.function\.parameters: must be a JSON Schema object .*got 'array'"),
    ({"messages": _messages(), "tools": [WEATHER, {"type": "function", "function": {
        "name": "g", "parameters": ["city"]}}]},
     r"tools\[1\]\.function\.parameters: must be a JSON Schema object .*got 'list'"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]},
     r"messages\[0\]\.role: a conversation starts with a system or user message"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///x.png"}}]}]},
     r"messages\[0\]\.content\[0\]: an image: encode requests with images with"),
    ({"messages": _messages(), "tools": [{"type": "function", "function": {"name": "a b"}}]},
     r"mistral-common rejected the request: Function name was a b"),
    ({"messages": []}, r"messages: expected a non-empty list"),
])
def test_bad_requests_name_the_culprit_and_leave_the_engine_usable(tok, engine, request_,
                                                                    match):
  with pytest.raises(ChatRequestError, match=match):
    tok.encode(request_)
  assert len(engine.generate([tok.encode(REQUESTS["plain"])], 2)[0]) == 2


def test_prompt_longer_than_the_cache(tok, engine):
  long = tok.encode({"messages": [{"role": "user", "content": "word " * 80}]})
  with pytest.raises(RequestError, match=rf"prompt 0 has {len(long)} tokens; a sequence holds 64"):
    engine.generate([long], 2)
  assert len(engine.generate([tok.encode(REQUESTS["plain"])], 2)[0]) == 2


def test_tokenizer_files(tmp_path, tok):
  """The built-in file is the §1.5 recipe, written once; other files are checked."""
  source = pathlib.Path(mistral_common.__file__).parent / "data" / chat_vocab.SOURCE
  assert json.loads(tok.path.read_text()) == chat_vocab.build(source)
  assert chat_vocab.builtin_tekken_path() == tok.path
  assert (tok.vocab_size, tok.eos_id, tok.reasoning_efforts) == (131072, 2, ("none", "high"))
  assert [tok.output.tool_calls, tok.output.args, tok.output.think,
          tok.output.end_think] == [9, 32, 34, 35]
  with pytest.raises(TokenizerFileError, match="no tokenizer file at"):
    ChatTokenizer.from_file(tmp_path / "tekken.json")
  with pytest.raises(TokenizerFileError, match="is a v3 tokenizer; .* is v15"):
    ChatTokenizer.from_file(source)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(TokenizerFileError, match="is not a Tekken tokenizer file"):
    ChatTokenizer.from_file(tmp_path / "vocab.json")
