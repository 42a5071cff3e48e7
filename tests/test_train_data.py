"""Training data: the assistant-token mask comes from mistral-common's encoding, bad JSONL
lines are named by number (refused or skipped), nothing-to-train-on is refused, and the
batch order is a pure function of (seed, step)."""

import json

import numpy as np
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from smallfour.chat import ChatRequestError, ChatTokenizer
from smallfour.train import data

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "abcDEF123", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATION = {"tools": TOOLS, "reasoning_effort": "high", "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "18C"},
    {"role": "assistant", "content": "It is 18C.", "reasoning_content": "Easy."}]}
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "content": "4"}]}


@pytest.fixture(scope="module")
def tok():
  return ChatTokenizer.builtin()


def _spans(ids, mask):
  spans, current = [], []
  for t, m in zip(ids, mask):
    if m:
      current.append(t)
    elif current:
      spans.append(current)
      current = []
  return spans + ([current] if current else [])


def test_mask_marks_exactly_the_assistant_turns(tok):
  ids, mask = tok.encode_for_training(CONVERSATION)
  assert [tok.render(s) for s in _spans(ids, mask)] == [
      "Hello!</s>", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>',
      "[THINK]Easy.[/THINK]It is 18C.</s>"]
  # The ids are mistral-common's own encoding of the conversation (fine-tuning mode) ...
  request = ChatCompletionRequest.from_openai(CONVERSATION["messages"], tools=TOOLS,
                                              reasoning_effort="high")
  assert ids == tok._finetuning.encode_chat_completion(request).tokens
  # ... and each turn starts where the prompt the model would answer ends.
  prompt = tok.encode({**CONVERSATION, "messages": CONVERSATION["messages"][:6]})
  assert ids[:len(prompt)] == prompt and not mask[len(prompt) - 1] and mask[len(prompt)]


@pytest.mark.parametrize("request_, match", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    ({"messages": CONVERSATION["messages"][:4], "tools": TOOLS},
     r"messages\[3\].role: .* ends with a message of role 'user'"),
    ({**CHAT, "reasoning_effort": "low"}, "reasoning_effort: 'low'"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, r"messages\[0\].role"),
    ({"messages": "hello"}, "non-empty list"),
    (["not", "an", "object"], "JSON object"),
])
def test_bad_training_requests_name_the_culprit(tok, request_, match):
  with pytest.raises(ChatRequestError, match=match):
    tok.encode_for_training(request_)


def _write(tmp_path, lines):
  path = tmp_path / "data.jsonl"
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_bad_lines_are_named_by_number(tmp_path, tok):
  good = json.dumps(CHAT)
  path = _write(tmp_path, [good, "", '{"messages": [', json.dumps({"messages": [
      {"role": "user", "content": "Hi"}]}), good])
  with pytest.raises(data.DataError, match=r"data.jsonl:3: not valid JSON"):
    data.read_jsonl(path, tok, 64, 131072)
  warnings = []
  dataset = data.read_jsonl(path, tok, 64, 131072, on_bad_line="skip", warn=warnings.append)
  assert [e.line for e in dataset.examples] == [1, 5]
  assert dataset.skipped == 2 and dataset.lines == 4
  assert "data.jsonl:3: not valid JSON" in warnings[0]
  assert "data.jsonl:4: no assistant message" in warnings[1]


def test_nothing_to_train_on_is_refused(tmp_path, tok):
  path = _write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "Hi"}]})])
  with pytest.raises(data.DataError, match="nothing to train on"):
    data.read_jsonl(path, tok, 64, 131072, on_bad_line="skip", warn=lambda _: None)
  with pytest.raises(data.DataError, match="nothing to train on"):
    data.read_jsonl(_write(tmp_path, ["", "  "]), tok, 64, 131072)


def test_truncation_keeps_only_examples_with_assistant_tokens(tmp_path, tok):
  long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                              {"role": "assistant", "content": "ok"}]}
  path = _write(tmp_path, [json.dumps(long_prompt), json.dumps(CHAT)])
  with pytest.raises(data.DataError, match=r":1: no assistant token within the first 33"):
    data.read_jsonl(path, tok, 32, 131072)
  long_answer = {"messages": [CHAT["messages"][0],
                              {"role": "assistant", "content": "yes " * 100}]}
  dataset = data.read_jsonl(_write(tmp_path, [json.dumps(long_answer)]), tok, 32, 131072)
  assert dataset.truncated == 1 and len(dataset.examples[0].ids) == 33


def test_tokenizer_must_fit_the_model(tmp_path, tok):
  with pytest.raises(data.DataError, match="131072 ids; the model's vocabulary 512"):
    data.read_jsonl(_write(tmp_path, [json.dumps(CHAT)]), tok, 32, 512)


def test_batches_shift_targets_and_mask_and_repeat_per_seed(tmp_path, tok):
  lines = [json.dumps({"messages": [{"role": "user", "content": f"Count to {i}"},
                                    {"role": "assistant", "content": str(i)}]})
           for i in range(5)]
  dataset = data.read_jsonl(_write(tmp_path, lines), tok, 40, 131072)
  batches = data.Batches(dataset, batch_size=3, seq_len=40, seed=7)
  b = batches.batch(0)
  ex = batches.example(0)
  n = len(ex.ids) - 1
  np.testing.assert_array_equal(b["tokens"][0, :n], ex.ids[:-1])
  np.testing.assert_array_equal(b["targets"][0, :n], ex.ids[1:])
  np.testing.assert_array_equal(b["loss_mask"][0, :n], ex.mask[1:])
  assert b["valid"][0].sum() == n and not b["loss_mask"][0, n:].any()
  # Every epoch visits every example once; the order depends only on (seed, epoch).
  seen = [batches.example(i).line for i in range(10)]
  assert sorted(seen[:5]) == sorted(seen[5:]) == [1, 2, 3, 4, 5]
  again = data.Batches(dataset, batch_size=3, seq_len=40, seed=7)
  for step in (3, 1):
    for k in b:
      np.testing.assert_array_equal(again.batch(step)[k], batches.batch(step)[k])
  other = data.Batches(dataset, batch_size=3, seq_len=40, seed=8)
  assert [other.example(i).line for i in range(5)] != seen[:5]


@pytest.mark.parametrize("max_seq_len, chunk, layout", [
    (128, 512, (128, 128)), (1000, 512, (1008, 504)), (4096, 512, (4096, 512)),
    (30, 16, (32, 16))])
def test_sequence_layout(max_seq_len, chunk, layout):
  assert data.sequence_layout(max_seq_len, chunk) == layout
