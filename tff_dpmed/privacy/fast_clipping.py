"""The sum of per-example clipped gradients without materialising them ("ghost" clipping).

Materialised per-example gradients cost B copies of every weight: for the
small CNN's 3136x128 dense layer, 512 examples make 0.8 GB, and TF 2.14's
`pfor` computes the conv layers' filter gradients in a while loop over the
examples. TF Privacy's fast gradient clipping (`clip_grads.compute_gradient_norms`,
Li et al. 2021, arXiv:2009.03106) gets each example's gradient *norm* from one
batched forward/backward pass: per layer, from the layer's input and the
gradient of the summed loss with respect to its pre-activation output. The
clipped sum is then one more batched backward pass of sum_i w_i * loss_i,
with w_i = min(1, C / ||g_i||) held constant: exactly sum_i clip_C(g_i), since
the examples do not interact in the forward pass.

TF Privacy 0.9.0 registers Dense and Embedding, not Conv2D: `conv2d_layer_computation`
adds it (the per-example filter gradient from image patches and the output
gradient, which for 3x3 filters is small). A model is eligible only if every
layer with trainable weights is registered (exact classes, so Conv2DTranspose
does not pass as Conv2D), each is called once (TF Privacy sums the squared
norms of a shared layer's calls, not of its summed gradient), and no layer
draws randomness in training (dropout, noise, augmentation): both passes must
see the same forward pass.
Ineligible models keep the materialised path (`example_dp.per_example_gradients`);
the two agree (tests/unit/test_fast_clipping.py).

Overflow: an example whose norm is not finite makes the weighted pass
unreliable (0 * inf is NaN), so then the whole batch takes the materialised,
overflow-safe path (`safe_updates.safe_clip_rows`) inside a `tf.cond`.
"""

from typing import Callable

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads
from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry as registry_lib


def conv2d_layer_computation(layer, input_args, input_kwargs, tape, num_microbatches=None):
  """TF Privacy registry function for `tf.keras.layers.Conv2D` (channels last, groups 1).

  Returns (pre-activation output, layer output, squared-norm function), as
  TF Privacy's `dense_layer_computation` does.
  """
  if input_kwargs or len(input_args) != 1 or num_microbatches is not None:
    raise NotImplementedError("Conv2D: one positional input, no microbatches")
  activation = layer.activation
  layer.activation = None
  try:
    pre_activation = layer(*input_args)
  finally:
    layer.activation = activation
  tape.watch(pre_activation)
  outputs = activation(pre_activation) if activation else pre_activation
  inputs = input_args[0]
  kernel_h, kernel_w = layer.kernel_size

  def squared_norms(output_grads):
    patches = tf.image.extract_patches(
        inputs, sizes=[1, kernel_h, kernel_w, 1], strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
    n = tf.shape(inputs)[0]
    patches = tf.reshape(patches, [n, -1, patches.shape[-1]])
    grads = tf.reshape(output_grads, [n, -1, output_grads.shape[-1]])
    # Each example's filter gradient, (positions x patch)^T (positions x filters).
    kernel_grads = tf.matmul(patches, grads, transpose_a=True)
    norms = tf.reduce_sum(tf.square(kernel_grads), axis=[1, 2])
    if layer.use_bias:
      norms += tf.reduce_sum(tf.square(tf.reduce_sum(grads, axis=1)), axis=1)
    return norms

  return pre_activation, outputs, squared_norms


def layer_registry() -> registry_lib.LayerRegistry:
  registry = registry_lib.make_default_layer_registry()
  registry.insert(tf.keras.layers.Conv2D, conv2d_layer_computation)
  return registry


def _conv_is_supported(layer) -> bool:
  return (type(layer) is not tf.keras.layers.Conv2D
          or (layer.groups == 1 and layer.data_format == "channels_last"
              and layer.padding in ("same", "valid")))


def supports(keras_model: tf.keras.Model) -> bool:
  """Whether `clipped_gradient_sum` computes `keras_model`'s clipped sum exactly."""
  layers = _all_layers(keras_model)
  return (isinstance(keras_model, tf.keras.Model)
          and gradient_clipping_utils.all_trainable_layers_are_registered(
              keras_model, layer_registry())
          and not any(hasattr(layer, "_random_generator") for layer in layers)
          and all(len(layer.inbound_nodes) <= 1 for layer in layers if layer.trainable_weights)
          and all(_conv_is_supported(layer) for layer in layers)
          and not keras_model.non_trainable_weights)


def _all_layers(model) -> list:
  out = []
  for layer in model.layers:
    out.append(layer)
    if isinstance(layer, tf.keras.Model):
      out.extend(_all_layers(layer))
  return out


def clone_with_weights(keras_model: tf.keras.Model, trainable: list) -> tf.keras.Model:
  """`keras_model`'s architecture with the tensors `trainable` as its weights
  (what TFF's `functional_model_from_keras` does to predict; inside a graph)."""
  remaining = list(trainable)

  def use_tensor(_, **kwargs):
    del kwargs
    return remaining.pop(0)

  with tf.variable_creator_scope(use_tensor):
    return tf.keras.models.clone_model(keras_model)


def unreduced(loss: tf.keras.losses.Loss) -> tf.keras.losses.Loss:
  """`loss` giving one value per example (multi-label: the mean over labels, as
  the loss of a batch of one is)."""
  config = loss.get_config()
  config["reduction"] = tf.keras.losses.Reduction.NONE
  return loss.from_config(config)


def clipped_gradient_sum(keras_model: tf.keras.Model, loss: tf.keras.losses.Loss,
                         trainable: list, x, y, *, scale: float, clip: float,
                         materialised: Callable[[], list]) -> list:
  """sum_i clip_C(scale * grad_i) over the examples of (x, y), like `trainable`.

  `materialised()` computes the same from per-example gradients, overflow-safe;
  it runs instead when an example's norm is not finite. Call inside a graph
  (a `tff.tensorflow.computation`), with `supports(keras_model)`.
  """
  per_example_loss = unreduced(loss)
  norms = clip_grads.compute_gradient_norms(
      clone_with_weights(keras_model, trainable), layer_registry(), x, y,
      per_example_loss_fn=lambda labels, outputs, _: per_example_loss(labels, outputs))
  update_norms = scale * norms
  weights = tf.stop_gradient(tf.minimum(1.0, clip / tf.maximum(update_norms, 1e-30)))

  def weighted_pass():
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      outputs = clone_with_weights(keras_model, trainable)(x, training=True)
      weighted = scale * tf.reduce_sum(weights * per_example_loss(y, outputs))
    grads = tape.gradient(weighted, trainable)
    return [tf.zeros_like(w) if g is None else g for g, w in zip(grads, trainable)]

  return tf.cond(tf.reduce_all(tf.math.is_finite(update_norms)), weighted_pass, materialised)
