"""The fast default: a small CNN without normalisation layers.

No BatchNorm anywhere in tff_dpmed: its running statistics are computed from,
and released with, each client's raw data outside the clipped and noised model
update, so they would leak per-client information and void the DP sensitivity.
"""

import tensorflow as tf


def _two_conv_blocks(input_shape: tuple[int, int, int]):
  """The stem both CNNs share: (inputs, features after conv32-pool-conv64-pool)."""
  inputs = tf.keras.Input(shape=input_shape, name="image")
  x = inputs
  if input_shape[0] > 32:
    # Large inputs are downsampled first so the CNNs stay cheap at 64-224 px.
    x = tf.keras.layers.AveragePooling2D(pool_size=input_shape[0] // 32)(x)
  x = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
  x = tf.keras.layers.MaxPooling2D()(x)
  x = tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
  x = tf.keras.layers.MaxPooling2D()(x)
  return inputs, x


def _dense_head(x, num_classes: int):
  x = tf.keras.layers.Dense(128, activation="relu")(x)
  return tf.keras.layers.Dense(num_classes, name="logits")(x)


def build_small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  inputs, x = _two_conv_blocks(input_shape)
  x = tf.keras.layers.Flatten()(x)
  return tf.keras.Model(inputs, _dense_head(x, num_classes), name="small_cnn")


def build_gap_cnn(input_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  """Three conv blocks and global average pooling instead of Flatten.

  Pooling over positions makes the features position-invariant; on
  PneumoniaMNIST, whose test split is shifted from train/val, that generalises
  to the test split where the Flatten CNN overfits to the train distribution.
  """
  inputs, x = _two_conv_blocks(input_shape)
  x = tf.keras.layers.Conv2D(128, 3, padding="same", activation="relu")(x)
  x = tf.keras.layers.GlobalAveragePooling2D()(x)
  return tf.keras.Model(inputs, _dense_head(x, num_classes), name="gap_cnn")
