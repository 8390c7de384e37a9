"""Ghost clipping (privacy/fast_clipping.py) against materialised per-example gradients.

The clipped sum must be sum_i clip_C(scale * g_i) with g_i each example's
own gradient, computed independently here with one GradientTape per example.
"""

import numpy as np
import pytest
import tensorflow as tf

from tff_dpmed.privacy import fast_clipping


def _conv_model():
  tf.keras.utils.set_random_seed(1)
  inputs = tf.keras.Input((12, 12, 2))
  x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
  x = tf.keras.layers.Conv2D(5, 3, strides=2, padding="valid", use_bias=False)(x)
  x = tf.keras.layers.Conv2D(3, 2, dilation_rate=2, padding="same", activation="tanh")(x)
  x = tf.keras.layers.MaxPooling2D()(x)
  x = tf.keras.layers.Flatten()(x)
  x = tf.keras.layers.Dense(6, activation="relu")(x)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(3)(x))


def _loss(multi_label: bool):
  if multi_label:
    return tf.keras.losses.BinaryCrossentropy(from_logits=True)
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _batch(multi_label: bool, n: int = 9):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(n, 12, 12, 2)).astype(np.float32) * 3
  y = (rng.integers(0, 2, (n, 3)).astype(np.float32) if multi_label
       else rng.integers(0, 3, n).astype(np.int32))
  return tf.constant(x), tf.constant(y)


def _per_example_gradients(model, loss, x, y):
  """Each example's gradient, one tape per example: the definition, no tricks."""
  out = []
  for i in range(int(x.shape[0])):
    with tf.GradientTape() as tape:
      value = loss(y[i:i + 1], model(x[i:i + 1], training=True))
    out.append([g.numpy() for g in tape.gradient(value, model.trainable_variables)])
  return out


def _fast_sum(model, loss, x, y, scale, clip, materialised=None):
  weights = [tf.constant(w.numpy()) for w in model.trainable_variables]

  @tf.function
  def run(x, y):
    return fast_clipping.clipped_gradient_sum(
        model, loss, weights, x, y, scale=scale, clip=clip,
        materialised=materialised or (lambda: [tf.zeros_like(w) for w in weights]))

  return [t.numpy() for t in run(x, y)]


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_clipped_sum_is_the_sum_of_each_examples_clipped_gradient(multi_label):
  model, loss = _conv_model(), _loss(multi_label)
  assert fast_clipping.supports(model)
  x, y = _batch(multi_label)
  scale = 0.5
  grads = _per_example_gradients(model, loss, x, y)
  norms = [scale * np.sqrt(sum(float(np.sum(g**2)) for g in gs)) for gs in grads]
  # The clip binds for about half of the examples.
  clip = float(np.median(norms))
  assert min(norms) < clip < max(norms)
  expected = [sum(scale * gs[k] * min(1.0, clip / n) for gs, n in zip(grads, norms))
              for k in range(len(grads[0]))]
  # The materialised fallback returns zeros, so agreement shows the fast branch ran.
  for got, want in zip(_fast_sum(model, loss, x, y, scale, clip), expected):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_an_update_norm_that_overflows_sends_the_batch_to_the_materialised_path():
  model, loss = _conv_model(), _loss(False)
  x, y = _batch(False)
  sentinel = [tf.fill(tf.shape(w), 7.0) for w in model.trainable_variables]
  # Norms of a few units times 1e38 are infinite in float32.
  got = _fast_sum(model, loss, x, y, 1e38, 0.3, materialised=lambda: sentinel)
  assert all(np.all(g == 7.0) for g in got)
  got = _fast_sum(model, loss, x, y, 1e30, 0.3, materialised=lambda: sentinel)
  assert not any(np.all(g == 7.0) for g in got)


def test_the_conv_registry_gives_each_examples_gradient_norm():
  model, loss = _conv_model(), _loss(False)
  x, y = _batch(False)
  from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads  # pylint: disable=g-import-not-at-top
  norms = clip_grads.compute_gradient_norms(
      model, fast_clipping.layer_registry(), x, y,
      per_example_loss_fn=lambda a, b, _: fast_clipping.unreduced(loss)(a, b))
  want = [np.sqrt(sum(float(np.sum(g**2)) for g in gs))
          for gs in _per_example_gradients(model, loss, x, y)]
  np.testing.assert_allclose(norms.numpy(), want, rtol=1e-4)


def _with(layer):
  inputs = tf.keras.Input((8, 8, 1))
  x = tf.keras.layers.Conv2D(2, 3)(inputs)
  x = layer(x)
  x = tf.keras.layers.Flatten()(x)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(2)(x))


@pytest.mark.parametrize("layer,supported", [
    (tf.keras.layers.ReLU(), True),
    (tf.keras.layers.Dropout(0.5), False),             # Random: two passes would differ.
    (tf.keras.layers.GaussianNoise(0.1), False),
    (tf.keras.layers.GroupNormalization(2), False),    # Trainable, not registered.
    (tf.keras.layers.BatchNormalization(), False),     # Non-trainable state.
    (tf.keras.layers.Conv2DTranspose(2, 3), False),    # A Conv2D subclass, not a Conv2D.
    (tf.keras.layers.Conv2D(2, 3, groups=2), False),
])
def test_only_models_the_ghost_pass_computes_exactly_are_supported(layer, supported):
  assert fast_clipping.supports(_with(layer)) is supported


def test_a_layer_called_twice_is_not_supported():
  inputs = tf.keras.Input((4,))
  shared = tf.keras.layers.Dense(4)
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(2)(shared(shared(inputs))))
  assert not fast_clipping.supports(model)

