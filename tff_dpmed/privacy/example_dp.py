"""Example-level DP: DP-SGD as TFF client work (`--dp_mode=example`).

Each client runs `local_steps(n_k) = ceil(E n_k / B)` steps per round. A
step Poisson-samples the client's examples (each joins with q_k = B / n_k,
independently), computes their gradients vectorised (`tf.vectorized_map`,
as TF Privacy's fast path does), clips each to L2 norm C, adds
N(0, (z C)^2) to the sum once, and divides by B, the *expected* batch size:
a fixed denominator, so adding or removing one example moves the step by at
most C / B whatever the batch holds. That is exactly PoissonSampled(q_k,
G(z)) per step, the event `mechanisms.ExampleDPSGD` accounts.

A hand-written client work rather than TF Privacy's `DPKerasSGDOptimizer`:
TFF's functional models train with pure functions of the weights, and TF
Privacy's optimizers (Keras v1 optimizers over variables, fixed-size
microbatches) neither fit those nor Poisson-sampled, variable-size batches.

Each client's dataset holds one element: all its examples (`x`, `y`) and its
id (`client`), so the sampling happens here, where the step count and rate
are known (`client_data.make_whole_client_data`).

Randomness: without a seed each client draws a fresh stream from the OS every
round (`NonDeterministicInts`), unaffected by any TF global seed. With a seed
the server state broadcasts (seed, round) and each client folds in its id:
reproducible, hence predictable and not private (the ledger reports
epsilon = inf); debugging only.
"""

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed.errors import UsageError


def _per_example_clipped_sum(model, trainable, non_trainable, x, y, clip: float, canary=None):
  """Sum over the batch of each example's gradient clipped to L2 norm `clip`.

  `canary` (the example-level canary audit): per example, -1, or the flat
  coordinate (over `trainable`) whose one-hot times `clip` replaces that
  example's gradient (`data.canary_examples`).

  Returns the sum (a list like `trainable`).
  """
  grads = per_example_gradients(model, trainable, non_trainable, x, y)
  if canary is not None:
    grads = _with_canary_gradients(grads, trainable, canary, clip)
  # Each example's global L2 norm over all tensors, then one scale per example.
  squared = tf.add_n([tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
                      for g in grads])
  norms = tf.sqrt(squared)
  scale = tf.minimum(1.0, clip / tf.maximum(norms, 1e-12))
  clipped_sum = [tf.tensordot(scale, g, axes=1) for g in grads]
  return clipped_sum


def per_example_gradients(model, trainable, non_trainable, x, y) -> list:
  """Each example's loss gradient, vectorised (`tf.vectorized_map`, as TF Privacy's
  fast path does): a list like `trainable`, each with a leading example axis."""

  def one_example_gradient(example):
    xi, yi = example
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      output = model.predict_on_batch((trainable, non_trainable), xi[tf.newaxis],
                                      training=True)
      loss = model.loss(output=output, label=yi[tf.newaxis])
    grads = tape.gradient(loss, trainable)
    return [tf.zeros_like(w) if g is None else g for g, w in zip(grads, trainable)]

  return tf.vectorized_map(one_example_gradient, (x, y))


def _with_canary_gradients(grads, trainable, canary, clip: float):
  """`grads` with each canary example's gradient replaced by `clip` on its coordinate."""
  is_canary = canary >= 0
  out, offset = [], 0
  for g, w in zip(grads, trainable):
    size = int(w.shape.num_elements())
    # one_hot of an index outside [0, size) is all zeros: other variables' canaries.
    dirac = tf.one_hot(canary - offset, size, on_value=clip, off_value=0.0, dtype=g.dtype)
    dirac = tf.reshape(dirac, tf.shape(g))
    mask = tf.reshape(is_canary, [-1] + [1] * (len(w.shape)))
    out.append(tf.where(mask, dirac, g))
    offset += size
  return out


