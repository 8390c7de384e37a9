"""TF Serving's REST JSON <-> numpy tensors, as json_tensor.cc defines it.

Request bodies: row format {"instances": [...]} (a list of values for one
input, or of objects keyed by input name) and columnar {"inputs": ...} (a
value for one input, or an object keyed by input name); binary strings as
{"b64": "..."}. Responses: {"predictions": ...} for row requests,
{"outputs": ...} for columnar ones, a bare value for a single output, output
names ending in `_bytes` base64-encoded. Errors are `ServingError`s with TF
Serving's wording, answered with the HTTP status `HTTP_STATUS` maps each gRPC
code to. `decode_body` parses a body with bounded memory: large
arrays of plain numbers go straight to numpy (numeric_arrays.py) instead of
becoming millions of Python objects.
"""

import base64
import binascii
import json
from typing import Any

import grpc
import numpy as np
import tensorflow as tf

from tff_dpmed.serving import numeric_arrays
from tff_dpmed.serving.servable import ServingError, invalid

_BYTES_SUFFIX = "_bytes"

# TF Serving's http_server.cc ToHTTPStatusCode.
HTTP_STATUS = {
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


def decode_body(body: bytes) -> dict:
  """A request body -> its JSON object; INVALID_ARGUMENT as TF Serving words it."""
  if not body or body.isspace():  # (body.strip() could copy 32 MB.)
    raise invalid("JSON Parse error: The document is empty")
  try:
    doc = numeric_arrays.loads(body)
  except UnicodeDecodeError:
    raise invalid("JSON Parse error: the body is not UTF-8") from None
  except json.JSONDecodeError as e:
    raise invalid(f"JSON Parse error: {e.msg} at offset: {e.pos}") from None
  except RecursionError:
    raise invalid("JSON Parse error: nested too deeply") from None
  if not isinstance(doc, dict):
    raise invalid(f"JSON Value: {_json_snippet(doc)} Is not object")
  return doc


def _json_snippet(value: Any, limit: int = 80) -> str:
  if isinstance(value, np.ndarray):  # Parsed by numeric_arrays.
    value = value.ravel()[:4].tolist() if value.size > 3 else value.tolist()
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
  if isinstance(value, np.ndarray):  # Numbers only (numeric_arrays parsed it).
    first = value.ravel()[0].item() if value.size else value.tolist()
    raise invalid(f"JSON Value: {_json_snippet(first)} is not of expected type: "
                  f"string (input '{name}'; send binary data as "
                  '{"b64": "<base64>"})')

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
    if isinstance(v, np.ndarray):
      # A float array from numeric_arrays: the first value that is no integer
      # (a token like 1.0 is reported as the first element).
      flat = v.ravel()
      if dtype.is_integer and flat.dtype.kind == "f":
        fractional = np.flatnonzero(flat != np.floor(flat))
        return _json_snippet(flat[fractional[0] if fractional.size else 0].item())
      return _json_snippet(flat[0].item() if flat.size else [])
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


def tensor_to_json(value: np.ndarray, name: str) -> Any:
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
  if isinstance(instances, np.ndarray):
    # A plain list of numbers that numeric_arrays parsed: one input's tensor.
    if len(specs) > 1:
      raise invalid("instances is a plain list, but expecting list of objects "
                    f"as multiple input tensors required: {','.join(sorted(specs))}")
    (name, spec), = specs.items()
    return {name: json_to_tensor(instances, spec.dtype, name)}
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
    converted = {k: tensor_to_json(v, k) for k, v in outputs.items()}
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
  columns = {k: tensor_to_json(v, k) for k, v in outputs.items()}
  if len(columns) == 1:
    return {"predictions": next(iter(columns.values()))}
  return {"predictions": [{k: column[i] for k, column in columns.items()}
                          for i in range(batch or 0)]}
