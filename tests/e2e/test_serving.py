"""End-to-end tests of `python -m tff_dpmed.serve` with TF Serving's clients.

One export and one server subprocess per module; requests go through the
standard `tensorflow_serving.apis` stubs and plain HTTP, as a client written
for TF Serving would send them.
"""

import base64
import concurrent.futures
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import portpicker
import pytest
import tensorflow as tf

from google.protobuf import struct_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.e2e.test_export import keras_probabilities, png, sample_images, trained_model
from tff_dpmed.serving import export

MODEL = "cnn"
MAX_BATCH = 16
MAX_BYTES = 256 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_SECONDS = 120


class Server:
  """A `tff_dpmed.serve` subprocess on free loopback ports."""

  def __init__(self, base_path: str, log_path: str, *extra_flags: str):
    self.grpc_port = portpicker.pick_unused_port()
    self.rest_port = portpicker.pick_unused_port()
    self.log_path = log_path
    self._log = open(log_path, "wb")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "tff_dpmed.serve", f"--model_base_path={base_path}",
         f"--model_name={MODEL}", f"--port={self.grpc_port}",
         f"--rest_api_port={self.rest_port}", *extra_flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=self._log)
    self.ready_line = self._wait_ready()

  def _wait_ready(self) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
      readable, _, _ = select.select([self.proc.stdout], [], [], 0.5)
      if readable:
        line = self.proc.stdout.readline().decode()
        if line.startswith("serving "):
          return line.strip()
      if self.proc.poll() is not None:
        break
    self.proc.kill()
    self.proc.wait()
    raise AssertionError(f"server did not start:\n{self.log_tail()}")

  def log_tail(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return "".join(f.readlines()[-30:])

  def stop(self, signum=signal.SIGTERM, timeout: float = 60) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signum)
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise
    finally:
      self.proc.stdout.close()
      self._log.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model, info, metadata = trained_model()
  base = str(tmp_path_factory.mktemp("serving"))
  export.export_saved_model(model, info, base, MODEL, metadata)
  return {"model": model, "info": info, "metadata": metadata, "base": base,
          "model_dir": os.path.join(base, MODEL)}


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
  log = str(tmp_path_factory.mktemp("log") / "server.log")
  srv = Server(exported["model_dir"], log, f"--max_batch_size={MAX_BATCH}",
               f"--max_request_bytes={MAX_BYTES}", "--poll_seconds=0.2")
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def channel(server):
  ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
  yield ch
  ch.close()


@pytest.fixture(scope="module")
def predict_stub(channel):
  return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
  return model_service_pb2_grpc.ModelServiceStub(channel)


def predict_request(inputs: dict, signature_name: str = "", version=None,
                    name: str = MODEL) -> predict_pb2.PredictRequest:
  request = predict_pb2.PredictRequest()
  request.model_spec.name = name
  request.model_spec.signature_name = signature_name
  if version is not None:
    request.model_spec.version.value = version
  for key, value in inputs.items():
    request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
  return request


def rest(server, method: str, path: str, body=None, raw: bytes = None):
  """-> (HTTP status, decoded JSON body). A fresh connection per call."""
  conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
  try:
    data = raw if raw is not None else (
        None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    # Strict: NaN/Infinity are not JSON (issue 17 item 5).
    return response.status, json.loads(response.read(),
                                       parse_constant=_refuse_constant)
  finally:
    conn.close()


def _refuse_constant(constant: str):
  raise ValueError(f"the server sent {constant}, which strict JSON parsers refuse")


def b64(data: bytes) -> dict:
  return {"b64": base64.b64encode(data).decode()}


def assert_still_serving(server, predict_stub):
  assert server.proc.poll() is None, server.log_tail()
  status, _ = rest(server, "GET", f"/v1/models/{MODEL}")
  assert status == 200
  response = predict_stub.Predict(
      predict_request({"images": sample_images(1)}, version=1), timeout=30)
  assert response.outputs["probabilities"].tensor_shape.dim[0].size == 1


# --- answers -------------------------------------------------------------------


def test_ready_line_names_model_versions_and_ports(server):
  assert server.ready_line == (
      f"serving {MODEL} versions [1] on grpc 127.0.0.1:{server.grpc_port} and "
      f"rest 127.0.0.1:{server.rest_port}")


def test_grpc_uint8_and_png_match_keras(exported, predict_stub):
  images = sample_images(6, seed=1)
  want = keras_probabilities(exported["model"], exported["info"], images)
  for signature, inputs in (
      ("", {"images": images}),
      ("predict", {"images": images}),
      ("predict_image_bytes", {"image_bytes": [png(i) for i in images]})):
    response = predict_stub.Predict(
        predict_request(inputs, signature, version=1), timeout=30)
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == (signature or "serving_default")
    probs = tf.make_ndarray(response.outputs["probabilities"])
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["class_index"]), want.argmax(-1))
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["class_name"]).astype(str),
        np.array(exported["info"].class_names)[want.argmax(-1)])


