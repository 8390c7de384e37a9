"""TF Serving's REST API over a ModelStore, on the standard library's HTTP server.

  POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict
       {"signature_name": ..., "instances": [...]}  -> {"predictions": [...]}
       {"signature_name": ..., "inputs": ...}       -> {"outputs": ...}
  GET  /v1/models/<name>[/versions/<v>]            model status
  GET  /v1/models/<name>[/versions/<v>]/metadata   signature defs

The JSON formats are json_codec.py's; the answers come from the store
(model_store.py), as the gRPC front-end's do. Errors are {"error": "..."}
with TF Serving's HTTP status for each gRPC code.

What a client cannot make this server do:
- read a body whose framing is ambiguous: two Content-Length headers (equal
  or not), a Content-Length that is not plain digits (int() would take
  "+5", " 5" or "1_0"), a header line the parser drops ("Content-Length :
  5"), or Transfer-Encoding (with Content-Length: 400, without: 411). A proxy in front could read those differently, so one
  request could be smuggled inside another; each such request is refused and
  its connection closed unread;
- read a body over --max_request_bytes (413, before it is sent when the
  client asks with Expect: 100-continue);
- run more than `num_threads` handler threads: connections wait in a bounded
  queue for a free thread (and keep-alive connections are closed after their
  response while others wait); a full queue is answered 503 at once;
- hold more than `max_inflight_bytes` of request bodies in memory at once:
  a request waits for room before its body is read (503 after a while), and
  numeric arrays are decoded without per-number Python objects
  (numeric_arrays.py).
Why the standard library's server and not Werkzeug's or another: see the
REST server section of BUILD_NOTES.md.
"""

import http
import http.server
import json
import logging
import re
import select
import socket
import time
import urllib.parse
from typing import Any, Optional

import grpc

from google.protobuf import json_format
from tensorflow_serving.apis import model_pb2

from tff_dpmed.serving import json_codec
from tff_dpmed.serving import pooled_http
from tff_dpmed.serving.model_store import ModelStore, ServingError, invalid

_log = logging.getLogger("tff_dpmed.serve")

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:"
    r"(predict|classify|regress)", re.IGNORECASE)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?"
    r"(?:/(metadata))?", re.IGNORECASE)

# How much of a refused body is read before closing, at most (see _drain_body).
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
_DRAIN_SECONDS = 2.0
_INT64_MAX = 2**63 - 1
DEFAULT_NUM_THREADS = pooled_http.DEFAULT_NUM_THREADS
# How long a request waits for room under max_inflight_bytes before 503.
_BUDGET_WAIT_SECONDS = 30.0
_IDLE_POLL_SECONDS = 0.25
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


class HttpError(Exception):
  """An error answered with a plain HTTP status, outside the gRPC code table."""

  def __init__(self, status: int, message: str, close: bool = False):
    super().__init__(message)
    self.status = status
    self.message = message
    self.close = close


