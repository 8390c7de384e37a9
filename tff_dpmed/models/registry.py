"""Model names, builders, and the loss and output activation for each task."""

from typing import Callable, Optional

import tensorflow as tf

from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.models import cnn, resnet

_BUILDERS: dict[str, Callable[..., tf.keras.Model]] = {
    "cnn": cnn.build_small_cnn,
    "gap_cnn": cnn.build_gap_cnn,
    "gap_cnn_gn": cnn.build_gap_cnn_gn,
    "resnet18": resnet.build_resnet18,
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, info: DatasetInfo, seed: Optional[int] = None) -> tf.keras.Model:
  """Builds an uncompiled Keras model for `info` that outputs logits."""
  if name not in _BUILDERS:
    raise UsageError(f"unknown model '{name}': use one of {', '.join(MODEL_NAMES)}")
  if seed is not None:
    tf.keras.utils.set_random_seed(seed)
  return _BUILDERS[name](input_shape=tuple(info.image_shape), num_classes=info.num_classes)


def loss_for(info: DatasetInfo) -> tf.keras.losses.Loss:
  """Multi-label tasks are independent sigmoids; all others one softmax."""
  if info.multi_label:
    return tf.keras.losses.BinaryCrossentropy(from_logits=True)
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def probabilities(info: DatasetInfo, logits: tf.Tensor) -> tf.Tensor:
  """The probabilities that `loss_for(info)` models."""
  return tf.sigmoid(logits) if info.multi_label else tf.nn.softmax(logits)

