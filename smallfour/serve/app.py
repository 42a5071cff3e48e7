"""The HTTP layer (Starlette): OpenAI-compatible endpoints over the `Engine`.

  POST /v1/chat/completions  streamed (server-sent events) or whole
  GET  /v1/models            the one model
  GET  /health               200 with the slot counts; 503 once the engine has failed
  GET  /metrics              Prometheus text format (`smallfour.serve.metrics`)

A request is checked and encoded (`smallfour.serve.protocol`, `ChatTokenizer.encode`) and its
length checked against the cache before it is queued, so a bad one costs no engine work and
gets a 400 naming the culprit. Tokens come back from the engine thread through a per-request
queue on the event loop; a client that goes away cancels its request: a waiting one leaves
the queue at once, a running one frees its pages before the next step. A request whose own
prefill fails gets a 500; the others go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from smallfour.chat import ChatRequestError, ChatTokenizer
from smallfour.inference.engine import Engine
from smallfour.inference.requests import (EngineFailed, Event, QueueFull, Request,
                                          RequestError)
from smallfour.serve import protocol
from smallfour.serve.metrics import CONTENT_TYPE, Metrics
from smallfour.serve.completion import Answer
from smallfour.serve.protocol import ApiError

log = logging.getLogger(__name__)


class _Channel:
  """The sink of one request: engine-thread events onto its event loop's queue."""

  def __init__(self):
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue[Event] = asyncio.Queue()

  def __call__(self, event: Event) -> None:
    try:
      self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
    except RuntimeError:  # the loop is closed: the server has shut down
      pass

  async def get(self) -> Event:
    event = await self.queue.get()
    if event.finish_reason == "error":
      raise ApiError(500, event.error or "the engine failed", kind="server_error")
    return event


def make_app(engine: Engine, tok: ChatTokenizer, model_name: str) -> Starlette:
  """The ASGI app serving `engine` (whose thread the caller runs) under `model_name`."""
  created = int(time.time())
  metrics = Metrics(engine)
  context = engine.context_tokens

  async def chat_completions(request: HttpRequest) -> Response:
    try:
      body = json.loads(await request.body())
    except ValueError as e:
      raise ApiError(400, f"the body is not valid JSON: {e}") from None
    chat, params = protocol.split(body)
    try:
      prompt = await run_in_threadpool(tok.encode, chat)
    except ChatRequestError as e:
      raise protocol.bad_request(str(e)) from None
    max_new = protocol.max_new_tokens(params, len(prompt), context)
    seed = secrets.randbits(32) if params.seed is None else params.seed
    channel = _Channel()
    try:
      ticket = engine.submit(Request(tuple(prompt), max_new, params.sampling, seed),
                             metrics.timed(channel))
    except RequestError as e:
      raise protocol.bad_request(f"messages: {e}") from None
    except QueueFull as e:
      raise ApiError(429, f"the server is busy: {e}", kind="rate_limit_error",
                     code="queue_full") from None
    except EngineFailed as e:
      raise ApiError(503, str(e), kind="server_error") from None
    answer = Answer(tok, params.stop)
    envelope = protocol.Envelope(model_name)
    usage = lambda: protocol.usage(len(prompt), answer.tokens, ticket.cached_tokens)  # noqa: E731
    if params.stream:
      return StreamingResponse(_stream(channel, ticket, answer, envelope, usage,
                                       params.include_usage),
                               media_type="text/event-stream")
    try:
      if not await _until_finished(request, channel, answer):
        return Response(status_code=499)  # nobody is listening
    finally:
      ticket.cancel()  # a no-op once finished; frees the slot otherwise
    return JSONResponse(envelope.response(answer.message(), answer.finish_reason, usage()))

  async def models(request: HttpRequest) -> Response:
    del request
    return JSONResponse({"object": "list", "data": [
        {"id": model_name, "object": "model", "created": created, "owned_by": "smallfour",
         "max_model_len": context}]})

  async def health(request: HttpRequest) -> Response:
    del request
    state = {"active_slots": engine.active, "waiting": engine.waiting,
             "max_batch": engine.max_batch}
    if engine.failure is not None:
      return JSONResponse({"status": f"the engine failed: {engine.failure!r}", **state}, 503)
    return JSONResponse({"status": "ok", **state})

  async def prometheus(request: HttpRequest) -> Response:
    del request
    return Response(metrics.render(), media_type=CONTENT_TYPE)

  async def api_error(request: HttpRequest, e: ApiError) -> Response:
    del request
    return JSONResponse(e.body(), e.status)

  async def http_error(request: HttpRequest, e: HTTPException) -> Response:
    del request
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)

  return Starlette(routes=[
      Route("/v1/chat/completions", chat_completions, methods=["POST"]),
      Route("/v1/models", models),
      Route("/health", health),
      Route("/metrics", prometheus),
  ], exception_handlers={ApiError: api_error, HTTPException: http_error})


async def _stream(channel: _Channel, ticket, answer: Answer, envelope: protocol.Envelope,
                  usage, include_usage: bool) -> AsyncIterator[str]:
  """Server-sent events: a role chunk, one chunk per delta, the finish_reason chunk, usage
  (when asked) and [DONE]. An engine failure ends the stream with an error event. However the
  stream ends (a disconnect cancels the task awaiting the next event), the request is
  cancelled, which frees its slot."""
  try:
    yield _sse(envelope.chunk({"role": "assistant", "content": ""}))
    while answer.finish_reason is None:
      for delta in answer.feed(await channel.get()):
        yield _sse(envelope.chunk(delta))
    yield _sse(envelope.chunk({}, answer.finish_reason))
    if include_usage:
      yield _sse(envelope.usage_chunk(usage()))
    yield "data: [DONE]\n\n"
  except ApiError as e:
    yield _sse(e.body())
  finally:
    ticket.cancel()


async def _until_finished(request: HttpRequest, channel: _Channel, answer: Answer) -> bool:
  """Feeds `answer` until it is finished (True) or the client has gone (False)."""
  gone = asyncio.ensure_future(_disconnected(request))
  try:
    while answer.finish_reason is None:
      event = asyncio.ensure_future(channel.get())
      await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
      if not event.done():
        event.cancel()
        return False
      answer.feed(event.result())
    return True
  finally:
    gone.cancel()


async def _disconnected(request: HttpRequest) -> None:
  while (await request.receive())["type"] != "http.disconnect":
    pass


def _sse(obj: dict) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