def build_dp_sgd_client_work(model: tff.learning.models.FunctionalModel, *, element_type,
                             clip: float, noise_multiplier: float, batch_size: int,
                             local_epochs: int, learning_rate: float,
                             seed: Optional[int] = None, sampling_rate: Optional[float] = None,
                             steps: Optional[int] = None, weight_by_size: bool = False
                             ) -> tff.learning.templates.ClientWorkProcess:
  """A `ClientWorkProcess` that trains with DP-SGD and returns the model delta.

  Args:
    model: The functional model to train.
    element_type: The type of the one element of each client's dataset
      (`OrderedDict(x=(n, ...), y=(n, ...), client=int64)`).
    clip: Per-example L2 clip norm C.
    noise_multiplier: z; the noise added to each step's sum has stddev z C.
    batch_size: The expected batch B (sampling rate B / n_k, denominator B).
    local_epochs: E; steps per round are ceil(E n_k / B).
    learning_rate: Local SGD learning rate.
    seed: None for private, non-deterministic randomness; an int for a
      reproducible (not private) debugging run.
    sampling_rate, steps: One Poisson rate q and step count for every client
      (`--local_batching=fixed_rate`; the expected batch, and so the
      denominator, is q n_k); None: rate B / n_k and ceil(E n_k / B) steps.
    weight_by_size: The update's weight is n_k (for a weighted mean), else 1.

  Measurements: none. A client releases only its noised model delta.
  """
  if not (0 < clip < float("inf")) or not (0 <= noise_multiplier < float("inf")):
    raise UsageError(f"clip={clip!r} must be > 0 and noise_multiplier={noise_multiplier!r} "
                     ">= 0, both finite")
  if batch_size < 1 or local_epochs < 1:
    raise UsageError("batch_size and local_epochs must be at least 1")
  stddev = float(noise_multiplier) * float(clip)
  clip, batch, epochs, lr = float(clip), int(batch_size), int(local_epochs), float(learning_rate)
  seeded = seed is not None
  weights_type = tff.learning.models.ModelWeights(
      tuple(tff.TensorType(w.dtype, w.shape) for w in model.initial_weights[0]),
      tuple(tff.TensorType(w.dtype, w.shape) for w in model.initial_weights[1]))
  data_type = tff.SequenceType(tf.nest.map_structure(
      lambda spec: tff.TensorType(spec.dtype.as_numpy_dtype, spec.shape), element_type))

  def train(weights, dataset, base_seed):
    element = dataset.get_single_element()
    x_all, y_all, client = element["x"], element["y"], element["client"]
    canary_all = element.get("canary")
    n = tf.shape(x_all, out_type=tf.int64)[0]
    if sampling_rate is None:
      num_steps = (epochs * n + batch - 1) // batch
      rate = tf.cast(batch, tf.float64) / tf.cast(n, tf.float64)
    else:
      num_steps = tf.constant(int(steps), tf.int64)
      rate = tf.constant(float(sampling_rate), tf.float64)
    # The expected batch: a fixed denominator, whatever a step samples.
    denominator = tf.cast(rate * tf.cast(n, tf.float64), tf.float32)
    client_seed = tf.random.experimental.stateless_fold_in(base_seed, client)
    initial = [tf.identity(w) for w in weights.trainable]
    non_trainable = list(weights.non_trainable)

    def step(t, trainable):
      sample_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(client_seed, t), num=2))
      chosen = tf.random.stateless_uniform([n], sample_seed, dtype=tf.float64) < rate
      positions = tf.where(chosen)[:, 0]
      xb, yb = tf.gather(x_all, positions), tf.gather(y_all, positions)
      canary_b = None if canary_all is None else tf.gather(canary_all, positions)
      summed = tf.cond(
          tf.size(positions) > 0,
          lambda: _per_example_clipped_sum(model, trainable, non_trainable, xb, yb, clip,
                                           canary_b),
          lambda: [tf.zeros_like(w) for w in trainable])
      noise_seeds = tf.random.experimental.stateless_split(noise_seed, num=len(trainable))
      noised = [s + tf.random.stateless_normal(tf.shape(s), noise_seeds[i], stddev=stddev,
                                               dtype=s.dtype)
                for i, s in enumerate(summed)]
      return t + 1, [w - lr * g / denominator for w, g in zip(trainable, noised)]

    _, trained = tf.while_loop(lambda t, _: t < num_steps, step,
                               (tf.constant(0, tf.int64), initial))
    delta = [a - b for a, b in zip(initial, trained)]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
    # TFF's convention: a non-finite update is zeroed and carries no weight.
    delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]
    weight = tf.cast(n, tf.float32) if weight_by_size else tf.constant(1.0)
    return tff.learning.templates.ClientResult(
        update=tuple(delta), update_weight=tf.cast(finite, tf.float32) * weight)

  if seeded:

    @tff.tensorflow.computation
    def init_state():
      return collections.OrderedDict(seed=tf.constant(int(seed), tf.int64),
                                     round_num=tf.constant(0, tf.int64))

    state_type = init_state.type_signature.result

    @tff.tensorflow.computation(state_type, weights_type, data_type)
    def client_update(state, weights, dataset):
      return train(weights, dataset, tf.stack([state["seed"], state["round_num"]]))

    @tff.tensorflow.computation(state_type)
    def advance(state):
      return collections.OrderedDict(seed=state["seed"], round_num=state["round_num"] + 1)

  else:

    @tff.tensorflow.computation
    def init_state():
      return ()

    state_type = init_state.type_signature.result

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update(weights, dataset):
      # From the OS, so a TF global seed set by the trainer cannot repeat it.
      return train(weights, dataset, tf.raw_ops.NonDeterministicInts(shape=[2],
                                                                     dtype=tf.int64))

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(init_state, tff.SERVER)

  @tff.federated_computation(tff.FederatedType(state_type, tff.SERVER),
                             tff.FederatedType(weights_type, tff.CLIENTS),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def next_fn(state, weights, client_data):
    if seeded:
      results = tff.federated_map(client_update, (tff.federated_broadcast(state), weights,
                                                  client_data))
      new_state = tff.federated_map(advance, state)
    else:
      results = tff.federated_map(client_update, (weights, client_data))
      new_state = state
    # Nothing but the noised delta leaves a client: no train metrics.
    measurements = tff.federated_value(collections.OrderedDict(train=()), tff.SERVER)
    return tff.templates.MeasuredProcessOutput(new_state, results, measurements)

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


__all__ = ("build_dp_sgd_client_work", "per_example_gradients")
