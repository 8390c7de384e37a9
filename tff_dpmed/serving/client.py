"""Small clients for TF Serving's gRPC and REST APIs (ours or the real one).

Both speak only the standard protocols: `GrpcClient` is a thin layer over
`PredictionServiceStub`/`ModelServiceStub`, `RestClient` over `/v1/models`.
They share one interface, so the predict CLI, the tests and the benchmark can
switch protocol with a flag:

  client = GrpcClient("127.0.0.1:8500")          # or RestClient("127.0.0.1:8501")
  outputs = client.predict("cnn", {"images": uint8_images})
  for p in to_predictions(outputs): print(p.class_name, p.probability)

Errors raise `ServingClientError`, whose `unreachable` tells "no server there"
apart from "the server said no".
"""

import base64
import dataclasses
import http.client
import json
import threading
from typing import Any, Mapping, Optional, Sequence

import grpc
import numpy as np
import tensorflow as tf

from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tff_dpmed.serving import export

DEFAULT_TIMEOUT_SECONDS = 30.0
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServingClientError(Exception):
  """A call failed: `code` is the gRPC code name or the HTTP status."""

  def __init__(self, code: str, message: str, unreachable: bool = False):
    super().__init__(f"{code}: {message}")
    self.code = code
    self.message = message
    self.unreachable = unreachable


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One image's answer from the exported signatures."""

  class_name: str
  class_index: int
  probability: float  # probabilities[class_index]
  probabilities: tuple[float, ...]


def to_predictions(outputs: Mapping[str, np.ndarray]) -> list[Prediction]:
  """The outputs of an exported tff_dpmed signature, one Prediction per image."""
  probs = np.asarray(outputs[export.OUTPUT_PROBABILITIES], dtype=np.float32)
  indices = np.asarray(outputs[export.OUTPUT_CLASS_INDEX]).astype(np.int64)
  names = outputs[export.OUTPUT_CLASS_NAME]
  result = []
  for row, index, name in zip(probs, indices, names):
    if isinstance(name, bytes):
      name = name.decode("utf-8", errors="replace")
    result.append(Prediction(class_name=str(name), class_index=int(index),
                             probability=float(row[index]),
                             probabilities=tuple(float(p) for p in row)))
  return result


def split_server(server: str, default_port: int) -> tuple[str, int]:
  """'host:port', 'host' or '[::1]:port' -> (host, port); ValueError if bad."""
  server = server.strip()
  if server.startswith("["):
    host, _, rest = server[1:].partition("]")
    port = rest[1:] if rest.startswith(":") else ""
  elif server.count(":") == 1:
    host, port = server.split(":")
  else:
    host, port = server, ""
  if not host:
    raise ValueError(f"no host in {server!r}")
  number = int(port) if port else default_port
  if not 0 < number < 65536:
    raise ValueError(f"bad port in {server!r}")
  return host, number


