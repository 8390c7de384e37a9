"""The whole serving path on a really trained model, as a user runs it.

One tiny federated training run (BreastMNIST, central DP, 2 rounds) exports
version 1; `python -m tff_dpmed.export` re-exports version 2 from its
checkpoint; `python -m tff_dpmed.serve` serves both on free loopback ports;
TF Serving's own gRPC stub, plain REST and `python -m tff_dpmed.predict` must
answer what the in-process Keras model, built from the run's final weights,
answers. Most of the time is TFF's one-off compile in the training run.
"""

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf

from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.conftest import REPO_ROOT
from tests.e2e.test_serving import Server
from tff_dpmed import models
from tff_dpmed.data import medmnist
from tff_dpmed.program import artifacts
from tff_dpmed.serving import export

MODEL = "cnn"
BATCH = 16
ATOL = 1e-5
# The brief's DP run. --server_learning_rate is small because with the default
# 1.0 (and momentum 0.9) the central noise (stddev 1.0 * clip / 3 clients per
# weight) drives the logits into the thousands: nearly every probability is
# then exactly 0 or 1, and a 1e-5 comparison could not even catch a missing
# /255. It does not change the privacy guarantee.
TRAIN_FLAGS = ("--dataset=breastmnist", "--dp_mode=central", "--noise_multiplier=1.0",
               "--clip_mode=fixed", "--clip=1.0", "--num_clients=6",
               "--clients_per_round=3", "--rounds=2", "--progress=false",
               "--server_learning_rate=0.02", "--seed=0")


def _run(args, timeout=600):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (
      f"{args[0]} exited {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def _digest(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """One real 2-round training run, then its re-export by the export CLI."""
  out = tmp_path_factory.mktemp("e2e")
  run_dir = out / "run"
  _run(["tff_dpmed.train", *TRAIN_FLAGS, f"--data_dir={data_dir}",
        f"--output_dir={out}", "--experiment_name=run"])
  model_dir = run_dir / "saved_model" / MODEL
  assert (model_dir / "1" / "saved_model.pb").is_file()
  assert export.list_versions(str(model_dir)) == [1]
  v1_files = {name: _digest(model_dir / "1" / name) for name in (
      "saved_model.pb", os.path.join(export.METADATA_DIR, export.METADATA_FILENAME))}

  reexport = _run(["tff_dpmed.export", f"--run_dir={run_dir}"])

  with open(run_dir / "summary.json") as f:
    summary = json.load(f)
  keras_model, info, _ = artifacts.load_trained_model(str(run_dir))
  return {"run_dir": run_dir, "model_dir": model_dir, "summary": summary,
          "v1_files": v1_files, "export": reexport, "keras": keras_model,
          "info": info}


@pytest.fixture(scope="module")
def breast_images(data_dir) -> np.ndarray:
  images = medmnist.load_medmnist("breastmnist", data_dir=str(data_dir),
                                  download=False).test_images
  assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
  return images[:BATCH]


@pytest.fixture(scope="module")
def want(run, breast_images) -> np.ndarray:
  """The in-process Keras model's probabilities: the reference for the server."""
  probs = models.probabilities(
      run["info"], run["keras"](breast_images.astype(np.float32) / 255.0)).numpy()
  # Unsaturated, so the 1e-5 comparisons below have teeth.
  assert np.all((probs > 1e-3) & (probs < 1 - 1e-3)), probs
  return probs


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
  srv = Server(str(run["model_dir"]), str(tmp_path_factory.mktemp("log") / "serve.log"))
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def predict_stub(server):
  channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
  yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
  channel.close()


def test_export_cli_adds_version_2_with_the_runs_privacy(run):
  model_dir = run["model_dir"]
  printed = run["export"].stdout.strip().splitlines()[-1]
  assert os.path.samefile(printed, model_dir / "2")
  assert export.list_versions(str(model_dir)) == [1, 2]
  # No temporary folder left, version 1 untouched.
  assert sorted(os.listdir(model_dir)) == ["1", "2"]
  for name, digest in run["v1_files"].items():
    assert _digest(model_dir / "1" / name) == digest, name
  # TFF's import-time context used to fail noisily at the CLI's exit.
  assert "Exception ignored" not in run["export"].stderr
  assert "Traceback" not in run["export"].stderr

  privacy = run["summary"]["privacy"]
  assert privacy["dp_mode"] == "central" and privacy["epsilon"] > 0
  for version in (1, 2):
    meta = export.read_export_metadata(str(model_dir / str(version)))
    assert meta["serving"]["version"] == version
    for key in ("epsilon", "delta", "dp_mode", "accountant"):
      assert meta["privacy"][key] == privacy[key], (version, key)
    # The run's config, less what a model must not carry (a DP run's seed, key paths).
    assert meta["training_config"] == artifacts.exported_config(run["summary"]["config"])
    assert "seed" not in meta["training_config"]
    assert meta["dataset_info"]["class_names"] == list(run["info"].class_names)


def test_server_serves_both_versions(server):
  assert server.ready_line == (
      f"serving {MODEL} versions [1, 2] on grpc 127.0.0.1:{server.grpc_port} "
      f"and rest 127.0.0.1:{server.rest_port}")


@pytest.mark.parametrize("version", [None, 1, 2])
def test_grpc_matches_keras(run, server, predict_stub, breast_images, want, version):
  request = predict_pb2.PredictRequest()
  request.model_spec.name = MODEL
  if version is not None:
    request.model_spec.version.value = version
  request.inputs["images"].CopyFrom(tf.make_tensor_proto(breast_images))
  response = predict_stub.Predict(request, timeout=60)
  assert response.model_spec.version.value == (version or 2)
  np.testing.assert_allclose(
      tf.make_ndarray(response.outputs["probabilities"]), want, rtol=0, atol=ATOL)
  np.testing.assert_array_equal(
      tf.make_ndarray(response.outputs["class_index"]), want.argmax(-1))
  np.testing.assert_array_equal(
      tf.make_ndarray(response.outputs["class_name"]).astype(str),
      np.array(run["info"].class_names)[want.argmax(-1)])


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}:predict",
                                  f"/v1/models/{MODEL}/versions/1:predict"])