class _Handler(http.server.BaseHTTPRequestHandler):
  """One request; the server object carries the store and the limits."""

  protocol_version = "HTTP/1.1"  # Keep-alive: clients reuse connections.
  server_version = "tff_dpmed.serve"
  timeout = 60  # A stalled client must not hold a thread forever.
  server: "RestServer"

  def setup(self):
    super().setup()
    # Headers and body go out as separate writes; with Nagle on, the body
    # would wait for the client's delayed ACK (40 ms per request).
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def do_GET(self):  # pylint: disable=invalid-name
    self._dispatch("GET")

  def do_POST(self):  # pylint: disable=invalid-name
    self._dispatch("POST")

  def _method_not_allowed(self):
    self._dispatch(self.command)

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed
  do_HEAD = _method_not_allowed

  def send_error(self, code, message=None, explain=None):
    # BaseHTTPRequestHandler's own errors (bad request line, unknown method):
    # TF Serving's JSON shape instead of an HTML page.
    self.close_connection = True
    self._reply(code, {"error": message or http.HTTPStatus(code).phrase})

  def handle_one_request(self) -> None:
    if not self._wait_for_request():
      self.close_connection = True
      return
    super().handle_one_request()

  def _wait_for_request(self) -> bool:
    """Waits for the next request on this connection; False: close it.

    An idle connection holds one of the few handler threads: once another
    connection waits for a thread, an idle one gets `busy_idle_seconds` more
    and is then closed (HTTP clients reopen keep-alive connections).
    """
    self.connection.settimeout(0)
    try:
      if self.rfile.peek(1):
        return True  # Already read into the buffer (a pipelined request).
    except OSError:
      return True  # Let the request read itself report the error.
    finally:
      self.connection.settimeout(self.timeout)
    poller = select.poll()
    poller.register(self.connection, select.POLLIN)
    idle_since = time.monotonic()
    while True:
      if poller.poll(_IDLE_POLL_SECONDS * 1000):
        return True  # Data, or the client closed (the read then sees EOF).
      idle = time.monotonic() - idle_since
      if idle >= self.timeout or self.server.stopping.is_set():
        return False
      if idle >= self.server.busy_idle_seconds and self.server.has_waiting():
        return False

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    _log.debug("rest %s - %s", self.address_string(), format % args)

  def _reply(self, status: int, payload: dict,
             headers: Optional[dict] = None) -> None:
    body = json.dumps(payload).encode("utf-8")
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      for key, value in (headers or {}).items():
        self.send_header(key, value)
      if not self.close_connection and self.server.has_waiting():
        # Hand this thread to a waiting connection; the client reconnects.
        self.close_connection = True
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
      self.close_connection = True

  def _dispatch(self, method: str) -> None:
    path = urllib.parse.urlsplit(self.path).path
    self._body_read = False
    self._body_length: Optional[int] = None
    framing_ok = False
    try:
      self._body_length = self._framed_body_length()
      framing_ok = True
      status, payload, headers = 200, self._route(method, path), None
    except HttpError as e:
      if e.close:
        self.close_connection = True
      status, payload, headers = e.status, {"error": e.message}, None
      if e.status == 405:
        headers = {"Allow": "POST" if ":" in path else "GET"}
      if e.status == 503:
        headers = {"Retry-After": "1"}
    except ServingError as e:
      status, payload, headers = json_codec.HTTP_STATUS.get(e.code, 500), {
          "error": e.message}, None
    except Exception:  # pylint: disable=broad-except
      # Log the traceback here; the client gets no internals.
      _log.exception("REST %s %s failed", method, path)
      status, payload, headers = 500, {
          "error": "internal error; see the server log"}, None
    if status != 200:
      _log.info("REST %s %s -> %d %s", method, path, status, payload["error"])
    unread = not self._body_read and (not framing_ok or bool(self._body_length))
    if unread:
      # An unread body would be parsed as the next request on this connection.
      self.close_connection = True
    self._reply(status, payload, headers)
    if unread and framing_ok:
      self._drain_body()

  def _framed_body_length(self) -> Optional[int]:
    """The body's length (None: no Content-Length); HttpError if ambiguous."""
    if self.headers.defects:
      # E.g. "Content-Length : 5": the parser stops there and drops that and
      # every later header, so the body would be read as the next request.
      raise HttpError(400, "malformed header line "
                      f"({type(self.headers.defects[0]).__name__}); send "
                      "'Name: value' lines with no space before the colon",
                      close=True)
    lengths = self.headers.get_all("Content-Length") or []
    if self.headers.get_all("Transfer-Encoding"):
      if lengths:
        raise HttpError(400, "both Transfer-Encoding and Content-Length are "
                        "set; send Content-Length only", close=True)
      raise HttpError(411, "Transfer-Encoding (e.g. chunked) bodies are not "
                      "supported; send Content-Length", close=True)
    if len(lengths) > 1:
      raise HttpError(400, f"{len(lengths)} Content-Length headers "
                      f"({', '.join(repr(v) for v in lengths)}); send exactly "
                      "one", close=True)
    if not lengths:
      return None
    if not _CONTENT_LENGTH.fullmatch(lengths[0].strip(" \t")):
      raise HttpError(400, f"bad Content-Length: {lengths[0]!r}; send a decimal "
                      "number of bytes", close=True)
    return int(lengths[0])

  def _drain_body(self) -> None:
    """Reads (a bounded part of) an unread body after replying, then closes.

    Closing a socket with unread input sends a TCP reset, and a client still
    sending its body would then lose the error reply; draining first lets it
    read the 413 (Apache's "lingering close").
    """
    budget = min(self._body_length or 0, _DRAIN_LIMIT_BYTES)
    deadline = time.monotonic() + _DRAIN_SECONDS
    try:
      self.connection.settimeout(_DRAIN_SECONDS)
      while budget > 0 and time.monotonic() < deadline:
        chunk = self.rfile.read1(min(budget, 1 << 16))
        if not chunk:
          break
        budget -= len(chunk)
    except OSError:
      pass

  def handle_expect_100(self):
    # Refuse an oversized body before the client sends it (curl asks first).
    try:
      length = self._framed_body_length() or 0
    except HttpError as e:
      self.close_connection = True
      self._reply(e.status, {"error": e.message})
      return False
    if length > self.server.max_request_bytes:
      self.close_connection = True
      self._reply(413, {"error": _too_large_message(
          length, self.server.max_request_bytes)})
      return False
    return super().handle_expect_100()

  def _route(self, method: str, path: str) -> dict:
    self._budget_held = 0
    try:
      return self._route_request(method, path)
    finally:
      # Held from before the body is read until the answer is built, so the
      # body, its decoded arrays and the model's outputs all count.
      if self._budget_held:
        self.server.body_budget.release(self._budget_held)

  def _route_request(self, method: str, path: str) -> dict:
    predict = _PREDICT_PATH.fullmatch(path)
    status = None if predict else _STATUS_PATH.fullmatch(path)
    if not (predict or status):
      if path.lower().startswith("/v1/"):
        raise invalid(f"Malformed request: {method} {path}")
      raise HttpError(404, f"Not found: {path}; the API is under "
                      "/v1/models/<name>")
    if predict and method != "POST":
      raise HttpError(405, f"{method} is not allowed on {path}; use POST",
                      close=True)
    if status and method != "GET":
      raise HttpError(405, f"{method} is not allowed on {path}; use GET",
                      close=True)
    if predict:
      name, version, label, verb = predict.groups()
      name, version, label = _model_spec_parts(name, version, label)
      body = self._read_json()
      if verb.lower() != "predict":
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"{verb} is not supported by tff_dpmed.serve: the "
                           "exported models have predict signatures; use :predict")
      return self._predict(name, version, label, body)
    name, version, label, metadata = status.groups()
    if not name:
      raise invalid("Missing model name in request.")
    name, version, label = _model_spec_parts(name, version, label)
    if metadata:
      return self._metadata(name, version, label)
    return json_format.MessageToDict(
        self.server.store.model_status(name, version, label),
        including_default_value_fields=True)

  def _read_json(self) -> Any:
    length = self._body_length
    if length is None:
      raise HttpError(411, "Content-Length header is required", close=True)
    limit = self.server.max_request_bytes
    if length > limit:
      # Refused unread: the connection is closed rather than drained.
      raise HttpError(413, _too_large_message(length, limit), close=True)
    budget = self.server.body_budget
    if not budget.acquire(length, _BUDGET_WAIT_SECONDS):
      raise HttpError(503, "the server is busy decoding other large requests; "
                      "retry, or send fewer images per request", close=True)
    self._budget_held = length
    body = self.rfile.read(length)
    self._body_read = True
    if len(body) != length:
      raise HttpError(400, "request body ended before Content-Length bytes",
                      close=True)
    return json_codec.decode_body(body)

  def _predict(self, name: str, version: Optional[int], label: Optional[str],
               body: dict) -> dict:
    store = self.server.store
    signature_name = body.get("signature_name", "")
    if not isinstance(signature_name, str):
      raise invalid("'signature_name' key must be a string value.")
    servable = store.resolve(name, version, label)
    signature = servable.signature(signature_name)
    inputs, request_format = json_codec.request_inputs(body, dict(signature.inputs))
    del body  # The decoded arrays are all that is needed from here on.
    _, outputs = store.predict(servable, signature.name, inputs)
    return json_codec.response_json(outputs, request_format)

  def _metadata(self, name: str, version: Optional[int],
                label: Optional[str]) -> dict:
    servable, fields = self.server.store.model_metadata(
        name, version, label, missing_ok=True)
    model_spec = model_pb2.ModelSpec(name=servable.name)
    model_spec.version.value = servable.version
    metadata = {}
    for field, value in fields.items():
      # The signature map is a proto; the tff_dpmed metadata (an extra key
      # that TF Serving clients ignore) is already strict-JSON data.
      metadata[field] = value if isinstance(value, dict) else (
          json_format.MessageToDict(value, including_default_value_fields=True,
                                    preserving_proto_field_name=True))
    return {
        "model_spec": json_format.MessageToDict(
            model_spec, including_default_value_fields=True,
            preserving_proto_field_name=True),
        "metadata": metadata,
    }


def _too_large_message(length: int, limit: int) -> str:
  return (f"request body of {length} bytes exceeds the limit of {limit} bytes "
          "(the server's --max_request_bytes); send fewer images per request")


def _model_spec_parts(name: str, version: Optional[str], label: Optional[str]
                      ) -> tuple[str, Optional[int], Optional[str]]:
  name = urllib.parse.unquote(name)
  number = None
  if version is not None:
    number = int(version)
    if number > _INT64_MAX:
      raise invalid(f"Failed to convert version: {version} to numeric.")
  if label is not None:
    label = urllib.parse.unquote(label)
  return name, number, label


class RestServer(pooled_http.PooledHTTPServer):
  """The REST front-end: a pooled HTTP server bound to one store."""

  def __init__(self, store: ModelStore, host: str, port: int,
               max_request_bytes: int, num_threads: int = DEFAULT_NUM_THREADS,
               max_inflight_bytes: Optional[int] = None):
    self.store = store
    self.max_request_bytes = max_request_bytes
    # At least one largest request must fit, or it could never be served.
    self.body_budget = pooled_http.ByteBudget(
        max(max_inflight_bytes or max_request_bytes, max_request_bytes))
    super().__init__(host, port, _Handler, num_threads)
