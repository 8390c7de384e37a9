"""Wavelet scattering features (Kymatio's Scattering2D) and the heads trained on them.

Tramèr & Boneh (2021), "Differentially private learning needs better
features": a fixed ScatterNet (J=2, L=8) followed by a linear model or a
small CNN, each with GroupNorm on the scattering channels, learns far better
under DP-SGD than an end-to-end CNN. The transform has no weights and looks
at no data, so it costs no privacy budget: the trainer computes it once for
the train split (`FeatureStage`, outside TFF) and trains only the head on the
features. The full model (`ScatteringLayer`, then the head) takes images, so
evaluation, export and serving see an ordinary image classifier.

Both paths compute the same features: `preprocess_images`, then average
pooling of inputs above 32 px (as models/cnn.py does), then the scattering of
each channel. Features are (h, w, 81 * C), h = pooled height // 4; channel c's
81 coefficient maps are features [..., 81 * c : 81 * (c + 1)].
`FeatureStage` runs Kymatio's NumPy frontend (6x faster than its TF frontend
on this CPU: 5.8 s against 34 s for 4,708 28-px images); the layer runs the TF
frontend, which traces into a SavedModel. They agree to float32 rounding.
"""

import functools
import sys

import kymatio.numpy
import kymatio.tensorflow
import numpy as np
import tensorflow as tf
import tqdm

from tff_dpmed.data.preprocess import preprocess_images
from tff_dpmed.errors import UsageError
from tff_dpmed.models.cnn import downsample_factor

J = 2  # Scale: 2**J = 4 px, so 28-32 px inputs give 7x7-8x8 feature maps.
L = 8  # Angles; Kymatio's filters are designed for 8.
COEFFICIENTS = 1 + J * L + L * L * J * (J - 1) // 2  # Per input channel: 81.
# Scattering channels per GroupNorm group, as in the paper: 27 groups of 3 for
# grayscale. 81 * C channels always split into 27 * C groups of 3.
_CHANNELS_PER_GROUP = 3
# The paper's (PyTorch's default). Second-order groups vary by only ~1e-7 to
# 1e-6 (PneumoniaMNIST), so epsilon sets their scale: Keras's 1e-3 would make
# them 10x smaller still.
_EPSILON = 1e-5
_BATCH = 256


