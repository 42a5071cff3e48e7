"""The server through the official `openai` client, as a new user would, on the tiny preset.

Everything is bounded: the server runs in a thread on a free localhost port, every client
call has a timeout and no retries, and every wait polls against a deadline.
"""

import concurrent.futures
import json
import socket
import time
import types
import urllib.error
import urllib.request

import openai
import pytest
from flax import nnx

from smallfour import configs
from smallfour.chat import ChatTokenizer
from smallfour.inference.engine import Engine
from smallfour.inference.requests import Event, Request
from smallfour.nn.decoder import Transformer
from smallfour.serve.server import Server
from tests import launch_many

MAX_LEN, MAX_BATCH = 256, 4
TIMEOUT = 120
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
QUESTIONS = ["Name the capital of France.", "What is 17 * 23?", "Hi", "Write a haiku.",
             "¿Qué hora es?", "List three colours."]


def _user(text):
  return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tok():
  return ChatTokenizer.builtin()


@pytest.fixture(scope="module")
def model():
  return Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def server(tok, model):
  engine = Engine(model, max_batch=MAX_BATCH, max_len=MAX_LEN, max_queue=8, eos_id=tok.eos_id,
                  max_num_batched_tokens=64)
  server = Server(engine, tok, "tiny", port=0, log_level="warning")
  server.start()
  yield server
  server.stop()


def _client(server):
  return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                       max_retries=0, timeout=TIMEOUT)


@pytest.fixture
def client(server):
  return _client(server)


def _health(server) -> dict:
  with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as r:
    return json.load(r)


def _until(condition, seconds=60):
  deadline = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def _streamed(client, **kwargs) -> dict:
  """A streamed answer put together: content, reasoning, tool calls, finish, usage."""
  out = {"content": "", "reasoning": "", "calls": {}, "finish": None, "usage": None}
  for chunk in client.chat.completions.create(
      model="tiny", stream=True, stream_options={"include_usage": True}, **kwargs):
    if chunk.usage is not None:
      out["usage"] = chunk.usage
    for choice in chunk.choices:
      d = choice.delta
      out["content"] += d.content or ""
      out["reasoning"] += getattr(d, "reasoning_content", None) or ""
      for call in d.tool_calls or []:
        slot = out["calls"].setdefault(call.index, {"id": call.id, "name": "", "args": ""})
        slot["name"] += call.function.name or ""
        slot["args"] += call.function.arguments or ""
      out["finish"] = choice.finish_reason or out["finish"]
  return out


@pytest.mark.parametrize("effort", ["none", "high"])
def test_streamed_deltas_add_up_to_the_answer(client, effort):
  """"high" samples at temperature 0.7 (the model card's): the seed makes it repeatable."""
  ask = {"messages": _user("What is 17 * 23?"), "reasoning_effort": effort, "max_tokens": 24,
         "seed": 11}
  whole = client.chat.completions.create(model="tiny", **ask)
  streamed = _streamed(client, **ask)
  message = whole.choices[0].message
  assert message.role == "assistant" and whole.object == "chat.completion"
  assert streamed["content"] == (message.content or "")
  assert streamed["reasoning"] == (getattr(message, "reasoning_content", None) or "")
  assert streamed["finish"] == whole.choices[0].finish_reason
  for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
    assert getattr(streamed["usage"], field) == getattr(whole.usage, field)
  # the same prompt again: all its whole pages but the one holding its last token are cached
  page = 16
  cached = streamed["usage"].prompt_tokens_details.cached_tokens
  assert cached == (whole.usage.prompt_tokens - 1) // page * page
  assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens == 25  # spec §6.2


def test_models_and_health(client, server):
  (model,) = client.models.list().data
  assert model.id == "tiny" and model.owned_by == "smallfour"
  assert _health(server) == {"status": "ok", "active_slots": 0, "waiting": 0,
                             "max_batch": MAX_BATCH}


def test_a_tools_request(client):
  plain = client.chat.completions.create(model="tiny", messages=_user("Weather in Paris?"),
                                         max_tokens=4)
  tools = client.chat.completions.create(model="tiny", messages=_user("Weather in Paris?"),
                                         tools=WEATHER, max_tokens=4)
  assert tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools JSON
  assert tools.choices[0].finish_reason in ("length", "stop", "tool_calls")


class _Scripted:
  """Stands in for the engine: answers every request with `ids` (random weights never call
  a tool), so the HTTP layer's tool-call path runs through the real client."""

  max_batch, context_tokens, active, waiting, failure = 1, MAX_LEN, 0, 0, None

  def __init__(self, ids):
    self.ids = ids

  def submit(self, request, sink):
    del request
    for i, t in enumerate(self.ids):
      sink(Event(t, "stop" if i == len(self.ids) - 1 else None))
    return types.SimpleNamespace(cancel=lambda: None, cached_tokens=0)

  def start(self, on_failure=None):
    pass

  def stop(self, timeout=None):
    pass


