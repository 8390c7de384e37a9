"""Exports a trained classifier as a versioned SavedModel that TF Serving loads.

Layout, exactly what `tensorflow_model_server` expects under a model base path:

  <export_base>/models.config                  for --model_config_file
  <export_base>/<model_name>/<version>/        one SavedModel per version
      saved_model.pb, variables/
      assets.extra/tff_dpmed_metadata.json     dataset, privacy guarantee, config

Signatures (all share the same outputs):

  serving_default, predict   images: uint8 [batch, H, W, C], the dataset's form.
  predict_image_bytes        image_bytes: string [batch] of PNG or JPEG files,
                             decoded and resized to H x W inside the graph.

  outputs: probabilities float32 [batch, K] (softmax, or one sigmoid per label
           for multi-label tasks), class_index int64 [batch] (argmax of the
           probabilities), class_name string [batch] (class_names[class_index]).

For multi-label tasks class_index/class_name are still the argmax, i.e. the most
probable label; a caller that wants every present label thresholds
`probabilities` itself. Preprocessing (uint8 / 255) lives inside the graph, so
clients send raw pixels and never need to know the normalisation; it is the
data layer's `preprocess_images`, the same function training uses.

Nothing here imports TensorFlow Federated (tests/test_serving_cli.py
checks it): the PNG/JPEG decoding lives in image_bytes.py, the metadata json
in export_metadata.py.
"""

import datetime
import os
import re
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

import tff_dpmed
from tff_dpmed.data.preprocess import preprocess_images
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed import files
from tff_dpmed.errors import UsageError
from tff_dpmed.models import probabilities
from tff_dpmed.serving.export_metadata import METADATA_DIR, METADATA_FILENAME, read_export_metadata  # pylint: disable=unused-import
from tff_dpmed.serving.export_metadata import write_export_metadata
from tff_dpmed.serving.image_bytes import MAX_DECODED_PIXELS, decode_image  # pylint: disable=unused-import

SIGNATURE_IMAGES = "serving_default"
SIGNATURE_PREDICT = "predict"
SIGNATURE_IMAGE_BYTES = "predict_image_bytes"
INPUT_IMAGES = "images"
INPUT_IMAGE_BYTES = "image_bytes"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS_INDEX = "class_index"
OUTPUT_CLASS_NAME = "class_name"

MODELS_CONFIG_FILENAME = "models.config"
# The folder TF Serving's docker image serves from; models.config points there.
DEFAULT_SERVING_ROOT = "/models"

# Keys this module writes into the metadata json; callers' keys must not clash.
_RESERVED_METADATA_KEYS = ("dataset_info", "serving")
# TF Serving's REST paths take the model name as one URL segment ([^/:]+).
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model_name(model_name: str) -> None:
  """Raises UsageError unless `model_name` works as a folder and a URL segment."""
  if not isinstance(model_name, str) or not _MODEL_NAME_RE.match(model_name):
    raise UsageError(
        f"model name {model_name!r} is not usable: use letters, digits, '.', "
        "'_' or '-', starting with a letter or digit")


def list_versions(model_dir: str) -> list[int]:
  """The integer version folders under `model_dir`, ascending (none if absent).

  Only folder names that are plain decimal integers count, as in TF Serving;
  the temporary folders `export_saved_model` writes into do not.
  """
  try:
    names = os.listdir(model_dir)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(
      int(n) for n in names
      if n.isdigit() and n.isascii() and os.path.isdir(os.path.join(model_dir, n)))


