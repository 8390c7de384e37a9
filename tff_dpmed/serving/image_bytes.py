"""In-graph decoding of the PNG/JPEG files the `predict_image_bytes` signature takes.

Runs inside the exported SavedModel (TF Serving executes it too), so it uses
TensorFlow ops only. Bad input fails with InvalidArgument and a message that
says what to send instead, before any large allocation.
"""

import tensorflow as tf

# An encoded image may declare at most this many pixels: a tiny PNG can declare
# 50000 x 50000 and would need gigabytes to decode, taking the server down.
MAX_DECODED_PIXELS = 8192 * 8192

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_image(data: tf.Tensor, height: int, width: int,
                 channels: int) -> tf.Tensor:
  """One PNG/JPEG file -> uint8 [height, width, channels]; InvalidArgument if bad.

  Resizing is bilinear with antialiasing (which only acts when shrinking),
  rounded back to uint8; an image already height x width is passed through
  unchanged, so a PNG of a dataset image gives exactly the uint8 input.
  """
  is_png = tf.equal(tf.strings.substr(data, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
  is_jpeg = tf.equal(tf.strings.substr(data, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
  checks = [tf.debugging.Assert(
      tf.logical_or(is_png, is_jpeg),
      ["image_bytes must hold PNG or JPEG files (over REST, send each as a "
       "b64 object)"])]
  with tf.control_dependencies(checks):
    pixels = tf.cond(is_png, lambda: _png_declared_pixels(data),
                     lambda: _jpeg_declared_pixels(data))
  too_big = tf.debugging.Assert(
      tf.less_equal(pixels, MAX_DECODED_PIXELS),
      [tf.strings.format("image declares {} pixels; at most {} are accepted",
                         (pixels, MAX_DECODED_PIXELS))])
  with tf.control_dependencies([too_big]):
    image = tf.io.decode_image(data, channels=channels, dtype=tf.uint8,
                               expand_animations=False)
  image.set_shape([None, None, channels])
  shape = tf.shape(image)
  same_size = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))

  def resize():
    resized = tf.image.resize(image, [height, width], antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)

  return tf.cond(same_size, lambda: image, resize)


def _png_declared_pixels(data: tf.Tensor) -> tf.Tensor:
  # IHDR is always first: width and height are big-endian uint32 at bytes 16-23.
  long_enough = tf.debugging.Assert(tf.strings.length(data) >= 24,
                                    ["truncated PNG file"])
  with tf.control_dependencies([long_enough]):
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8),
                  tf.int64)
  weights = tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64)
  width = tf.reduce_sum(raw[:4] * weights)
  height = tf.reduce_sum(raw[4:] * weights)
  return width * height


def _jpeg_declared_pixels(data: tf.Tensor) -> tf.Tensor:
  shape = tf.image.extract_jpeg_shape(data, output_type=tf.int32)
  return tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64)
