"""Tests for tff_dpmed.serving.export: layout, versions, signatures, metadata."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.config import model_server_config_pb2

from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.models import build_model, probabilities
from tff_dpmed.serving import export

INFO = DatasetInfo("pneumoniamnist", "binary-class", ("normal", "pneumonia"),
                   (28, 28, 1))
METADATA = {
    "dp_mode": "user-level",
    "epsilon": 2.5,
    "delta": 1e-5,
    "accountant": "rdp",
    "training_config": {"rounds": 2, "clients_per_round": 4,
                        "noise_multiplier": np.float32(1.1)},
}
MODEL_NAME = "cnn"


def trained_model(seed: int = 0):
  """The model under test: (keras_model, info, metadata).

  Random weights for now; the one place to put a short federated training run
  in front once the training loop exists. test_serving.py uses this too.
  """
  return build_model("cnn", INFO, seed=seed), INFO, dict(METADATA)


def sample_images(n: int, seed: int = 0, shape=INFO.image_shape) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 256, (n, *shape)).astype(np.uint8)


def keras_probabilities(model, info, images: np.ndarray) -> np.ndarray:
  """What the served model must answer: the data layer's /255, then the model."""
  return probabilities(info, model(images.astype(np.float32) / 255.0)).numpy()


def png(image: np.ndarray) -> bytes:
  return tf.io.encode_png(image).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model, info, metadata = trained_model()
  base = str(tmp_path_factory.mktemp("export"))
  path = export.export_saved_model(model, info, base, MODEL_NAME, metadata)
  return {"model": model, "info": info, "base": base, "path": path,
          "loaded": tf.saved_model.load(path)}


def test_layout_is_what_tf_serving_expects(exported):
  model_dir = os.path.join(exported["base"], MODEL_NAME)
  assert exported["path"] == os.path.join(model_dir, "1")
  assert os.path.isfile(os.path.join(exported["path"], "saved_model.pb"))
  assert os.path.isdir(os.path.join(exported["path"], "variables"))
  assert export.list_versions(model_dir) == [1]
  # The temporary folder was renamed, not left behind.
  assert sorted(os.listdir(model_dir)) == ["1"]


def test_models_config_is_a_valid_model_server_config(exported):
  with open(os.path.join(exported["base"], "models.config")) as f:
    config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
  (entry,) = config.model_config_list.config
  assert entry.name == MODEL_NAME
  assert entry.base_path == "/models/" + MODEL_NAME
  assert entry.model_platform == "tensorflow"


def test_models_config_keeps_other_models(tmp_path):
  export.write_models_config(str(tmp_path), "a")
  export.write_models_config(str(tmp_path), "b")
  export.write_models_config(str(tmp_path), "a", serving_root="/srv")
  with open(tmp_path / "models.config") as f:
    config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
  assert {(c.name, c.base_path) for c in config.model_config_list.config} == {
      ("a", "/srv/a"), ("b", "/models/b")}


def test_metadata_travels_with_the_model(exported):
  meta = export.read_export_metadata(exported["path"])
  assert meta["epsilon"] == 2.5
  assert meta["delta"] == 1e-5
  assert meta["accountant"] == "rdp"
  assert meta["dp_mode"] == "user-level"
  assert meta["training_config"]["noise_multiplier"] == pytest.approx(1.1)
  assert meta["dataset_info"] == json.loads(json.dumps(INFO.to_json()))
  assert meta["serving"]["model_name"] == MODEL_NAME
  assert meta["serving"]["version"] == 1
  assert os.path.isfile(os.path.join(exported["path"], "assets.extra",
                                     "tff_dpmed_metadata.json"))


def test_signature_defs(exported):
  with open(os.path.join(exported["path"], "saved_model.pb"), "rb") as f:
    proto = saved_model_pb2.SavedModel.FromString(f.read())
  sigs = proto.meta_graphs[0].signature_def
  for name in ("serving_default", "predict"):
    (key, spec), = sigs[name].inputs.items()
    assert key == "images"
    assert tf.as_dtype(spec.dtype) == tf.uint8
    assert [d.size for d in spec.tensor_shape.dim] == [-1, 28, 28, 1]
  (key, spec), = sigs["predict_image_bytes"].inputs.items()
  assert key == "image_bytes"
  assert tf.as_dtype(spec.dtype) == tf.string
  for name in ("serving_default", "predict", "predict_image_bytes"):
    outputs = sigs[name].outputs
    assert tf.as_dtype(outputs["probabilities"].dtype) == tf.float32
    assert [d.size for d in outputs["probabilities"].tensor_shape.dim] == [-1, 2]
    assert tf.as_dtype(outputs["class_index"].dtype) == tf.int64
    assert tf.as_dtype(outputs["class_name"].dtype) == tf.string
    assert sigs[name].method_name == "tensorflow/serving/predict"


def test_uint8_and_png_inputs_match_keras(exported):
  images = sample_images(5)
  want = keras_probabilities(exported["model"], exported["info"], images)
  sigs = exported["loaded"].signatures
  got = sigs["serving_default"](images=tf.constant(images))
  np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)
  np.testing.assert_array_equal(got["class_index"].numpy(), want.argmax(-1))
  np.testing.assert_array_equal(got["class_name"].numpy().astype(str),
                                np.array(INFO.class_names)[want.argmax(-1)])
  # PNG is lossless and already 28x28: decoding gives the same pixels.
  got = sigs["predict_image_bytes"](
      image_bytes=tf.constant([png(i) for i in images]))
  np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)


