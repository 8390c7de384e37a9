"""TF Serving's REST API over a ModelStore, on the standard library's HTTP server.

  POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict
       {"signature_name": ..., "instances": [...]}  -> {"predictions": [...]}
       {"signature_name": ..., "inputs": ...}       -> {"outputs": ...}
  GET  /v1/models/<name>[/versions/<v>]            model status
  GET  /v1/models/<name>[/versions/<v>]/metadata   signature defs

Request and response JSON follow TF Serving's rules (json_tensor.cc): binary
strings as {"b64": "..."}, a plain list for a single input or objects keyed by
input name, a bare value for a single output or objects keyed by output name,
output names ending in `_bytes` base64-encoded. Errors are {"error": "..."}
with TF Serving's HTTP status for each gRPC code; a body over the size cap is
refused with 413 before it is read.
"""

import base64
import binascii
import http
import http.server
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from typing import Any, Optional

import grpc
import numpy as np
import tensorflow as tf

from google.protobuf import json_format
from tensorflow_serving.apis import model_pb2

from tff_dpmed.serving.model_store import ModelStore, ServingError, invalid

_log = logging.getLogger("tff_dpmed.serve")

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:"
    r"(predict|classify|regress)", re.IGNORECASE)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?"
    r"(?:/(metadata))?", re.IGNORECASE)

# TF Serving's http_server.cc ToHTTPStatusCode.
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_BYTES_SUFFIX = "_bytes"
# How much of a refused body is read before closing, at most (see _drain_body).
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
_DRAIN_SECONDS = 2.0
_INT64_MAX = 2**63 - 1


class HttpError(Exception):
  """An error answered with a plain HTTP status, outside the gRPC code table."""

  def __init__(self, status: int, message: str, close: bool = False):
    super().__init__(message)
    self.status = status
    self.message = message
    self.close = close


# --- JSON <-> tensors ----------------------------------------------------------


def _json_snippet(value: Any, limit: int = 80) -> str:
  if isinstance(value, list) and len(value) > 3:
    # Never serialise a whole (maybe huge) document just for a message.
    text = "[" + ", ".join(_json_snippet(v, limit) for v in value[:3]) + ", ...]"
  else:
    text = json.dumps(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _is_b64(value: Any) -> bool:
  return (isinstance(value, dict) and len(value) == 1 and
          isinstance(value.get("b64"), str))


def _decode_b64(value: dict) -> bytes:
  text = value["b64"]
  try:
    # Accept URL-safe and unpadded base64 too, as absl's decoder does.
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
  except (binascii.Error, ValueError):
    raise invalid(f"Unable to base64 decode {_json_snippet(value)}") from None


def _string_tensor(value: Any, name: str) -> np.ndarray:
  """Nested lists of strings / {"b64": ...} -> object array of bytes."""

  def shape_of(v):
    return [len(v)] + shape_of(v[0]) if isinstance(v, list) and v else (
        [0] if isinstance(v, list) else [])

  shape = shape_of(value)
  flat = []

  def walk(v, level):
    if isinstance(v, list):
      if level >= len(shape) or len(v) != shape[level]:
        raise invalid(f"input '{name}' is not a dense tensor: nested lists "
                      "have different lengths")
      for item in v:
        walk(item, level + 1)
      return
    if level != len(shape):
      raise invalid(f"input '{name}' is not a dense tensor: nested lists have "
                    "different depths")
    if _is_b64(v):
      flat.append(_decode_b64(v))
    elif isinstance(v, str):
      flat.append(v.encode("utf-8"))
    else:
      raise invalid(f"JSON Value: {_json_snippet(v)} is not of expected type: "
                    f"string (input '{name}'; send binary data as "
                    '{"b64": "<base64>"})')

  walk(value, 0)
  array = np.empty(len(flat), dtype=object)
  array[:] = flat
  return array.reshape(shape)


def json_to_tensor(value: Any, dtype: tf.DType, name: str) -> np.ndarray:
  """One JSON value (scalar or nested lists) -> numpy array of `dtype`."""
  if dtype == tf.string:
    return _string_tensor(value, name)
  try:
    array = np.asarray(value)
  except ValueError:
    raise invalid(f"input '{name}' is not a dense tensor: nested lists have "
                  "different lengths") from None
  kind = array.dtype.kind
  if array.size == 0 and kind == "f":
    kind = "i"  # np.asarray([]) is float64; an empty list fits any dtype.
  if dtype.is_integer:
    ok = kind in "iu"
  elif dtype.is_floating:
    ok = kind in "iuf"
  elif dtype.is_bool:
    ok = kind == "b"
  else:
    raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                       f"input '{name}' has dtype {dtype.name}, which the REST "
                       "API does not convert; use gRPC")
  if not ok:
    raise invalid(f"JSON Value: {_first_bad(value, dtype)} is not of expected "
                  f"type: {dtype.name} (input '{name}')")
  if dtype.is_integer and array.size:
    low, high = dtype.min, dtype.max
    if array.min() < low or array.max() > high:
      bad = array.min() if array.min() < low else array.max()
      raise invalid(f"JSON Value: {bad} is out of range for {dtype.name} "
                    f"[{low}, {high}] (input '{name}')")
  return array.astype(dtype.as_numpy_dtype)


