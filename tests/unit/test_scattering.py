"""Scattering models: the feature stage, the layer that repeats it, head and full model, export."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed import models
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.models import scattering
from tff_dpmed.serving import export

GREY28 = DatasetInfo("g", "binary-class", ("a", "b"), (28, 28, 1))
RGB28 = DatasetInfo("c", "multi-label", tuple("abcd"), (28, 28, 3))
RGB64 = DatasetInfo("c", "multi-class", tuple("abcdefgh"), (64, 64, 3))
SCATTER_MODELS = ("scatter_linear", "scatter_cnn")


def _images(info: DatasetInfo, n: int = 6, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, *info.image_shape), dtype=np.uint8)


@pytest.mark.parametrize("info, shape", [(GREY28, (7, 7, 81)), (RGB28, (7, 7, 243)),
                                         (RGB64, (8, 8, 243))], ids=["grey28", "rgb28", "rgb64"])
def test_features_have_the_documented_shape_and_are_deterministic(info, shape):
  stage = models.feature_stage("scatter_linear", info)
  assert stage.output_shape(info.image_shape) == shape
  images = _images(info)
  features = stage.transform(images)
  assert features.dtype == np.float32 and features.shape == (len(images), *shape)
  np.testing.assert_array_equal(features, stage.transform(images))


def test_an_images_features_depend_only_on_that_image():
  # Across a batch boundary too: the stage is data-independent.
  images = _images(GREY28, n=scattering._BATCH + 3)
  features = scattering.FeatureStage().transform(images)
  for k in (0, scattering._BATCH - 1, scattering._BATCH + 2):
    np.testing.assert_array_equal(features[k], scattering.FeatureStage().transform(
        images[k:k + 1])[0])


def test_channel_c_features_are_the_scattering_of_channel_c():
  images = _images(RGB28, n=2)
  features = scattering.FeatureStage().transform(images)
  grey = scattering.FeatureStage().transform(np.ascontiguousarray(images[..., 1:2]))
  np.testing.assert_array_equal(features[..., 81:162], grey)


@pytest.mark.parametrize("info", [GREY28, RGB64], ids=["grey28", "rgb64"])
def test_layer_equals_feature_stage(info):
  # Training uses the stage's features, evaluation and serving the layer's.
  images = _images(info)
  layer = scattering.ScatteringLayer()
  from_layer = layer(images.astype(np.float32) / 255.0).numpy()
  from_stage = scattering.FeatureStage().transform(images)
  np.testing.assert_allclose(from_layer, from_stage, rtol=1e-4, atol=1e-5)
  assert layer.weights == []


def test_feature_stage_only_for_scattering_models():
  assert models.feature_stage("gap_cnn", GREY28) is None
  assert isinstance(models.feature_stage("scatter_cnn", GREY28), scattering.FeatureStage)


def test_bad_inputs_are_usage_errors():
  with pytest.raises(UsageError, match="expected uint8"):
    scattering.FeatureStage().transform(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(UsageError, match="too small to scatter"):
    models.build_model("scatter_linear", DatasetInfo("t", "binary-class", ("a", "b"), (3, 3, 1)))


@pytest.mark.parametrize("name", SCATTER_MODELS)
@pytest.mark.parametrize("info", [GREY28, RGB64], ids=["grey28", "rgb64"])
def test_trained_head_weights_assign_to_the_full_model(name, info):
  head = models.build_trainable(name, info, seed=1)
  full = models.build_model(name, info, seed=2)
  assert [w.shape for w in head.trainable_weights] == [w.shape for w in full.trainable_weights]
  # What the trainer does: the TFF weights of the head, assigned to a new full model.
  tff.learning.models.ModelWeights.from_model(head).assign_weights_to(full)
  images = _images(info)
  features = models.feature_stage(name, info).transform(images)
  np.testing.assert_allclose(full(images.astype(np.float32) / 255.0).numpy(),
                             head(features).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SCATTER_MODELS)
def test_same_seed_gives_the_head_and_the_full_model_the_same_weights(name):
  head = models.build_trainable(name, GREY28, seed=3).get_weights()
  full = models.build_model(name, GREY28, seed=3).get_weights()
  for a, b in zip(head, full, strict=True):
    np.testing.assert_array_equal(a, b)


def test_end_to_end_models_train_whole():
  trainable = models.build_trainable("gap_cnn_gn", GREY28, seed=0)
  assert trainable.input_shape == (None, *GREY28.image_shape)
  for a, b in zip(trainable.get_weights(), models.build_model("gap_cnn_gn", GREY28, seed=0)
                  .get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)


def test_exported_scatter_model_serves_the_trained_model(tmp_path):
  info = RGB28
  model = models.build_model("scatter_cnn", info, seed=0)
  path = export.export_saved_model(model, info, str(tmp_path), "scatter_cnn", {})
  serve = tf.saved_model.load(path).signatures["serving_default"]
  images = _images(info, n=5)
  served = serve(images=tf.constant(images))["probabilities"].numpy()
  want = models.probabilities(info, model(images.astype(np.float32) / 255.0)).numpy()
  np.testing.assert_allclose(served, want, rtol=1e-5, atol=1e-6)
