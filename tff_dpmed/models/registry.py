"""Model names, builders, and the loss and output activation for each task.

End-to-end models train on images. A model with a fixed feature stage
(scatter_*) trains only its head, on features the stage computed once:
`build_trainable` is what training builds, `build_model` the full model that
evaluation, export and serving use; both hold the same weights.
"""

from typing import Callable, Optional

import tensorflow as tf

from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.models import cnn, resnet, scattering

_END_TO_END: dict[str, Callable[..., tf.keras.Model]] = {
    "cnn": cnn.build_small_cnn,
    "gap_cnn": cnn.build_gap_cnn,
    "gap_cnn_gn": cnn.build_gap_cnn_gn,
    "resnet18": resnet.build_resnet18,
}
# Heads trained on scattering features (models/scattering.py).
_SCATTERING_HEADS: dict[str, Callable[..., tf.keras.Model]] = {
    "scatter_linear": scattering.build_linear_head,
    "scatter_cnn": scattering.build_cnn_head,
}
MODEL_NAMES = tuple(_END_TO_END) + tuple(_SCATTERING_HEADS)


def _check_name(name: str) -> None:
  if name not in MODEL_NAMES:
    raise UsageError(f"unknown model '{name}': use one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, info: DatasetInfo, seed: Optional[int] = None) -> tf.keras.Model:
  """Builds an uncompiled Keras model for `info` that maps images to logits."""
  trainable = build_trainable(name, info, seed)
  if name in _SCATTERING_HEADS:
    return scattering.with_scattering(trainable, info.image_shape)
  return trainable


def build_trainable(name: str, info: DatasetInfo, seed: Optional[int] = None) -> tf.keras.Model:
  """The part of model `name` that training updates: the whole model, or the
  head on `feature_stage(name, info)`'s features.

  Its weights are `build_model(name, info, seed)`'s, in the same order and
  shapes (the same values for the same seed), so trained weights assign to
  the full model as they are.
  """
  _check_name(name)
  if seed is not None:
    tf.keras.utils.set_random_seed(seed)
  if name in _SCATTERING_HEADS:
    return _SCATTERING_HEADS[name](feature_shape=scattering.output_shape(info.image_shape),
                                   num_classes=info.num_classes)
  return _END_TO_END[name](input_shape=tuple(info.image_shape), num_classes=info.num_classes)


def feature_stage(name: str, info: DatasetInfo) -> Optional[scattering.FeatureStage]:
  """The fixed transform whose features `build_trainable(name, info)` takes, or
  None for a model that trains on images."""
  _check_name(name)
  if name not in _SCATTERING_HEADS:
    return None
  scattering.output_shape(info.image_shape)  # Too-small images fail here, not mid-run.
  return scattering.FeatureStage()


def loss_for(info: DatasetInfo) -> tf.keras.losses.Loss:
  """Multi-label tasks are independent sigmoids; all others one softmax."""
  if info.multi_label:
    return tf.keras.losses.BinaryCrossentropy(from_logits=True)
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def probabilities(info: DatasetInfo, logits: tf.Tensor) -> tf.Tensor:
  """The probabilities that `loss_for(info)` models."""
  return tf.sigmoid(logits) if info.multi_label else tf.nn.softmax(logits)
