"""http.server's HTTPServer with a fixed pool of handler threads, and a byte budget.

ThreadingHTTPServer starts one thread per connection with no cap; here
`num_threads` threads serve connections taken from a bounded queue, and the
accepting thread answers 503 itself when the queue is full, so neither
threads nor open sockets grow with the number of clients. Handlers can ask
`has_waiting()` to give their thread up after a response (rest.py closes
keep-alive connections then). `ByteBudget` bounds the request bytes that
handlers hold in memory at once.
"""

import http.server
import json
import queue
import socket
import threading
import time
from typing import Optional

DEFAULT_NUM_THREADS = 16
# socketserver's default listen backlog is 5: a burst of a few more clients
# than that got refused connections. Linux caps it at net.core.somaxconn.
LISTEN_BACKLOG = 128


class ByteBudget:
  """Bytes of request bodies that may be in memory at once, across threads."""

  def __init__(self, limit: int):
    self.limit = limit
    self._used = 0
    self._cond = threading.Condition()

  def acquire(self, n: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with self._cond:
      # An empty budget admits any request: max_request_bytes <= limit.
      while self._used and self._used + n > self.limit:
        left = deadline - time.monotonic()
        if left <= 0:
          return False
        self._cond.wait(left)
      self._used += n
      return True

  def release(self, n: int) -> None:
    with self._cond:
      self._used -= n
      self._cond.notify_all()


class PooledHTTPServer(http.server.HTTPServer):
  """An HTTPServer whose handlers run on a fixed pool of threads."""

  allow_reuse_address = True
  request_queue_size = LISTEN_BACKLOG
  # While connections wait for a thread, an idle keep-alive connection gets
  # this long to send its next request before it is closed.
  busy_idle_seconds = 1.0

  def __init__(self, host: str, port: int, handler_class,
               num_threads: int = DEFAULT_NUM_THREADS):
    if ":" in host:
      self.address_family = socket.AF_INET6
    super().__init__((host, port), handler_class)
    # Accepted connections waiting for a handler thread; when full, new ones
    # are answered 503 at once instead of piling up threads or sockets.
    self._waiting: queue.Queue = queue.Queue(maxsize=LISTEN_BACKLOG)
    # Set by stop(): idle connections close (handlers poll it), threads exit.
    self.stopping = threading.Event()
    self._workers = [threading.Thread(target=self._work, name=f"rest-{i}",
                                      daemon=True) for i in range(num_threads)]
    for worker in self._workers:
      worker.start()
    self._thread: Optional[threading.Thread] = None

  @property
  def port(self) -> int:
    return self.server_address[1]

  def has_waiting(self) -> bool:
    return not self._waiting.empty()

  def process_request(self, request, client_address):
    # Runs on the accepting thread: hand over to the pool, never block.
    try:
      self._waiting.put_nowait((request, client_address))
    except queue.Full:
      _refuse_busy(request)
      self.shutdown_request(request)

  def _work(self) -> None:
    while not self.stopping.is_set():
      item = self._waiting.get()
      if item is None:
        return
      request, client_address = item
      try:
        self.finish_request(request, client_address)
      except Exception:  # pylint: disable=broad-except
        self.handle_error(request, client_address)
      finally:
        self.shutdown_request(request)

  def start(self) -> None:
    self._thread = threading.Thread(target=self.serve_forever,
                                    kwargs={"poll_interval": 0.2},
                                    name="rest-server", daemon=True)
    self._thread.start()

  def stop(self, grace_seconds: float = 10.0) -> None:
    """Stops accepting; requests in progress finish, idle connections close."""
    self.stopping.set()
    self.shutdown()
    self.server_close()
    if self._thread is not None:
      self._thread.join(timeout=grace_seconds)
    while True:  # Connections still waiting for a thread get closed.
      try:
        item = self._waiting.get_nowait()
      except queue.Empty:
        break
      if item is not None:
        self.shutdown_request(item[0])
    for _ in self._workers:
      try:
        self._waiting.put_nowait(None)  # Wakes an idle thread to exit.
      except queue.Full:
        break  # Busy threads see `stopping` when their connection ends.
    deadline = time.monotonic() + grace_seconds
    for worker in self._workers:
      # Daemon threads: one stuck past the deadline does not hold up exit.
      worker.join(timeout=max(0.0, deadline - time.monotonic()))


def _refuse_busy(sock: socket.socket) -> None:
  body = json.dumps({"error": "the server is busy: every handler thread and "
                     "queue slot is taken; retry"}).encode()
  head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
          f"\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\n"
          "Connection: close\r\n\r\n").encode()
  try:
    sock.settimeout(0.5)
    sock.sendall(head + body)
  except OSError:
    pass