def _first_bad(value: Any, dtype: tf.DType) -> str:
  """The first leaf that does not fit `dtype`, for the error message."""
  stack = [value]
  while stack:
    v = stack.pop()
    if isinstance(v, list):
      stack.extend(reversed(v))
      continue
    if dtype.is_bool:
      good = isinstance(v, bool)
    elif dtype.is_integer:
      good = isinstance(v, int) and not isinstance(v, bool)
    else:
      good = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not good:
      return _json_snippet(v)
  return _json_snippet(value)


def _tensor_to_json(value: np.ndarray, name: str) -> Any:
  if value.dtype.kind == "f":
    # Shortest text that round-trips the float32, as TF Serving writes it.
    return value.astype(np.float32).astype(str).astype(np.float64).tolist()
  if value.dtype == object or value.dtype.kind in "SU":
    as_b64 = name.endswith(_BYTES_SUFFIX)

    def convert(v):
      if isinstance(v, list):
        return [convert(x) for x in v]
      if isinstance(v, str):
        v = v.encode("utf-8")
      if as_b64:
        return {"b64": base64.b64encode(v).decode("ascii")}
      return v.decode("utf-8", errors="replace")

    return convert(value.tolist())
  return value.tolist()


def request_inputs(body: dict, inputs_spec: dict) -> tuple[dict, str]:
  """TF Serving's FillPredictRequestFromJson: -> (arrays by name, row|columnar)."""
  has_instances, has_inputs = "instances" in body, "inputs" in body
  if has_instances and has_inputs:
    raise invalid("JSON Value: not formatted correctly expecting only one of "
                  "'inputs' or 'instances' keys to exist")
  if has_instances:
    return _row_inputs(body["instances"], inputs_spec), "row"
  if has_inputs:
    return _columnar_inputs(body["inputs"], inputs_spec), "columnar"
  raise invalid("Missing 'inputs' or 'instances' key")


def _row_inputs(instances: Any, specs: dict) -> dict:
  if not isinstance(instances, list):
    raise invalid("JSON Value: Excepting 'instances' to be an list/array")
  if not instances:
    raise invalid("JSON Value: No values in 'instances' array")
  named = isinstance(instances[0], dict) and not _is_b64(instances[0])
  if not named:
    if len(specs) > 1:
      raise invalid("instances is a plain list, but expecting list of objects "
                    f"as multiple input tensors required: {','.join(sorted(specs))}")
    (name, spec), = specs.items()
    for i, item in enumerate(instances):
      if isinstance(item, dict) and not _is_b64(item):
        raise invalid(f"Expecting value/list but got object at item {i} of "
                      "input list")
    return {name: json_to_tensor(instances, spec.dtype, name)}
  for i, item in enumerate(instances):
    if not isinstance(item, dict) or _is_b64(item):
      raise invalid(f"Expecting object but got list at item {i} of input list")
    if set(item) != set(specs):
      raise invalid(f"Failed to process element: {i} of 'instances' list. JSON "
                    f"object keys {sorted(item)} must be equal to: "
                    f"{','.join(sorted(specs))}")
  return {name: json_to_tensor([item[name] for item in instances], spec.dtype,
                               name)
          for name, spec in specs.items()}


def _columnar_inputs(inputs: Any, specs: dict) -> dict:
  if not isinstance(inputs, dict) or _is_b64(inputs):
    if len(specs) > 1:
      raise invalid("inputs is a plain value/list, but expecting an object as "
                    f"multiple input tensors required: {','.join(sorted(specs))}")
    (name, spec), = specs.items()
    return {name: json_to_tensor(inputs, spec.dtype, name)}
  arrays = {}
  for name, spec in specs.items():
    if name not in inputs:
      raise invalid(f"Missing named input: {name} in 'inputs' object.")
    arrays[name] = json_to_tensor(inputs[name], spec.dtype, name)
  return arrays


def response_json(outputs: dict, request_format: str) -> dict:
  if request_format == "columnar":
    converted = {k: _tensor_to_json(v, k) for k, v in outputs.items()}
    if len(converted) == 1:
      return {"outputs": next(iter(converted.values()))}
    return {"outputs": converted}
  batch = None
  for name, value in outputs.items():
    if value.ndim == 0:
      raise invalid(f"Tensor name: {name} has no shape information")
    if batch is not None and value.shape[0] != batch:
      raise invalid(f"Tensor name: {name} has inconsistent batch size: "
                    f"{value.shape[0]} expecting: {batch}")
    batch = value.shape[0]
  columns = {k: _tensor_to_json(v, k) for k, v in outputs.items()}
  if len(columns) == 1:
    return {"predictions": next(iter(columns.values()))}
  return {"predictions": [{k: column[i] for k, column in columns.items()}
                          for i in range(batch or 0)]}