def export_saved_model(keras_model: tf.keras.Model, info: DatasetInfo,
                       export_base: str, model_name: str,
                       metadata: Optional[dict]) -> str:
  """Writes `keras_model` as the next version of `model_name` for TF Serving.

  The new version is 1 + the largest existing integer version. It is written
  into a hidden temporary folder beside the versions and renamed into place,
  so a server polling the folder never sees a half-written version. Existing
  versions are never touched. Also (re)writes `<export_base>/models.config`.

  Args:
    keras_model: Maps float32 images in [0, 1], (batch, H, W, C), to logits
      (batch, K), as `tff_dpmed.models.build_model` builds.
    info: The dataset the model was trained on.
    export_base: Folder holding one sub-folder per model name.
    model_name: The name clients use (`ModelSpec.name`, `/v1/models/<name>`).
    metadata: JSON-serialisable facts that travel with the model: DP mode,
      epsilon, delta, accountant, training config, ... Written at the top level
      of `assets.extra/tff_dpmed_metadata.json`.

  Returns:
    The path of the new version folder.

  Raises:
    UsageError: on a bad model name, dataset info, model or metadata.
  """
  check_model_name(model_name)
  _check_info(info)
  _check_model_output(keras_model, info)
  metadata = dict(metadata or {})
  clash = [k for k in _RESERVED_METADATA_KEYS if k in metadata]
  if clash:
    raise UsageError(f"metadata keys {clash} are written by the export itself; "
                     "rename them")
  read_models_config(export_base)  # Refuse a corrupt config before writing.

  model_dir = os.path.join(export_base, model_name)
  os.makedirs(model_dir, exist_ok=True)
  # A hidden, non-integer name: neither this server nor TF Serving loads it.
  tmp_dir = tempfile.mkdtemp(prefix=".tmp-export-", dir=model_dir)
  try:
    # mkdtemp makes it private (0700); a served model must be world-readable.
    os.chmod(tmp_dir, 0o755)
    module, signatures = _serving_module(keras_model, info)
    tf.saved_model.save(module, tmp_dir, signatures=signatures)
    final_dir = _rename_to_next_version(tmp_dir, model_dir, info, model_name,
                                        metadata)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  write_models_config(export_base, model_name)
  return final_dir


def write_models_config(export_base: str, model_name: str,
                        serving_root: str = DEFAULT_SERVING_ROOT) -> str:
  """Writes `<export_base>/models.config` for TF Serving's --model_config_file.

  TF Serving requires absolute base paths, so each model's base_path is
  `<serving_root>/<model_name>`: with the default, mount `<export_base>` at
  `/models` in the `tensorflow/serving` container. Models already listed in an
  existing config are kept, so several models can share one export base. The
  version policy is `all`, as `tff_dpmed.serve` keeps every version
  addressable; the file is replaced atomically.

  Returns:
    The path of the config file.
  """
  check_model_name(model_name)
  path = os.path.join(export_base, MODELS_CONFIG_FILENAME)
  config = read_models_config(export_base)
  entries = config.model_config_list.config
  kept = [c for c in entries if c.name != model_name]
  del entries[:]
  entries.extend(kept)
  entry = entries.add()
  entry.name = model_name
  entry.base_path = serving_root.rstrip("/") + "/" + model_name
  entry.model_platform = "tensorflow"
  entry.model_version_policy.all.SetInParent()
  os.makedirs(export_base, exist_ok=True)
  _write_atomically(path, text_format.MessageToString(config))
  return path


def read_models_config(export_base: str
                       ) -> model_server_config_pb2.ModelServerConfig:
  """The existing `<export_base>/models.config` (empty if none); UsageError if bad.

  Export calls this before writing anything, so a corrupt config stops it
  before a new version appears that the config would then fail to list.
  """
  path = os.path.join(export_base, MODELS_CONFIG_FILENAME)
  config = model_server_config_pb2.ModelServerConfig()
  if not os.path.lexists(path):
    return config
  try:
    with open(path, encoding="utf-8") as f:
      text_format.Parse(f.read(), config)
  except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
    reason = " ".join(str(e).split())
    raise UsageError(f"{path} is not a valid TF Serving model config ({reason}):"
                     " fix it, or delete it and export again (export rewrites"
                     " it); nothing was exported") from None
  return config


def _check_info(info: DatasetInfo) -> None:
  shape = tuple(info.image_shape)
  if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
    raise UsageError(f"image_shape {info.image_shape} must be (height, width, "
                     "channels) of positive integers")
  if shape[2] not in (1, 3, 4):
    raise UsageError(f"images with {shape[2]} channels cannot be decoded from "
                     "PNG/JPEG; use 1, 3 or 4 channels")
  if info.num_classes < 1:
    raise UsageError("dataset info has no class names")