def test_grpc_output_filter(predict_stub):
  request = predict_request({"images": sample_images(2)}, version=1)
  request.output_filter.append("class_name")
  response = predict_stub.Predict(request, timeout=30)
  assert list(response.outputs) == ["class_name"]


def test_rest_row_and_columnar_match_keras(exported, server):
  images = sample_images(4, seed=2)
  want = keras_probabilities(exported["model"], exported["info"], images)
  path = f"/v1/models/{MODEL}/versions/1:predict"
  status, body = rest(server, "POST", path, {"instances": images.tolist()})
  assert status == 200, body
  rows = body["predictions"]
  np.testing.assert_allclose([r["probabilities"] for r in rows], want, atol=1e-5)
  assert [r["class_index"] for r in rows] == want.argmax(-1).tolist()
  assert [r["class_name"] for r in rows] == [
      exported["info"].class_names[i] for i in want.argmax(-1)]
  status, body = rest(server, "POST", path, {
      "signature_name": "predict", "inputs": {"images": images.tolist()}})
  assert status == 200, body
  np.testing.assert_allclose(body["outputs"]["probabilities"], want, atol=1e-5)
  status, body = rest(server, "POST", path, {
      "signature_name": "predict_image_bytes",
      "instances": [b64(png(i)) for i in images]})
  assert status == 200, body
  np.testing.assert_allclose([r["probabilities"] for r in body["predictions"]],
                             want, atol=1e-5)
  status, body = rest(server, "POST", path, {
      "signature_name": "predict_image_bytes",
      "instances": [{"image_bytes": b64(png(i))} for i in images]})
  assert status == 200, body


def test_jpeg_smoke(server, predict_stub):
  jpeg = tf.io.encode_jpeg(sample_images(1, seed=5, shape=(40, 32, 3))[0]).numpy()
  response = predict_stub.Predict(predict_request(
      {"image_bytes": [jpeg]}, "predict_image_bytes", version=1), timeout=30)
  probs = tf.make_ndarray(response.outputs["probabilities"])
  assert probs.shape == (1, 2) and abs(probs.sum() - 1) < 1e-5
  status, body = rest(server, "POST", f"/v1/models/{MODEL}:predict", {
      "signature_name": "predict_image_bytes", "inputs": [b64(jpeg)]})
  assert status == 200, body
  assert len(body["outputs"]["probabilities"][0]) == 2


# --- metadata and status -------------------------------------------------------


def test_grpc_metadata_and_status(predict_stub, model_stub):
  request = get_model_metadata_pb2.GetModelMetadataRequest()
  request.model_spec.name = MODEL
  request.model_spec.version.value = 1
  request.metadata_field.extend(["signature_def", "tff_dpmed_metadata"])
  response = predict_stub.GetModelMetadata(request, timeout=30)
  assert response.model_spec.version.value == 1
  sig_map = get_model_metadata_pb2.SignatureDefMap()
  assert response.metadata["signature_def"].Unpack(sig_map)
  images = sig_map.signature_def["serving_default"].inputs["images"]
  assert tf.as_dtype(images.dtype) == tf.uint8
  assert [d.size for d in images.tensor_shape.dim] == [-1, 28, 28, 1]
  assert "image_bytes" in sig_map.signature_def["predict_image_bytes"].inputs
  extra = struct_pb2.Struct()
  assert response.metadata["tff_dpmed_metadata"].Unpack(extra)
  assert extra["epsilon"] == 2.5 and extra["accountant"] == "rdp"

  status_request = get_model_status_pb2.GetModelStatusRequest()
  status_request.model_spec.name = MODEL
  status_request.model_spec.version.value = 1
  status = model_stub.GetModelStatus(status_request, timeout=30)
  (entry,) = status.model_version_status
  assert entry.version == 1
  assert entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
  assert entry.status.error_code == 0


