"""The REST server's HTTP-level guarantees (issue 17 item 6), over raw sockets.

Ambiguous body framing is refused and the connection closed unread (no
request smuggling); handler threads are a fixed pool whatever the number of
connections; idle connections give their thread up to waiting ones; a full
queue is answered 503. Plus the pieces in-process: the byte budget, and the
numeric-array decoder against json.loads.
"""

import json
import os
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from tests.e2e.test_export import sample_images, trained_model
from tests.e2e.test_serving import MODEL, Server
from tff_dpmed.serving import export
from tff_dpmed.serving import numeric_arrays
from tff_dpmed.serving import pooled_http

THREADS = 2
_STATUS = f"/v1/models/{MODEL}"
_PREDICT = f"/v1/models/{MODEL}:predict"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  model, info, metadata = trained_model()
  base = str(tmp_path_factory.mktemp("http"))
  export.export_saved_model(model, info, base, MODEL, metadata)
  srv = Server(os.path.join(base, MODEL),
               str(tmp_path_factory.mktemp("log") / "server.log"),
               f"--rest_api_num_threads={THREADS}")
  yield srv
  srv.stop()


def _connect(server, timeout: float = 30) -> socket.socket:
  return socket.create_connection(("127.0.0.1", server.rest_port), timeout=timeout)


def _exchange(server, raw: bytes, timeout: float = 30) -> bytes:
  """Sends raw bytes; returns everything the server sends until it closes."""
  with _connect(server, timeout) as sock:
    sock.sendall(raw)
    chunks = []
    while True:
      chunk = sock.recv(65536)
      if not chunk:
        return b"".join(chunks)
      chunks.append(chunk)


def _responses(data: bytes) -> list[tuple[int, dict]]:
  out = []
  while data:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers["Content-Length"])
    out.append((int(lines[0].split()[1]), json.loads(rest[:length])))
    data = rest[length:]
  return out


_SMUGGLED = b"GET /v1/models/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("headers, status, message", [
    (b"Content-Length: 2\r\nContent-Length: 2\r\n", 400, "2 Content-Length headers"),
    (b"Content-Length: 2\r\nContent-Length: 60\r\n", 400, "2 Content-Length headers"),
    (b"Content-Length: +2\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 0x2\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 1_0\r\n", 400, "bad Content-Length"),
    (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", 400,
     "both Transfer-Encoding and Content-Length"),
    (b"Content-Length : 2\r\n", 400, "malformed header line"),
    (b"X-Other: 1\r\nTransfer-Encoding\t: chunked\r\nContent-Length: 2\r\n", 400,
     "malformed header line"),
    (b"Transfer-Encoding: chunked\r\n", 411, "send Content-Length"),
    (b"Transfer-Encoding: gzip, chunked\r\n", 411, "send Content-Length"),
])
def test_ambiguous_framing_is_refused_and_nothing_smuggled(server, headers, status,
                                                          message):
  # Whatever length a proxy in front assumed, the bytes after the headers
  # include a whole second request: it must never be answered.
  raw = (b"POST " + _PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers +
         b"\r\n{}" + _SMUGGLED)
  responses = _responses(_exchange(server, raw))
  assert len(responses) == 1, responses
  got_status, body = responses[0]
  assert got_status == status and message in body["error"], body


def test_framing_is_checked_on_get_and_on_expect_100_too(server):
  raw = (f"GET {_STATUS} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
         "Content-Length: 0\r\n\r\n").encode() + _SMUGGLED
  assert [s for s, _ in _responses(_exchange(server, raw))] == [400]
  # A GET whose body a lenient proxy framed with "Content-Length : n".
  raw = (f"GET {_STATUS} HTTP/1.1\r\nHost: x\r\nContent-Length : "
         f"{len(_SMUGGLED)}\r\n\r\n").encode() + _SMUGGLED
  assert [s for s, _ in _responses(_exchange(server, raw))] == [400]
  raw = (f"POST {_PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
         "Content-Length: 3\r\nExpect: 100-continue\r\n\r\n").encode()
  assert [s for s, _ in _responses(_exchange(server, raw))] == [400]