def _pooled_size(height: int, width: int) -> tuple[int, int]:
  """The (height, width) that Kymatio scatters, after `_channels_first`'s pooling."""
  factor = downsample_factor(height)
  pooled = (height // factor, width // factor)
  if min(pooled) < 2 ** J:
    raise UsageError(f"images of {height}x{width} px are too small to scatter at J={J}: "
                     f"use --image_size={2 ** J} or larger")
  return pooled


def output_shape(image_shape) -> tuple[int, int, int]:
  """(h, w, channels) of the features of images of shape (H, W, C)."""
  height, width, channels = (int(d) for d in image_shape)
  pooled = _pooled_size(height, width)
  return pooled[0] // 2 ** J, pooled[1] // 2 ** J, channels * COEFFICIENTS


def _channels_first(images: tf.Tensor) -> tf.Tensor:
  """Preprocessed (B, H, W, C) -> pooled (B, C, h, w), what Kymatio scatters."""
  factor = downsample_factor(images.shape[1])
  if factor > 1:
    images = tf.nn.avg_pool2d(images, factor, factor, "VALID")
  return tf.transpose(images, [0, 3, 1, 2])


def _channels_last(coefficients, shape: tuple[int, int, int]) -> tf.Tensor:
  """Kymatio's (B, C, 81, h, w) -> features (B, h, w, 81 * C)."""
  height, width, channels = shape
  merged = tf.reshape(coefficients, [-1, channels, height, width])
  return tf.transpose(merged, [0, 2, 3, 1])


@functools.lru_cache(maxsize=None)
def _numpy_scattering(height: int, width: int):
  return kymatio.numpy.Scattering2D(J=J, shape=(height, width), L=L)


class FeatureStage:
  """Scattering features of uint8 images, computed in NumPy in batches."""

  output_shape = staticmethod(output_shape)

  def transform(self, images: np.ndarray, show_progress: bool = True) -> np.ndarray:
    """uint8 (N, H, W, C) images -> float32 (N, h, w, 81 * C) features.

    Deterministic and data-independent: each image's features depend only on
    its own pixels. A progress bar appears if it takes over two seconds.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise UsageError(f"images have dtype {images.dtype} and shape {images.shape}, "
                       "expected uint8 (N, H, W, C): load them with tff_dpmed.data")
    shape = output_shape(images.shape[1:])
    out = np.empty((len(images), *shape), np.float32)
    batches = range(0, len(images), _BATCH)
    for start in tqdm.tqdm(batches, desc="scattering features", unit="batch", delay=2,
                           file=sys.stderr, disable=not show_progress):
      pooled = _channels_first(preprocess_images(images[start:start + _BATCH])).numpy()
      scattering = _numpy_scattering(*pooled.shape[2:])
      out[start:start + _BATCH] = _channels_last(scattering(pooled), shape).numpy()
    return out


@functools.lru_cache(maxsize=None)
def _tf_features(height: int, width: int, channels: int) -> tf.types.experimental.GenericFunction:
  """The layer's transform as one graph, traced once per process and image shape.

  Cached, because the trainer builds a new full model for every evaluation,
  and each trace of Kymatio's 81 paths takes seconds. As one graph, eager
  Keras calls (evaluation) also run 2x faster than op by op. Kymatio's
  filters become constants of that graph.
  """
  shape = output_shape((height, width, channels))
  scattering = kymatio.tensorflow.Scattering2D(J=J, shape=_pooled_size(height, width), L=L)
  return tf.function(
      lambda x: _channels_last(scattering(_channels_first(x)), shape),
      input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)])


class ScatteringLayer(tf.keras.layers.Layer):
  """`FeatureStage`'s transform of preprocessed images inside a Keras model; no weights."""

  def build(self, input_shape):
    _, height, width, channels = input_shape
    self._features = _tf_features(height, width, channels)
    super().build(input_shape)

  def call(self, inputs):
    return self._features(inputs)

  def compute_output_shape(self, input_shape):
    return tf.TensorShape([input_shape[0], *output_shape(input_shape[1:])])


def _group_norm(features):
  """GroupNorm without trainable scale or offset, per example: no state, no weights."""
  groups = features.shape[-1] // _CHANNELS_PER_GROUP
  return tf.keras.layers.GroupNormalization(groups=groups, center=False, scale=False,
                                            epsilon=_EPSILON)(features)


def build_linear_head(feature_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  """GroupNorm, then one dense layer: the paper's ScatterNet + linear model."""
  inputs = tf.keras.Input(shape=feature_shape, name="features")
  x = tf.keras.layers.Flatten()(_group_norm(inputs))
  logits = tf.keras.layers.Dense(num_classes, name="logits")(x)
  return tf.keras.Model(inputs, logits, name="scatter_linear")


def build_cnn_head(feature_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  """GroupNorm, then the paper's small tanh CNN for 7x7 ScatterNet features.

  tanh, not relu: under DP-SGD's clipping, bounded activations train better
  (Papernot et al. 2021), and the paper uses them for all its models.
  """
  inputs = tf.keras.Input(shape=feature_shape, name="features")
  x = _group_norm(inputs)
  x = tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="tanh")(x)
  x = tf.keras.layers.Conv2D(32, 3, padding="same", activation="tanh")(x)
  x = tf.keras.layers.Flatten()(x)
  x = tf.keras.layers.Dense(32, activation="tanh")(x)
  logits = tf.keras.layers.Dense(num_classes, name="logits")(x)
  return tf.keras.Model(inputs, logits, name="scatter_cnn")


def with_scattering(head: tf.keras.Model, image_shape) -> tf.keras.Model:
  """The full model: preprocessed images -> `ScatteringLayer` -> `head` -> logits.

  Its weights are the head's own variables, in the head's order.
  """
  inputs = tf.keras.Input(shape=tuple(image_shape), name="image")
  features = ScatteringLayer(name="scattering")(inputs)
  return tf.keras.Model(inputs, head(features), name=head.name)
