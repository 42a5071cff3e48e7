"""The server: the app on uvicorn, with the engine's thread beside it.

    server = Server(engine, tokenizer, "small4", host="127.0.0.1", port=8000)
    server.run()           # in the foreground, until Ctrl-C or an engine failure
    port = server.start()  # or in a thread (tests, benchmarks): port 0 picks a free one
    server.stop()

If the engine thread fails, every open request gets an error, the server stops accepting
and shuts down, and `run()` raises EngineFailed: a supervisor sees the process exit rather
than a server that hangs its clients.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from smallfour.chat import ChatTokenizer
from smallfour.inference.engine import Engine, EngineFailed
from smallfour.serve.app import make_app

log = logging.getLogger(__name__)


class Server:
  """`make_app` served by uvicorn on `host:port`, with `engine`'s thread."""

  def __init__(self, engine: Engine, tok: ChatTokenizer, model_name: str, *,
               host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    self.engine, self.host, self.port = engine, host, port
    config = uvicorn.Config(make_app(engine, tok, model_name), host=host, port=port,
                            log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
    self._uvicorn = uvicorn.Server(config)
    self._thread: threading.Thread | None = None

  def run(self, sock: socket.socket | None = None) -> None:
    """Serves until stopped; raises EngineFailed if that was the engine failing."""
    self.engine.start(on_failure=self._engine_failed)
    try:
      self._uvicorn.run(sockets=[sock] if sock is not None else None)
    finally:
      self.engine.stop(timeout=30)
    if self.engine.failure is not None:
      raise EngineFailed(f"the engine failed: {self.engine.failure!r}") from self.engine.failure

  def start(self, timeout: float = 60) -> int:
    """Serves from a thread; returns the port once it accepts connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((self.host, self.port))
    self.port = sock.getsockname()[1]
    self._thread = threading.Thread(target=self._run_quietly, args=(sock,),
                                    name="smallfour-server", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + timeout
    while not self._uvicorn.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError(f"the server did not start within {timeout} s")
      time.sleep(0.02)
    return self.port

  def stop(self, timeout: float = 30) -> None:
    self._uvicorn.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout)
      if self._thread.is_alive():
        raise RuntimeError(f"the server did not stop within {timeout} s")

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def _run_quietly(self, sock: socket.socket) -> None:
    try:
      self.run(sock)
    except EngineFailed:
      pass  # logged by _engine_failed; `alive` and /health tell

  def _engine_failed(self, error: BaseException) -> None:
    log.critical("the engine thread failed; shutting the server down", exc_info=error)
    self._uvicorn.should_exit = True
