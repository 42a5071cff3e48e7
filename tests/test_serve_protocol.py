"""The server's wire format and answer assembly, without a model or a socket."""

import pytest

from smallfour.chat import ChatTokenizer
from smallfour.inference.requests import Event
from smallfour.inference.sampling import Sampling
from smallfour.serve import protocol
from smallfour.serve.completion import Answer
from smallfour.serve.protocol import ApiError

EOS, TOOL_CALLS, ARGS, THINK, END_THINK = 2, 9, 32, 34, 35
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tok():
  return ChatTokenizer.builtin()


def _ids(tok, text):
  return tok.mistral.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


def _feed(answer, ids, finish="stop"):
  return [d for i, t in enumerate(ids)
          for d in answer.feed(Event(t, finish if i == len(ids) - 1 else None))]


def test_defaults_follow_the_reasoning_effort():
  _, none = protocol.split({"messages": USER})
  _, high = protocol.split({"messages": USER, "reasoning_effort": "high"})
  assert none.sampling == Sampling() and high.sampling == Sampling(0.7)
  chat, p = protocol.split({"messages": USER, "reasoning_effort": "high", "temperature": 0,
                            "top_p": 0.9, "top_k": 5, "seed": 3, "max_tokens": 7,
                            "stop": "x", "stream": True, "model": "m", "user": "u",
                            "stream_options": {"include_usage": True}})
  assert chat == {"messages": USER, "reasoning_effort": "high"}
  assert (p.sampling, p.seed, p.max_tokens, p.stop, p.stream, p.include_usage) == (
      Sampling(0.0, 5, 0.9), 3, 7, ("x",), True, True)


@pytest.mark.parametrize("body, param", [
    ({"messages": USER, "max_tokens": -1}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_k": -2}, "top_k"),
    ({"messages": USER, "seed": -1}, "seed"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ([USER], None),
])
def test_bad_fields_are_named(body, param):
  with pytest.raises(ApiError) as e:
    protocol.split(body)
  assert (e.value.status, e.value.param) == (400, param)


def test_the_culprit_is_read_from_the_encoder_message():
  e = protocol.bad_request("messages[1].role: unknown role 'bot'")
  assert e.body()["error"] == {"message": "messages[1].role: unknown role 'bot'",
                               "type": "invalid_request_error", "param": "messages[1].role",
                               "code": None}
  assert protocol.bad_request("mistral-common rejected the request: x").param is None


def test_max_new_tokens_fit_the_context():
  p = protocol.split({"messages": USER, "max_tokens": 10})[1]
  assert protocol.max_new_tokens(p, 50, 64) == 10
  assert protocol.max_new_tokens(protocol.split({"messages": USER})[1], 50, 64) == 15
  with pytest.raises(ApiError, match="at most 5"):
    protocol.max_new_tokens(p, 60, 64)
  with pytest.raises(ApiError, match="65 tokens"):
    protocol.max_new_tokens(p, 65, 64)


def test_reasoning_content_and_tool_calls(tok):
  ids = ([THINK] + _ids(tok, "Paris, so call it.") + [END_THINK] + _ids(tok, "Let me check.")
         + [TOOL_CALLS] + _ids(tok, "get_weather") + [ARGS] + _ids(tok, '{"city": "Paris"}')
         + [TOOL_CALLS] + _ids(tok, "get_time") + [ARGS] + _ids(tok, "{}") + [EOS])
  answer = Answer(tok)
  deltas = _feed(answer, ids)
  assert answer.finish_reason == "tool_calls" and answer.tokens == len(ids)
  message = answer.message()
  assert message["reasoning_content"] == "Paris, so call it."
  assert message["content"] == "Let me check."
  calls = message["tool_calls"]
  assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
      ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
  assert all(len(c["id"]) == 9 and c["id"].isalnum() and c["type"] == "function"
             for c in calls)
  starts = [d["tool_calls"][0] for d in deltas if "id" in d.get("tool_calls", [{}])[0]]
  assert [(s["index"], s["id"]) for s in starts] == [(0, calls[0]["id"]), (1, calls[1]["id"])]
  assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas
                 if "tool_calls" in d) == '{"city": "Paris"}{}'
  assert "".join(d.get("reasoning_content", "") for d in deltas) == "Paris, so call it."


def test_a_stop_string_ends_the_content_even_across_tokens(tok):
  answer = Answer(tok, stop=("END", "xyz"))
  deltas = _feed(answer, _ids(tok, "one two EN") + _ids(tok, "D three") + [EOS])
  assert answer.stopped and answer.finish_reason == "stop"
  assert answer.message()["content"] == "".join(d["content"] for d in deltas) == "one two "


def test_held_back_content_is_released(tok):
  answer = Answer(tok, stop=("two three",))
  deltas = _feed(answer, _ids(tok, "one two") + _ids(tok, " four") + [EOS])
  assert not answer.stopped and answer.finish_reason == "stop"
  assert "".join(d["content"] for d in deltas) == "one two four"


def test_the_token_limit_finishes_with_length(tok):
  answer = Answer(tok)
  _feed(answer, _ids(tok, "cut here"), finish="length")
  assert answer.finish_reason == "length" and answer.message()["content"] == "cut here"