def test_one_good_request_still_keeps_the_connection(server):
  raw = (f"GET {_STATUS} HTTP/1.1\r\nHost: x\r\n\r\n"
         f"GET {_STATUS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
  assert [s for s, _ in _responses(_exchange(server, raw))] == [200, 200]


def test_threads_stay_bounded_and_idle_connections_yield(server):
  process = psutil.Process(server.proc.pid)
  before = process.num_threads()
  idle = [_connect(server) for _ in range(40)]
  try:
    time.sleep(1.0)
    # One thread per connection would have added 40.
    assert process.num_threads() <= before + 1, (before, process.num_threads())
    # The idle connections hold both handler threads; a real request is
    # served anyway once they give them up (busy_idle_seconds each).
    start = time.monotonic()
    responses = _responses(_exchange(
        server, f"GET {_STATUS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        .encode(), timeout=60))
    assert [s for s, _ in responses] == [200]
    assert time.monotonic() - start < 50
  finally:
    for sock in idle:
      sock.close()


def test_full_queue_is_answered_503(server):
  sockets = []
  try:
    # The pool's threads, its queue and the kernel's backlog: then 503.
    for _ in range(THREADS + 2 * pooled_http.LISTEN_BACKLOG + 40):
      sockets.append(_connect(server))
    busy = 0
    for sock in sockets[-20:]:
      sock.settimeout(5)
      try:
        data = sock.recv(65536)
      except socket.timeout:
        continue
      if data.startswith(b"HTTP/1.1 503"):
        busy += 1
        assert b"the server is busy" in data and b"Retry-After: 1" in data
    assert busy > 0
  finally:
    for sock in sockets:
      sock.close()
  # And it recovers.
  responses = _responses(_exchange(
      server, f"GET {_STATUS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
      .encode(), timeout=60))
  assert [s for s, _ in responses] == [200]


def test_large_row_body_decodes_to_the_same_prediction(server):
  images = sample_images(8, seed=11)
  bodies = [json.dumps({"instances": images.tolist()}),
            # Pretty-printed and with float tokens: still plain numbers.
            json.dumps({"inputs": {"images": images.tolist()}}, indent=1)]
  answers = []
  for body in bodies:
    raw = (f"POST {_PREDICT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    ((status, answer),) = _responses(_exchange(server, raw))
    assert status == 200, answer
    answers.append(answer)
  rows = [r["probabilities"] for r in answers[0]["predictions"]]
  assert rows == answers[1]["outputs"]["probabilities"]


# --- in-process pieces -----------------------------------------------------------


def test_byte_budget_waits_then_gives_up():
  budget = pooled_http.ByteBudget(100)
  assert budget.acquire(80, timeout=1)
  start = time.monotonic()
  assert not budget.acquire(30, timeout=0.3)
  assert time.monotonic() - start >= 0.3
  threading.Timer(0.2, budget.release, args=(80,)).start()
  assert budget.acquire(30, timeout=5)
  budget.release(30)
  assert budget.acquire(100, timeout=0)  # Empty: the largest one fits.


_PAD = ", 1" * 3000  # Long enough for numeric_arrays to take the span.


@pytest.mark.parametrize("array", [
    "[1, 2, 3", "[[1, 2], [3, 4]", "[-0, 1e5, 2.5E-3, 0.25", "[[[255]], [[0]]",
    "[1 2, 3", "[1, , 2", "[+1, 2", "[01, 2", "[.5, 1", "[5., 1", "[1, 2,",
    "[[1, 2], [3]", "[1, 99999999999999999999", "[1e5e3, 2", "[--1, 2",
    "[1, [2]", "[[], 1", "[1\f, 2",
])
def test_numeric_arrays_accept_exactly_what_json_accepts(array):
  body = ('{"x": ' + array + _PAD + "]}").encode()
  try:
    want = json.loads(body)
  except ValueError as e:
    with pytest.raises(ValueError) as got:
      numeric_arrays.loads(body)
    assert str(got.value) == str(e)  # The same message and offset.
    return
  got = numeric_arrays.loads(body)
  if isinstance(got["x"], np.ndarray):
    assert np.asarray(want["x"]).shape == got["x"].shape
    np.testing.assert_array_equal(np.asarray(want["x"], dtype=got["x"].dtype),
                                  got["x"])
    assert (got["x"].dtype.kind == "f") == (np.asarray(want["x"]).dtype.kind == "f")
  else:
    assert got == want


def test_numeric_arrays_leave_strings_alone():
  text = "[" + "1," * 3000 + "1]"
  body = json.dumps({"signature_name": text, "instances": [1]}).encode()
  assert numeric_arrays.loads(body) == {"signature_name": text, "instances": [1]}


def test_stop_closes_idle_connections_promptly(tmp_path):
  from tff_dpmed.serving import model_store, rest  # pylint: disable=g-import-not-at-top
  store = model_store.ModelStore("m", str(tmp_path))  # No versions: status only.
  server = rest.RestServer(store, "127.0.0.1", 0, 1 << 20, num_threads=4)
  server.start()
  idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30)
          for _ in range(4)]
  try:
    time.sleep(0.5)  # Each holds a thread, waiting for a request.
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5
    for sock in idle:
      assert sock.recv(1) == b""  # Closed by the server.
  finally:
    for sock in idle:
      sock.close()


_BIG = "[" + ", ".join(["[1, 2, 3]"] * 800) + "]"


@pytest.mark.parametrize("body", [
    '{"instances": BIG, "x": }',
    '{"instances": BIG "x": 1}',
    '{"note": "\u00e9\u4e2d", "instances": BIG,\n "x": [1, 2,] }',
    '{BIG: 1}',
    '{"a": 1, BIG: 1}',
    '{"instances": BIG',
    '{"instances": [BIG, BIG, {"b64": "AA=="}, BIG]}',
    '{"s": "BIG", "t": "\\" BIG", "instances": BIG}',
])
def test_numeric_arrays_errors_and_strings_match_json_loads(body):
  body = body.replace("BIG", _BIG).encode()
  try:
    want = json.loads(body)
  except ValueError as e:
    with pytest.raises(ValueError) as got:
      numeric_arrays.loads(body)
    assert str(got.value) == str(e)
    return
  got = numeric_arrays.loads(body)
  assert json.dumps(got, default=lambda a: a.tolist()) == json.dumps(want)
  if "instances" in got and not isinstance(got["instances"], list):
    assert isinstance(got["instances"], np.ndarray)  # Took the fast path.
