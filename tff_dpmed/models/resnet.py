"""A ResNet-18-style network with GroupNorm, for 28 to 224 px inputs.

GroupNorm instead of BatchNorm: GroupNorm normalises each example on its own,
so it keeps no cross-example statistics that could leak a client's data (see
cnn.py). The stem adapts to the input size as MedMNIST v2's baselines do: a
3x3 stride-1 stem for small images, the usual 7x7 stride-2 + max-pool for large.
"""

import tensorflow as tf

_GROUPS = 8


def _group_norm() -> tf.keras.layers.Layer:
  return tf.keras.layers.GroupNormalization(groups=_GROUPS)


def _basic_block(x: tf.Tensor, filters: int, stride: int) -> tf.Tensor:
  shortcut = x
  y = tf.keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
  y = _group_norm()(y)
  y = tf.keras.layers.ReLU()(y)
  y = tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
  y = _group_norm()(y)
  if stride != 1 or shortcut.shape[-1] != filters:
    shortcut = tf.keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
    shortcut = _group_norm()(shortcut)
  return tf.keras.layers.ReLU()(y + shortcut)


def build_resnet18(input_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  inputs = tf.keras.Input(shape=input_shape, name="image")
  if input_shape[0] >= 64:
    x = tf.keras.layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False)(inputs)
    x = _group_norm()(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.MaxPooling2D(3, strides=2, padding="same")(x)
  else:
    x = tf.keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(inputs)
    x = _group_norm()(x)
    x = tf.keras.layers.ReLU()(x)
  for filters, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    x = _basic_block(x, filters, stride)
    x = _basic_block(x, filters, 1)
  x = tf.keras.layers.GlobalAveragePooling2D()(x)
  logits = tf.keras.layers.Dense(num_classes, name="logits")(x)
  return tf.keras.Model(inputs, logits, name="resnet18_gn")