def test_rest_metadata_and_status(server):
  status, body = rest(server, "GET", f"/v1/models/{MODEL}/versions/1")
  assert status == 200
  assert body == {"model_version_status": [{
      "version": "1", "state": "AVAILABLE",
      "status": {"error_code": "OK", "error_message": ""}}]}
  status, body = rest(server, "GET", f"/v1/models/{MODEL}/versions/1/metadata")
  assert status == 200
  assert body["model_spec"] == {"name": MODEL, "version": "1", "signature_name": ""}
  sigs = body["metadata"]["signature_def"]["signature_def"]
  images = sigs["serving_default"]["inputs"]["images"]
  assert images["dtype"] == "DT_UINT8"
  assert [d["size"] for d in images["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]
  assert body["metadata"]["tff_dpmed_metadata"]["epsilon"] == 2.5
  assert body["metadata"]["tff_dpmed_metadata"]["delta"] == 1e-5


# --- bad requests ---------------------------------------------------------------

_PREDICT = f"/v1/models/{MODEL}:predict"
_IMAGE = sample_images(1).tolist()


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", _PREDICT, b'{"instances": [1, 2', 400, "JSON Parse error"),
    ("POST", _PREDICT, b"", 400, "The document is empty"),
    ("POST", _PREDICT, b"[1, 2]", 400, "Is not object"),
    ("POST", _PREDICT, {"instances": [[[1, 2, 3]]]}, 400, "must have shape"),
    ("POST", _PREDICT, {"instances": [[[[1]] * 28] * 27]}, 400, "must have shape"),
    ("POST", _PREDICT, {"instances": [[[[1], [2]], [[3]]]]}, 400, "not a dense"),
    ("POST", _PREDICT, {"instances": [[[[0.5]] * 28] * 28]}, 400,
     "is not of expected type: uint8"),
    ("POST", _PREDICT, {"instances": [[[["a"]] * 28] * 28]}, 400,
     "is not of expected type: uint8"),
    ("POST", _PREDICT, {"instances": [[[[300]] * 28] * 28]}, 400, "out of range"),
    ("POST", "/v1/models/nope:predict", {"instances": _IMAGE}, 404,
     "Servable not found for request: Latest(nope)"),
    ("POST", f"/v1/models/{MODEL}/versions/99:predict", {"instances": _IMAGE}, 404,
     f"Servable not found for request: Specific({MODEL}, 99)"),
    ("POST", f"/v1/models/{MODEL}/labels/stable:predict", {"instances": _IMAGE},
     400, "Unrecognized servable version label: stable"),
    ("POST", _PREDICT, {"instances": [_IMAGE[0]] * (MAX_BATCH + 1)}, 400,
     f"Task size {MAX_BATCH + 1} is larger than maximum input batch size "
     f"{MAX_BATCH}"),
    ("POST", _PREDICT, {"instances": []}, 400, "No values in 'instances'"),
    ("POST", _PREDICT, {"signature_name": "predict"}, 400,
     "Missing 'inputs' or 'instances' key"),
    ("POST", _PREDICT, {"inputs": {"pixels": _IMAGE}}, 400,
     "Missing named input: images"),
    ("POST", _PREDICT, {"instances": [{"pixels": _IMAGE[0]}]}, 400,
     "must be equal to: images"),
    ("POST", _PREDICT, {"inputs": _IMAGE, "instances": _IMAGE}, 400,
     "only one of 'inputs' or 'instances'"),
    ("POST", _PREDICT, {"signature_name": "nope", "instances": _IMAGE}, 400,
     'Serving signature key "nope" not found'),
    ("POST", _PREDICT, {"signature_name": 7, "instances": _IMAGE}, 400,
     "'signature_name' key must be a string"),
    ("POST", _PREDICT, {"signature_name": "predict_image_bytes",
                        "instances": [{"b64": "!!!"}]}, 400, "base64"),
    ("POST", _PREDICT, {"signature_name": "predict_image_bytes",
                        "instances": [b64(b"not an image")]}, 400, "PNG or JPEG"),
    ("POST", _PREDICT, {"signature_name": "predict_image_bytes",
                        "instances": [b64(b"\x89PNG\r\n\x1a\nbroken" + b"\0" * 40)]},
     400, ""),
    ("POST", f"/v1/models/{MODEL}:classify", {"examples": []}, 501, "use :predict"),
    ("GET", _PREDICT, None, 405, "use POST"),
    ("DELETE", f"/v1/models/{MODEL}", None, 405, "use GET"),
    ("GET", "/v1/models", None, 400, "Missing model name"),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", f"/v1/models/{MODEL}/versions/99", None, 404,
     f"Could not find version 99 of model {MODEL}"),
    ("GET", "/v1/models/nope/metadata", None, 404, "Servable not found"),
    ("GET", "/v1/what/ever", None, 400, "Malformed request"),
    ("GET", "/index.html", None, 404, "Not found"),
])
def test_rest_bad_requests(server, predict_stub, method, path, body, status,
                           message):
  raw = body if isinstance(body, bytes) else None
  got_status, got = rest(server, method, path, None if raw is not None else body,
                         raw=raw)
  assert got_status == status, got
  assert set(got) == {"error"}
  assert message in got["error"]
  assert "Traceback" not in got["error"]
  assert_still_serving(server, predict_stub)