class GrpcClient:
  """TF Serving's gRPC API through the standard stubs."""

  def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT_SECONDS):
    self.target = target
    self.timeout = timeout
    self._channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ])
    self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
    self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

  def close(self) -> None:
    self._channel.close()

  def _call(self, method, request):
    try:
      return method(request, timeout=self.timeout)
    except grpc.RpcError as e:
      code = e.code()
      raise ServingClientError(
          code.name, e.details() or "",
          unreachable=code in (grpc.StatusCode.UNAVAILABLE,
                               grpc.StatusCode.DEADLINE_EXCEEDED)) from None

  def predict(self, model_name: str, inputs: Mapping[str, Any], *,
              signature_name: str = "", version: Optional[int] = None,
              output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
      request.model_spec.version.value = version
    for name, value in inputs.items():
      request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    response = self._call(self._predict.Predict, request)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

  def metadata(self, model_name: str, version: Optional[int] = None
               ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = model_name
    if version is not None:
      request.model_spec.version.value = version
    request.metadata_field.append("signature_def")
    return self._call(self._predict.GetModelMetadata, request)

  def status(self, model_name: str, version: Optional[int] = None
             ) -> list[tuple[int, str]]:
    """[(version, state name)], as GetModelStatus lists them."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model_name
    if version is not None:
      request.model_spec.version.value = version
    response = self._call(self._models.GetModelStatus, request)
    return [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state))
            for s in response.model_version_status]


class RestClient:
  """TF Serving's REST API; one keep-alive connection per thread."""

  def __init__(self, server: str, timeout: float = DEFAULT_TIMEOUT_SECONDS):
    self.host, self.port = split_server(server, 8501)
    self.timeout = timeout
    self._local = threading.local()

  def close(self) -> None:
    conn = getattr(self._local, "conn", None)
    if conn is not None:
      conn.close()
      self._local.conn = None

  def request(self, method: str, path: str, body: Optional[bytes] = None
              ) -> tuple[int, Any]:
    """One call -> (HTTP status, decoded JSON); raises only if unreachable."""
    for attempt in range(2):
      conn = getattr(self._local, "conn", None)
      if conn is None:
        conn = http.client.HTTPConnection(self.host, self.port,
                                          timeout=self.timeout)
        self._local.conn = conn
      try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.getheader("Connection", "").lower() == "close":
          self.close()
        break
      except (http.client.RemoteDisconnected, ConnectionResetError,
              BrokenPipeError) as e:
        # The server closed an idle keep-alive connection: retry once, fresh.
        self.close()
        if attempt:
          raise ServingClientError("UNAVAILABLE", str(e), unreachable=True) from None
      except (OSError, http.client.HTTPException) as e:
        self.close()
        raise ServingClientError("UNAVAILABLE", f"{type(e).__name__}: {e}",
                                 unreachable=True) from None
    try:
      return response.status, json.loads(payload) if payload else None
    except ValueError:
      return response.status, {"error": payload.decode("utf-8", "replace")}

  def _json_call(self, method: str, path: str, doc: Optional[dict] = None) -> Any:
    body = None if doc is None else json.dumps(doc).encode("utf-8")
    status, payload = self.request(method, path, body)
    if status != 200:
      message = payload.get("error", "") if isinstance(payload, dict) else ""
      raise ServingClientError(f"HTTP {status}", message)
    return payload

  @staticmethod
  def _model_path(model_name: str, version: Optional[int]) -> str:
    path = f"/v1/models/{model_name}"
    return path if version is None else f"{path}/versions/{version}"

  def predict(self, model_name: str, inputs: Mapping[str, Any], *,
              signature_name: str = "", version: Optional[int] = None,
              output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Columnar request, so the answer maps output name -> batch array."""
    doc = {"inputs": {name: to_json_value(value) for name, value in inputs.items()}}
    if signature_name:
      doc["signature_name"] = signature_name
    payload = self._json_call("POST", self._model_path(model_name, version) +
                              ":predict", doc)
    outputs = payload["outputs"]
    if not isinstance(outputs, dict):  # A single output comes back bare.
      outputs = {"outputs": outputs}
    result = {k: np.asarray(v) for k, v in outputs.items()}
    if output_filter:
      result = {k: result[k] for k in output_filter}
    return result

  def metadata(self, model_name: str, version: Optional[int] = None) -> dict:
    return self._json_call("GET", self._model_path(model_name, version) +
                           "/metadata")

  def status(self, model_name: str, version: Optional[int] = None
             ) -> list[tuple[int, str]]:
    payload = self._json_call("GET", self._model_path(model_name, version))
    return [(int(s["version"]), s["state"])
            for s in payload["model_version_status"]]


def to_json_value(value: Any) -> Any:
  """A numpy array or (nested) list -> TF Serving's JSON, bytes as b64 objects."""

  def convert(v):
    if isinstance(v, (list, tuple)):
      return [convert(x) for x in v]
    if isinstance(v, bytes):
      return {"b64": base64.b64encode(v).decode("ascii")}
    return v

  if isinstance(value, np.ndarray):
    if value.dtype.kind == "S":
      # numpy's fixed-width bytes drop trailing NULs: images would be cut.
      raise TypeError("pass binary data as a list or an object array of bytes")
    return convert(value.tolist()) if value.dtype == object else value.tolist()
  return convert(value)
