"""Every registered model: shapes, no BatchNorm, seeded builds, and the functional TFF form."""

import numpy as np
import pytest
import tensorflow as tf

from tff_dpmed import models
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError

GREY_BINARY = DatasetInfo("g", "binary-class", ("a", "b"), (28, 28, 1))
RGB_MULTI = DatasetInfo("c", "multi-class", tuple("abcdefgh"), (64, 64, 3))
FAST_MODELS = [name for name in models.MODEL_NAMES if name != "resnet18"]


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("info", [GREY_BINARY, RGB_MULTI], ids=["grey28", "rgb64"])
def test_logits_have_one_column_per_class(name, info):
  model = models.build_model(name, info, seed=0)
  images = np.random.default_rng(0).random((3, *info.image_shape), dtype=np.float32)
  assert model(images).shape == (3, info.num_classes)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_no_batch_norm_and_no_non_trainable_state(name):
  # BatchNorm statistics would leave the client outside the clipped, noised update.
  model = models.build_model(name, GREY_BINARY, seed=0)
  assert not [l for l in model.submodules if isinstance(l, tf.keras.layers.BatchNormalization)]
  assert model.non_trainable_weights == []


@pytest.mark.parametrize("name", FAST_MODELS)
def test_same_seed_same_initial_weights(name):
  first = models.build_model(name, GREY_BINARY, seed=3).get_weights()
  second = models.build_model(name, GREY_BINARY, seed=3).get_weights()
  other = models.build_model(name, GREY_BINARY, seed=4).get_weights()
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in zip(first, other))


def test_unknown_model_names_the_choices():
  with pytest.raises(UsageError,
                     match="unknown model 'vgg99': use one of cnn, gap_cnn, gap_cnn_gn, resnet18, scatter_linear, scatter_cnn"):
    models.build_model("vgg99", GREY_BINARY)


def test_gap_cnn_output_ignores_where_a_pattern_sits():
  # Global average pooling: a circular shift of the whole image, far from the
  # borders, changes the logits far less than it would for the Flatten CNN.
  rng = np.random.default_rng(1)
  image = np.zeros((1, 28, 28, 1), np.float32)
  image[0, 6:14, 6:14, 0] = rng.random((8, 8))
  shifted = np.roll(image, shift=(8, 8), axis=(1, 2))
  change = {}
  for name in ("gap_cnn", "cnn"):
    model = models.build_model(name, GREY_BINARY, seed=0)
    change[name] = float(np.abs(model(image) - model(shifted)).max())
  assert change["gap_cnn"] < 0.2 * change["cnn"], change