def test_rest_matches_keras(run, server, breast_images, want, path):
  conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
  try:
    conn.request("POST", path, body=json.dumps({"instances": breast_images.tolist()}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
  finally:
    conn.close()
  assert response.status == 200, body
  predictions = body["predictions"]
  assert len(predictions) == BATCH
  np.testing.assert_allclose([p["probabilities"] for p in predictions], want,
                             rtol=0, atol=ATOL)
  assert [p["class_index"] for p in predictions] == want.argmax(-1).tolist()
  assert [p["class_name"] for p in predictions] == [
      run["info"].class_names[i] for i in want.argmax(-1)]


def test_predict_cli_prints_the_keras_class(run, server, breast_images, want, tmp_path):
  picks = range(0, BATCH, 4)
  files = []
  for i in picks:
    path = tmp_path / f"test_{i}.png"
    path.write_bytes(tf.io.encode_png(breast_images[i]).numpy())
    files.append(str(path))
  proc = _run(["tff_dpmed.predict", f"--server=127.0.0.1:{server.grpc_port}",
               f"--model_name={MODEL}", *files], timeout=120)
  lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
  assert [line[0] for line in lines] == files
  for i, (_, class_name, probability) in zip(picks, lines):
    top = int(want[i].argmax())
    assert class_name == run["info"].class_names[top]
    assert float(probability) == pytest.approx(want[i, top], abs=1e-4)  # printed .4f


def test_sigterm_stops_the_server_and_its_children(server):
  # Last in the module: the fixture's own stop then finds it already stopped.
  process = psutil.Process(server.proc.pid)
  family = [process, *process.children(recursive=True)]
  assert server.stop(signal.SIGTERM) == 0, server.log_tail()
  _, alive = psutil.wait_procs(family, timeout=10)
  assert not alive, alive
  assert "stopped serving cnn" in server.log_tail()