def test_a_tool_call_round_trip(client, tok):
  text = lambda s: tok.mistral.instruct_tokenizer.tokenizer.encode(s, bos=False, eos=False)  # noqa
  ids = ([34] + text("Call get_weather.") + [35, 9] + text("get_weather") + [32]
         + text('{"city": "Paris"}') + [2])
  scripted = Server(_Scripted(ids), tok, "tiny", port=0, log_level="warning")
  scripted.start()
  try:
    ask = {"messages": _user("Weather in Paris?"), "tools": WEATHER,
           "reasoning_effort": "high"}
    whole = _client(scripted).chat.completions.create(model="tiny", **ask)
    streamed = _streamed(_client(scripted), **ask)
  finally:
    scripted.stop()
  choice = whole.choices[0]
  (call,) = choice.message.tool_calls
  assert choice.finish_reason == streamed["finish"] == "tool_calls"
  assert (call.type, call.function.name, call.function.arguments) == (
      "function", "get_weather", '{"city": "Paris"}')
  assert len(call.id) == 9 and call.id.isalnum() and choice.message.content is None
  assert choice.message.reasoning_content == streamed["reasoning"] == "Call get_weather."
  assert [(c["name"], c["args"], len(c["id"])) for c in streamed["calls"].values()] == [
      ("get_weather", '{"city": "Paris"}', 9)]
  # Round 2, on the model: the call and its result go back; the answer is in words.
  messages = ask["messages"] + [
      {"role": "assistant", "content": None, "reasoning_content": "Call get_weather.",
       "tool_calls": [call.model_dump(exclude_none=True)]},
      {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18, "sky": "cloudy"}'}]
  second = client.chat.completions.create(model="tiny", messages=messages, tools=WEATHER,
                                          reasoning_effort="high", max_tokens=8, seed=1)
  first = client.chat.completions.create(model="tiny", max_tokens=1, **ask)
  assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(ids) - 1
  assert second.choices[0].message.role == "assistant"


def test_concurrent_greedy_answers_equal_each_alone(server):
  """Six requests on four slots, streamed and not: nothing lost or mixed between streams."""
  asks = [{"messages": _user(q), "max_tokens": 12 + 4 * i} for i, q in enumerate(QUESTIONS)]
  client = _client(server)
  alone = [client.chat.completions.create(model="tiny", **a).choices[0].message.content
           for a in asks]

  def one(i):
    c = _client(server)
    if i % 2:
      return _streamed(c, **asks[i])["content"]
    return c.chat.completions.create(model="tiny", **asks[i]).choices[0].message.content

  with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
    together = [f.result(TIMEOUT) for f in [pool.submit(one, i) for i in range(len(asks))]]
  assert together == alone
  assert len(set(alone)) == len(alone)


SYSTEM = "You are a careful assistant. " * 12


def test_a_shared_prefix_is_served_from_the_cache(server, client, tok, model):
  """The second conversation shares the first's system prompt: its cached tokens are at
  least that prefix in whole pages, and its answer is the one computed without a cache."""
  ask = lambda q: [{"role": "system", "content": SYSTEM}, *_user(q)]  # noqa: E731
  first = client.chat.completions.create(model="tiny", messages=ask("Hi"), max_tokens=8)
  second = client.chat.completions.create(model="tiny", messages=ask("Hello"), max_tokens=8)
  ids = [tok.encode({"messages": ask(q)}) for q in ("Hi", "Hello")]
  shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
  page = server.engine.page_size
  assert shared > 4 * page
  assert first.usage.prompt_tokens_details.cached_tokens <= page  # nothing shared before
  assert second.usage.prompt_tokens_details.cached_tokens >= shared // page * page
  uncached = Engine(model, max_batch=1, max_len=MAX_LEN, eos_id=tok.eos_id,
                    prefix_caching=False)
  (tokens, _), = uncached.run([Request(tuple(ids[1]), 8)])
  assert second.choices[0].message.content == (tok.parse(tokens)["content"] or None)


def test_metrics_in_the_prometheus_format(server, client):
  client.chat.completions.create(model="tiny", messages=_user("Hi"), max_tokens=3)
  with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
    text = r.read().decode()
  values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}
  for name in ("requests_running", "requests_waiting", "cache_pages_used",
               "prefix_cache_hit_tokens_total", "preemptions_total"):
    assert f"smallfour_{name}" in values, name
  assert values["smallfour_cache_pages_total"] == MAX_BATCH * MAX_LEN // server.engine.page_size
  assert values["smallfour_prompt_tokens_total"] > 0
  assert values["smallfour_generation_tokens_total"] >= 3
  assert values["smallfour_time_to_first_token_seconds_count"] >= 1
  assert values["smallfour_inter_token_latency_seconds_count"] >= 2


