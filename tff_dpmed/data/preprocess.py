"""Image normalisation shared by training, evaluation and the served model.

TensorFlow only, no TFF: the export and the model server import this, and
must not pull in TensorFlow Federated (its import is slow and installs a
default execution context that a serving process has no use for).
"""

import tensorflow as tf

from tff_dpmed.errors import UsageError


def preprocess_images(images) -> tf.Tensor:
  """uint8 pixels -> float32 in [0, 1]. The one place the normalisation lives.

  Training, evaluation and the exported serving model all call this, so they
  cannot drift apart. Accepts a NumPy array or a tensor; returns a tensor.
  """
  images = tf.convert_to_tensor(images)
  if images.dtype != tf.uint8:
    raise UsageError(f"images to preprocess have dtype {images.dtype.name}, expected uint8: "
                     "load them with tff_dpmed.data (which returns uint8)")
  return tf.cast(images, tf.float32) / 255.0


def model_inputs(images_or_features) -> tf.Tensor:
  """What a model takes: uint8 images preprocessed, float32 features (a feature
  model's head, see `models.feature_stage`) as they are."""
  x = tf.convert_to_tensor(images_or_features)
  return preprocess_images(x) if x.dtype == tf.uint8 else x