# --- HTTP ------------------------------------------------------------------------


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
    try:
      status, payload, headers = 200, self._route(method, path), None
    except HttpError as e:
      if e.close:
        self.close_connection = True
      status, payload, headers = e.status, {"error": e.message}, None
      if e.status == 405:
        headers = {"Allow": "POST" if ":" in path else "GET"}
    except ServingError as e:
      status, payload, headers = _HTTP_STATUS.get(e.code, 500), {
          "error": e.message}, None
    except Exception:  # pylint: disable=broad-except
      # Log the traceback here; the client gets no internals.
      _log.exception("REST %s %s failed", method, path)
      status, payload, headers = 500, {
          "error": "internal error; see the server log"}, None
    if status != 200:
      _log.info("REST %s %s -> %d %s", method, path, status, payload["error"])
    unread = not self._body_read and (
        self.headers.get("Content-Length", "0").strip() not in ("", "0") or
        "Transfer-Encoding" in self.headers)
    if unread:
      # An unread body would be parsed as the next request on this connection.
      self.close_connection = True
    self._reply(status, payload, headers)
    if unread:
      self._drain_body()

  def _drain_body(self) -> None:
    """Reads (a bounded part of) an unread body after replying, then closes.

    Closing a socket with unread input sends a TCP reset, and a client still
    sending its body would then lose the error reply; draining first lets it
    read the 413 (Apache's "lingering close").
    """
    try:
      budget = int(self.headers.get("Content-Length", "0"))
    except ValueError:
      budget = 0
    budget = min(budget, _DRAIN_LIMIT_BYTES)
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
      length = int(self.headers.get("Content-Length", "0"))
    except ValueError:
      length = 0
    if length > self.server.max_request_bytes:
      self.close_connection = True
      self._reply(413, {"error": _too_large_message(
          length, self.server.max_request_bytes)})
      return False
    return super().handle_expect_100()

  def _route(self, method: str, path: str) -> dict:
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
    length_header = self.headers.get("Content-Length")
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      raise HttpError(411, "chunked bodies are not supported; send "
                      "Content-Length", close=True)
    if length_header is None:
      raise HttpError(411, "Content-Length header is required", close=True)
    try:
      length = int(length_header)
      if length < 0:
        raise ValueError
    except ValueError:
      raise HttpError(400, f"bad Content-Length: {length_header!r}",
                      close=True) from None
    limit = self.server.max_request_bytes
    if length > limit:
      # Refused unread: the connection is closed rather than drained.
      raise HttpError(413, _too_large_message(length, limit), close=True)
    body = self.rfile.read(length)
    self._body_read = True
    if len(body) != length:
      raise HttpError(400, "request body ended before Content-Length bytes",
                      close=True)
    if not body.strip():
      raise invalid("JSON Parse error: The document is empty")
    try:
      doc = json.loads(body)
    except UnicodeDecodeError:
      raise invalid("JSON Parse error: the body is not UTF-8") from None
    except json.JSONDecodeError as e:
      raise invalid(f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
    except RecursionError:
      raise invalid("JSON Parse error: nested too deeply") from None
    if not isinstance(doc, dict):
      raise invalid(f"JSON Value: {_json_snippet(doc)} Is not object")
    return doc

  def _predict(self, name: str, version: Optional[int], label: Optional[str],
               body: dict) -> dict:
    store = self.server.store
    signature_name = body.get("signature_name", "")
    if not isinstance(signature_name, str):
      raise invalid("'signature_name' key must be a string value.")
    servable = store.resolve(name, version, label)
    signature = servable.signature(signature_name)
    inputs, request_format = request_inputs(body, dict(signature.inputs))
    _, outputs = store.predict(servable, signature.name, inputs)
    return response_json(outputs, request_format)

  def _metadata(self, name: str, version: Optional[int],
                label: Optional[str]) -> dict:
    servable, fields = self.server.store.model_metadata(
        name, version, label, missing_ok=True)
    model_spec = model_pb2.ModelSpec(name=servable.name)
    model_spec.version.value = servable.version
    metadata = {}
    for field, value in fields.items():
      # The signature map is a proto; the tff_dpmed metadata (an extra key
      # that TF Serving clients ignore) is already JSON data.
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


class RestServer(http.server.ThreadingHTTPServer):
  """Threaded HTTP server bound to one store."""

  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, store: ModelStore, host: str, port: int,
               max_request_bytes: int):
    if ":" in host:
      self.address_family = socket.AF_INET6
    self.store = store
    self.max_request_bytes = max_request_bytes
    super().__init__((host, port), _Handler)
    self._thread: Optional[threading.Thread] = None

  @property
  def port(self) -> int:
    return self.server_address[1]

  def start(self) -> None:
    self._thread = threading.Thread(target=self.serve_forever,
                                    kwargs={"poll_interval": 0.2},
                                    name="rest-server", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self.shutdown()
    self.server_close()
    if self._thread is not None:
      self._thread.join(timeout=10)