def test_rest_oversized_body_is_refused_unread(server, predict_stub):
  status, got = rest(server, "POST", _PREDICT, raw=b"x" * (MAX_BYTES + 1))
  assert status == 413
  assert f"exceeds the limit of {MAX_BYTES} bytes" in got["error"]
  # A client that asks first (curl does, with Expect: 100-continue) is
  # refused before it sends the body.
  conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
  try:
    conn.putrequest("POST", _PREDICT)
    conn.putheader("Content-Length", str(10 * MAX_BYTES))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert "exceeds the limit" in json.loads(response.read())["error"]
  finally:
    conn.close()
  assert_still_serving(server, predict_stub)


def _grpc_cases():
  images = sample_images(2)
  wrong_count = tf.make_tensor_proto(images)
  wrong_count.tensor_shape.dim[0].size = 3  # Declares 3 images, holds 2.
  huge_shape = tf.make_tensor_proto(np.zeros(1, np.uint8))
  huge_shape.tensor_shape.dim[0].size = 10**6
  for _ in range(3):
    huge_shape.tensor_shape.dim.add().size = 1000  # No values sent: 10**15.
  return [
      ("wrong shape", predict_request({"images": np.zeros((2, 28, 28), np.uint8)}),
       grpc.StatusCode.INVALID_ARGUMENT, "must have shape [-1,28,28,1]"),
      ("wrong dtype", predict_request({"images": images.astype(np.float32)}),
       grpc.StatusCode.INVALID_ARGUMENT, "must be uint8 but float32 was sent"),
      ("unknown model", predict_request({"images": images}, name="nope"),
       grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)"),
      ("unknown version", predict_request({"images": images}, version=42),
       grpc.StatusCode.NOT_FOUND, f"Specific({MODEL}, 42)"),
      ("too big a batch",
       predict_request({"images": sample_images(MAX_BATCH + 1)}),
       grpc.StatusCode.INVALID_ARGUMENT,
       f"Task size {MAX_BATCH + 1} is larger than maximum input batch size"),
      ("oversized message",
       predict_request({"image_bytes": [b"x" * (MAX_BYTES + 10)]},
                       "predict_image_bytes"),
       grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
      ("missing inputs", predict_request({}),
       grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {images}"),
      ("extra input", predict_request({"images": images, "x": images}),
       grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {x}"),
      ("bad signature", predict_request({"images": images}, "nope"),
       grpc.StatusCode.FAILED_PRECONDITION,
       'Serving signature key "nope" not found'),
      ("bad image", predict_request({"image_bytes": [b"nope"]},
                                    "predict_image_bytes"),
       grpc.StatusCode.INVALID_ARGUMENT, "PNG or JPEG"),
      ("inconsistent tensor", _with_proto("images", wrong_count),
       grpc.StatusCode.INVALID_ARGUMENT, "needs"),
      ("huge declared shape", _with_proto("images", huge_shape),
       grpc.StatusCode.INVALID_ARGUMENT, "must have shape"),
  ]


def _with_proto(name, proto):
  request = predict_request({})
  request.inputs[name].CopyFrom(proto)
  return request


@pytest.mark.parametrize("case", _grpc_cases(), ids=lambda c: c[0])
def test_grpc_bad_requests(server, predict_stub, case):
  _, request, code, message = case
  with pytest.raises(grpc.RpcError) as e:
    predict_stub.Predict(request, timeout=30)
  assert e.value.code() == code, e.value.details()
  assert message in e.value.details()
  assert "Traceback" not in e.value.details()
  assert_still_serving(server, predict_stub)


def test_grpc_other_bad_calls(server, predict_stub, model_stub):
  label = predict_request({"images": sample_images(1)})
  label.model_spec.version_label = "stable"
  no_field = get_model_metadata_pb2.GetModelMetadataRequest()
  no_field.model_spec.name = MODEL
  unknown_status = get_model_status_pb2.GetModelStatusRequest()
  unknown_status.model_spec.name = "nope"
  for call, request, code, message in (
      (predict_stub.Predict, label, grpc.StatusCode.INVALID_ARGUMENT,
       "Unrecognized servable version label: stable"),
      (predict_stub.Classify, classification_pb2.ClassificationRequest(),
       grpc.StatusCode.UNIMPLEMENTED, "use Predict"),
      (predict_stub.GetModelMetadata, no_field, grpc.StatusCode.INVALID_ARGUMENT,
       "at least one metadata_field"),
      (model_stub.GetModelStatus, unknown_status, grpc.StatusCode.NOT_FOUND,
       "Could not find any versions of model nope")):
    with pytest.raises(grpc.RpcError) as e:
      call(request, timeout=30)
    assert e.value.code() == code, e.value.details()
    assert message in e.value.details()
  assert_still_serving(server, predict_stub)


# --- load, new versions, shutdown ----------------------------------------------


def test_concurrent_load(exported, server, predict_stub):
  images = sample_images(4, seed=7)
  want = keras_probabilities(exported["model"], exported["info"], images)
  path = f"/v1/models/{MODEL}/versions/1:predict"
  request = predict_request({"images": images}, version=1)

  def worker(index):
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
    body = json.dumps({"instances": images.tolist()})
    try:
      for i in range(50):
        if (index + i) % 2:
          response = predict_stub.Predict(request, timeout=60)
          probs = tf.make_ndarray(response.outputs["probabilities"])
        else:
          # One keep-alive connection per thread, as real clients do.
          conn.request("POST", path, body=body)
          reply = conn.getresponse()
          payload = json.loads(reply.read())
          assert reply.status == 200, payload
          probs = np.array([r["probabilities"] for r in payload["predictions"]])
        np.testing.assert_allclose(probs, want, atol=1e-5)
    finally:
      conn.close()
    return index

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    assert sorted(pool.map(worker, range(8))) == list(range(8))
  assert_still_serving(server, predict_stub)


def test_new_version_is_served_without_restart(exported, server, predict_stub,
                                               model_stub):
  model2, info, metadata = trained_model(seed=1)
  export.export_saved_model(model2, info, exported["base"], MODEL,
                            {**metadata, "epsilon": 3.0})
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = MODEL
  deadline = time.monotonic() + 60
  while True:
    status = model_stub.GetModelStatus(request, timeout=30)
    states = {s.version: s.state for s in status.model_version_status}
    if states.get(2) == get_model_status_pb2.ModelVersionStatus.AVAILABLE:
      break
    assert time.monotonic() < deadline, f"version 2 never loaded: {states}"
    time.sleep(0.2)
  assert states[1] == get_model_status_pb2.ModelVersionStatus.AVAILABLE

  images = sample_images(3, seed=9)
  latest = predict_stub.Predict(predict_request({"images": images}), timeout=30)
  assert latest.model_spec.version.value == 2
  np.testing.assert_allclose(tf.make_ndarray(latest.outputs["probabilities"]),
                             keras_probabilities(model2, info, images), atol=1e-5)
  old = predict_stub.Predict(predict_request({"images": images}, version=1),
                             timeout=30)
  np.testing.assert_allclose(
      tf.make_ndarray(old.outputs["probabilities"]),
      keras_probabilities(exported["model"], info, images), atol=1e-5)
  _, body = rest(server, "GET", f"/v1/models/{MODEL}/metadata")
  assert body["model_spec"]["version"] == "2"
  assert body["metadata"]["tff_dpmed_metadata"]["epsilon"] == 3.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_stops_cleanly_on_signal(exported, tmp_path, signum):
  srv = Server(exported["model_dir"], str(tmp_path / "server.log"))
  pid = srv.proc.pid
  assert srv.stop(signum) == 0, srv.log_tail()
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)  # Reaped and gone: no process left behind.
  assert portpicker.is_port_free(srv.grpc_port)
  assert portpicker.is_port_free(srv.rest_port)