def test_other_sizes_and_channels_are_decoded_and_resized(exported):
  rgb = sample_images(1, seed=3, shape=(56, 60, 3))[0]
  sigs = exported["loaded"].signatures
  got = sigs["predict_image_bytes"](image_bytes=tf.constant([png(rgb)]))
  gray = tf.io.decode_png(png(rgb), channels=1)
  resized = tf.image.resize(gray, (28, 28), antialias=True)
  expected = tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)
  want = keras_probabilities(exported["model"], exported["info"],
                             expected.numpy()[None])
  np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)
  jpeg = tf.io.encode_jpeg(sample_images(1, seed=4, shape=(28, 28, 1))[0]).numpy()
  got = sigs["predict_image_bytes"](image_bytes=tf.constant([jpeg]))
  assert got["probabilities"].shape == (1, 2)
  assert float(tf.reduce_sum(got["probabilities"])) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("data, message", [
    (b"", "PNG or JPEG"),
    (b"GIF89a not accepted", "PNG or JPEG"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated PNG"),
    # An 8-byte IHDR claiming 50000 x 50000: refused before decoding.
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (50000).to_bytes(4, "big") * 2 +
     b"\x08\x00\x00\x00\x00", "at most"),
])
def test_bad_image_bytes_are_invalid_argument(exported, data, message):
  fn = exported["loaded"].signatures["predict_image_bytes"]
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    fn(image_bytes=tf.constant([data]))


def test_next_export_is_a_new_version_and_never_overwrites(exported, tmp_path):
  model, info, metadata = trained_model()
  base = str(tmp_path)
  first = export.export_saved_model(model, info, base, "m", metadata)
  pb = os.path.join(first, "saved_model.pb")
  before = os.stat(pb).st_mtime_ns
  os.makedirs(os.path.join(base, "m", "not-a-version"))
  second = export.export_saved_model(model, info, base, "m", metadata)
  assert os.path.basename(second) == "2"
  assert os.stat(pb).st_mtime_ns == before
  assert export.read_export_metadata(second)["serving"]["version"] == 2
  assert export.list_versions(os.path.join(base, "m")) == [1, 2]


def test_multi_label_uses_sigmoids_and_argmax(tmp_path):
  info = DatasetInfo("chestmnist", "multi-label", ("a", "b", "c"), (28, 28, 1))
  model = build_model("cnn", info, seed=0)
  path = export.export_saved_model(model, info, str(tmp_path), "ml", {})
  images = sample_images(3)
  got = tf.saved_model.load(path).signatures["serving_default"](
      images=tf.constant(images))
  want = keras_probabilities(model, info, images)
  np.testing.assert_allclose(got["probabilities"].numpy(), want, atol=1e-5)
  np.testing.assert_array_equal(got["class_index"].numpy(), want.argmax(-1))


@pytest.mark.parametrize("name, metadata, message", [
    ("bad/name", {}, "not usable"),
    ("", {}, "not usable"),
    ("ok", {"serving": 1}, "written by the export"),
    ("ok", {"config": object()}, "not JSON-serialisable"),
])
def test_bad_arguments_raise_usage_error(tmp_path, name, metadata, message):
  model, info, _ = trained_model()
  with pytest.raises(UsageError, match=message):
    export.export_saved_model(model, info, str(tmp_path), name, metadata)
  # Nothing half-written is left where a server would look.
  for root, dirs, _ in os.walk(tmp_path):
    assert not [d for d in dirs if d.isdigit() or d.startswith(".tmp")], root


def test_model_with_wrong_class_count_is_refused(tmp_path):
  other = DatasetInfo("x", "multi-class", ("a", "b", "c"), (28, 28, 1))
  with pytest.raises(UsageError, match="3 classes"):
    export.export_saved_model(build_model("cnn", INFO, seed=0), other,
                              str(tmp_path), "m", {})


def test_export_cli_explains_weights_that_no_longer_fit_the_model(tmp_path):
  # A finished run whose saved weights do not match the model as the code now
  # builds it (the model code changed since training): one line, exit 2, and
  # nothing written, instead of Keras' traceback listing every weight.
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  summary = {"config": {"model": MODEL_NAME}, "dataset": INFO.to_json(),
             "privacy": {"dp_mode": "none"}, "test_accuracy": 0.5, "test_auc": 0.5}
  (run_dir / "summary.json").write_text(json.dumps(summary))
  np.savez(run_dir / "final_weights.npz", *build_model("cnn", INFO, seed=0).get_weights()[:-1])
  proc = subprocess.run(
      [sys.executable, "-m", "tff_dpmed.export", f"--run_dir={run_dir}"],
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: cannot load the final weights of" in proc.stderr
  assert "model code has changed" in proc.stderr
  assert "Traceback" not in proc.stderr and "Provided weights" not in proc.stderr
  assert not (run_dir / "saved_model").exists()