def _post_raw(server, data: bytes) -> tuple[int, dict]:
  request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                                   data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
      return r.status, json.load(r)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


@pytest.mark.parametrize("ask, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": _user("Hi"), "reasoning_effort": "medium"}, "reasoning_effort"),
    ({"messages": _user("Hi"), "max_tokens": -5}, "max_tokens"),
    ({"messages": _user("word " * MAX_LEN)}, "messages"),  # longer than the context
    (b'{"messages": [', None),  # malformed JSON
])
def test_bad_requests_get_a_400_and_others_keep_streaming(server, ask, param):
  client = _client(server)
  want = client.chat.completions.create(model="tiny", messages=_user("Hi"), max_tokens=30)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    running = pool.submit(_streamed, client, messages=_user("Hi"), max_tokens=30)
    data = ask if isinstance(ask, bytes) else json.dumps({"model": "tiny", **ask}).encode()
    status, body = _post_raw(server, data)
    assert running.result(TIMEOUT)["content"] == want.choices[0].message.content
  assert status == 400
  assert body["error"]["type"] == "invalid_request_error"
  assert body["error"]["param"] == param, body


def test_the_client_raises_bad_request(client):
  with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
    client.chat.completions.create(model="tiny", messages=_user("Hi"),
                                   reasoning_effort="medium")


@pytest.fixture
def slow(server, monkeypatch):
  """Steps of at least 0.1 s: 200 tokens take 20 s, so a slot freed within 10 s was freed
  by the disconnect, not by the answer ending."""
  step = server.engine.step

  def slow_step():
    time.sleep(0.1)
    return step()

  monkeypatch.setattr(server.engine, "step", slow_step)


def test_a_disconnect_frees_the_slot(server, client, slow):
  stream = client.chat.completions.create(model="tiny", messages=_user("Hi"), max_tokens=200,
                                          stream=True)
  for _, chunk in zip(range(4), stream):
    pass
  assert _health(server)["active_slots"] == 1
  stream.close()
  _until(lambda: _health(server)["active_slots"] == 0, 10)
  # Unstreamed: the client goes away while it waits for the whole answer.
  body = json.dumps({"model": "tiny", "messages": _user("Hi"), "max_tokens": 200}).encode()
  with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    _until(lambda: _health(server)["active_slots"] == 1)
  _until(lambda: _health(server)["active_slots"] == 0, 10)


def test_a_full_queue_gets_429(server, client, slow, monkeypatch):
  monkeypatch.setattr(server.engine, "max_queue", 0)
  streams = [client.chat.completions.create(model="tiny", messages=_user(q), max_tokens=200,
                                            stream=True) for q in QUESTIONS[:MAX_BATCH]]
  try:
    _until(lambda: _health(server)["active_slots"] == MAX_BATCH)
    with pytest.raises(openai.RateLimitError, match="busy"):
      client.chat.completions.create(model="tiny", messages=_user("Hi"), max_tokens=2)
  finally:
    for s in streams:
      s.close()
  _until(lambda: _health(server)["active_slots"] == 0, 10)


def test_an_engine_failure_takes_the_server_down(tok, monkeypatch):
  model = Transformer(configs.resolve("tiny"), rngs=nnx.Rngs(0))
  engine = Engine(model, max_batch=2, max_len=MAX_LEN, eos_id=tok.eos_id)

  def boom():
    raise RuntimeError("device lost")

  monkeypatch.setattr(engine, "step", boom)
  server = Server(engine, tok, "tiny", port=0, log_level="critical")
  server.start()
  try:
    with pytest.raises(openai.APIError, match="device lost"):
      _streamed(_client(server), messages=_user("Hi"), max_tokens=5)
    _until(lambda: not server.alive, 30)
  finally:
    server.stop()


def test_the_launcher_refuses_bad_weights_in_one_line(tmp_path):
  """Both refusals from one interpreter (tests/launch_many.py)."""
  cases = [
      (["--ckpt={tmp}"], "error: {tmp} is not a converted smallfour checkpoint (no "
                         "{tmp}/smallfour_config.json)"),
      (["--config=tiny", "--weights_dtype=int4", "--group_size=7"],
       "error: --group_size=7 does not divide hidden_size=64, an input dim of the routed "
       "experts; pick a divisor"),
  ]
  runs = launch_many.run("serve.py", [[*(f.format(tmp=tmp_path) for f in flags), "--port=0"]
                                      for flags, _ in cases], timeout=TIMEOUT)
  for (flags, message), run in zip(cases, runs, strict=True):
    assert run.returncode != 0, flags
    assert run.stderr.strip().splitlines()[-1] == message.format(tmp=tmp_path)
