"""The fast default: a small CNN without normalisation layers.

No BatchNorm anywhere in tff_dpmed: its running statistics are computed from,
and released with, each client's raw data outside the clipped and noised model
update, so they would leak per-client information and void the DP sensitivity.
GroupNorm (`gap_cnn_gn`) normalises each example on its own and keeps no state.
"""

import tensorflow as tf

_GROUPS = 8


def downsample_factor(image_size: int) -> int:
  """The average-pooling factor that brings an input above 32 px down to 28-32 px."""
  return image_size // 32 if image_size > 32 else 1


def _conv(x, filters: int, group_norm: bool):
  """A 3x3 relu conv; with `group_norm`, GroupNorm between the conv and the relu."""
  if not group_norm:
    return tf.keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
  # No bias: GroupNorm's own offset replaces it.
  x = tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
  x = tf.keras.layers.GroupNormalization(groups=_GROUPS)(x)
  return tf.keras.layers.ReLU()(x)


def _two_conv_blocks(input_shape: tuple[int, int, int], group_norm: bool = False):
  """The stem the CNNs share: (inputs, features after conv32-pool-conv64-pool)."""
  inputs = tf.keras.Input(shape=input_shape, name="image")
  x = inputs
  if input_shape[0] > 32:
    # Large inputs are downsampled first so the CNNs stay cheap at 64-224 px.
    x = tf.keras.layers.AveragePooling2D(pool_size=downsample_factor(input_shape[0]))(x)
  x = _conv(x, 32, group_norm)
  x = tf.keras.layers.MaxPooling2D()(x)
  x = _conv(x, 64, group_norm)
  x = tf.keras.layers.MaxPooling2D()(x)
  return inputs, x


def _dense_head(x, num_classes: int):
  x = tf.keras.layers.Dense(128, activation="relu")(x)
  return tf.keras.layers.Dense(num_classes, name="logits")(x)


def build_small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  inputs, x = _two_conv_blocks(input_shape)
  x = tf.keras.layers.Flatten()(x)
  return tf.keras.Model(inputs, _dense_head(x, num_classes), name="small_cnn")


def build_gap_cnn(input_shape: tuple[int, int, int], num_classes: int,
                  group_norm: bool = False) -> tf.keras.Model:
  """Three conv blocks and global average pooling instead of Flatten.

  Pooling over positions makes the features position-invariant; on
  PneumoniaMNIST, whose test split is shifted from train/val, that generalises
  to the test split where the Flatten CNN overfits to the train distribution.
  `group_norm` adds GroupNorm after each conv (`gap_cnn_gn`), for comparison.
  """
  inputs, x = _two_conv_blocks(input_shape, group_norm)
  x = _conv(x, 128, group_norm)
  x = tf.keras.layers.GlobalAveragePooling2D()(x)
  return tf.keras.Model(inputs, _dense_head(x, num_classes),
                        name="gap_cnn_gn" if group_norm else "gap_cnn")


def build_gap_cnn_gn(input_shape: tuple[int, int, int], num_classes: int) -> tf.keras.Model:
  return build_gap_cnn(input_shape, num_classes, group_norm=True)