def _check_model_output(keras_model: tf.keras.Model, info: DatasetInfo) -> None:
  try:
    out_shape = keras_model.output_shape
  except (AttributeError, RuntimeError):
    return  # A subclassed model that was never built: the trace will tell.
  if isinstance(out_shape, tuple) and out_shape and out_shape[-1] not in (
      None, info.num_classes):
    raise UsageError(f"the model outputs {out_shape[-1]} logits but dataset "
                     f"{info.name} has {info.num_classes} classes")


def _serving_module(keras_model: tf.keras.Model, info: DatasetInfo):
  """A tf.Module with the serving functions, and the signatures map."""
  height, width, channels = (int(d) for d in info.image_shape)
  class_names = tf.constant(list(info.class_names), dtype=tf.string)

  def outputs_for(images: tf.Tensor) -> dict[str, tf.Tensor]:
    # Training's own normalisation, inside the graph so clients send pixels.
    logits = keras_model(preprocess_images(images), training=False)
    probs = tf.cast(probabilities(info, logits), tf.float32)
    index = tf.argmax(probs, axis=-1, output_type=tf.int64)
    return {
        OUTPUT_PROBABILITIES: probs,
        OUTPUT_CLASS_INDEX: index,
        OUTPUT_CLASS_NAME: tf.gather(class_names, index),
    }

  @tf.function(input_signature=[
      tf.TensorSpec([None, height, width, channels], tf.uint8, name=INPUT_IMAGES)])
  def serve_images(images):
    return outputs_for(images)

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name=INPUT_IMAGE_BYTES)])
  def serve_image_bytes(image_bytes):
    images = tf.map_fn(
        lambda data: decode_image(data, height, width, channels),
        image_bytes,
        fn_output_signature=tf.TensorSpec([height, width, channels], tf.uint8))
    return outputs_for(images)

  module = tf.Module()
  # Only the variables, not the Keras object: the SavedModel then holds just
  # the serving graphs, and saving does not retrace every Keras layer.
  module.model_variables = list(keras_model.variables)
  module.serve_images = serve_images
  module.serve_image_bytes = serve_image_bytes
  images_fn = serve_images.get_concrete_function()
  signatures = {
      SIGNATURE_IMAGES: images_fn,
      SIGNATURE_PREDICT: images_fn,
      SIGNATURE_IMAGE_BYTES: serve_image_bytes.get_concrete_function(),
  }
  return module, signatures


def _rename_to_next_version(tmp_dir: str, model_dir: str, info: DatasetInfo,
                            model_name: str, metadata: dict) -> str:
  """Moves the finished SavedModel to the next free version; returns its path."""
  while True:
    version = max(list_versions(model_dir), default=0) + 1
    _write_metadata(tmp_dir, info, model_name, version, metadata)
    final_dir = os.path.join(model_dir, str(version))
    try:
      # Atomic, and fails instead of replacing if another export took `version`.
      os.rename(tmp_dir, final_dir)
      return final_dir
    except OSError:
      if not os.path.isdir(final_dir):
        raise


def _write_metadata(saved_model_dir: str, info: DatasetInfo, model_name: str,
                    version: int, metadata: dict) -> None:
  doc = dict(metadata)
  doc["dataset_info"] = info.to_json()
  doc["serving"] = {
      "model_name": model_name,
      "version": version,
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "tff_dpmed_version": tff_dpmed.__version__,
      "tensorflow_version": tf.__version__,
      "signatures": {
          SIGNATURE_IMAGES: {INPUT_IMAGES: "uint8 [batch, H, W, C]"},
          SIGNATURE_PREDICT: {INPUT_IMAGES: "uint8 [batch, H, W, C]"},
          SIGNATURE_IMAGE_BYTES: {INPUT_IMAGE_BYTES: "string [batch], PNG or JPEG"},
      },
      "outputs": {
          OUTPUT_PROBABILITIES: "float32 [batch, K]: " + (
              "one sigmoid per label" if info.multi_label else "softmax"),
          OUTPUT_CLASS_INDEX: "int64 [batch]: argmax of probabilities" + (
              " (the most probable label; threshold probabilities for all)"
              if info.multi_label else ""),
          OUTPUT_CLASS_NAME: "string [batch]: class_names[class_index]",
      },
  }
  write_export_metadata(saved_model_dir, doc)


def _write_atomically(path: str, text: str) -> None:
  files.write_atomic(path, text.encode("utf-8"))
