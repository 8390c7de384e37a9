"""A plain-TensorFlow DP-FedAvg round: the yardstick tff_dpmed's round time is compared to.

The same work as tff_dpmed's TFF process (central DP, adaptive clipping), in
one process and one `tf.function` per round, without TFF:

  for each sampled client (the library's own client dataset, by id):
    start from the server weights, plain SGD over its local batches
    (client_learning_rate), update = initial - trained (zeroed if non-finite)
    clip the update to global L2 norm <= C; count whether it was unclipped
  server: sum + N(0, (z_v * C)^2) per coordinate, divided by the expected
    cohort size; momentum-SGD server step; C *= exp(-lr_C * (noised unclipped
    fraction - target quantile)), the count noised with stddev s

This is TFF's DifferentiallyPrivateFactory.gaussian_adaptive (TF Privacy's
QuantileAdaptiveClipSumQuery in a NormalizedQuery) and FedAvg with TFF's sgdm
optimizers, written out. z_v and s are what the library's mechanism chose
(`mechanisms.CentralGaussian.noise_choices`), so the noise is the same too.
"""

import collections
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_dpmed import models
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.spec import DPMode, DPSpec


class ReferenceDPFedAvg:
  """Server state in tf.Variables; `round(client_ids)` runs one round in one tf.function."""

  def __init__(self, model_name: str, info, dataset_fn, dp: DPSpec,
               client_learning_rate: float, server_learning_rate: float,
               server_momentum: float, initial_weights: Optional[Sequence[np.ndarray]] = None,
               noise_seed: Optional[int] = None):
    """
    Args:
      model_name, info: the model, built by the library (`models.build_model`).
      dataset_fn: client id (tf.string scalar) -> that client's tf.data.Dataset
        of OrderedDict(x, y) batches, e.g. ClientData.serializable_dataset_fn.
      dp: a central-DP spec (adaptive or fixed clipping), noise multiplier set.
      initial_weights: trainable weights to start from; default: the model's.
      noise_seed: seeds the DP noise (for tests); None draws it non-deterministically.
    """
    if dp.mode is not DPMode.CENTRAL:
      raise ValueError(f"the reference implements central DP only, not {dp.mode.value!r}")
    choices = mechanisms.for_spec(dp).noise_choices()
    self.adaptive = dp.adaptive
    self.value_noise_multiplier = float(choices["value_noise_multiplier"])
    self.clipped_count_stddev = float(choices.get("clipped_count_stddev") or 0.0)
    self.expected_clients = float(dp.clients_per_round)
    self.target_quantile = float(dp.target_unclipped_quantile)
    self.clip_learning_rate = float(dp.adaptive_clip_learning_rate)
    self.client_lr = float(client_learning_rate)
    self.server_lr = float(server_learning_rate)
    self.server_momentum = float(server_momentum)
    # Library code builds the dataset as written; autograph must not rewrite it.
    self._dataset_fn = tf.autograph.experimental.do_not_convert(dataset_fn)

    self.model = models.build_model(model_name, info)  # The client's working copy.
    self.loss_fn = models.loss_for(info)
    start = initial_weights if initial_weights is not None else [
        v.numpy() for v in self.model.trainable_variables]
    self.server_weights = [tf.Variable(w, trainable=False) for w in start]
    self.momentum = [tf.Variable(tf.zeros_like(w), trainable=False) for w in start]
    self.clip = tf.Variable(float(dp.clip), trainable=False)
    self._rng = (tf.random.Generator.from_seed(noise_seed) if noise_seed is not None
                 else tf.random.Generator.from_non_deterministic_state())
    self._round_fn = tf.function(self._round, input_signature=[
        tf.TensorSpec([None], tf.string)])

  def round(self, client_ids: Sequence) -> dict:
    """Runs one round; returns its metrics (NumPy). The first call traces."""
    out = self._round_fn(tf.constant([str(c) for c in client_ids]))
    return {k: v.numpy() for k, v in out.items()}

  def weights(self) -> list:
    return [v.numpy() for v in self.server_weights]

  def _client_update(self, client_id):
    """Local SGD on one client; returns (update, loss_sum, examples)."""
    variables = self.model.trainable_variables
    for v, w in zip(variables, self.server_weights):
      v.assign(w)
    loss_sum = tf.constant(0.0)
    examples = tf.constant(0, tf.int64)
    for batch in self._dataset_fn(client_id):
      with tf.GradientTape() as tape:
        logits = self.model(batch["x"], training=True)
        loss = self.loss_fn(batch["y"], logits)
      grads = tape.gradient(loss, variables)
      for v, g in zip(variables, grads):
        v.assign_sub(self.client_lr * g)
      n = tf.shape(logits, out_type=tf.int64)[0]
      loss_sum += loss * tf.cast(n, tf.float32)
      examples += n
    update = [w - v for w, v in zip(self.server_weights, variables)]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
    update = [tf.where(finite, u, tf.zeros_like(u)) for u in update]
    return update, loss_sum, examples

  def _round(self, client_ids):
    # TFF's worker builds client datasets in a graph with no global seed, so the
    # op-level shuffle seeds alone fix the order; tracing the same way here gives
    # every client the same batches as in tff_dpmed, whatever tf.random.set_seed says.
    tf.compat.v1.get_default_graph().seed = None
    clip = self.clip.read_value()
    total = [tf.zeros_like(w) for w in self.server_weights]
    unclipped = tf.constant(0.0)
    loss_sum = tf.constant(0.0)
    examples = tf.constant(0, tf.int64)
    num_clients = tf.shape(client_ids)[0]
    for i in tf.range(num_clients):
      update, client_loss, client_examples = self._client_update(client_ids[i])
      clipped, norm = tf.clip_by_global_norm(update, clip)
      total = [t + c for t, c in zip(total, clipped)]
      unclipped += tf.cast(norm <= clip, tf.float32)
      loss_sum += client_loss
      examples += client_examples

    # Server: Gaussian sum query, normalised by the expected cohort size.
    stddev = self.value_noise_multiplier * clip
    mean = [(t + self._rng.normal(tf.shape(t), stddev=stddev)) / self.expected_clients
            for t in total]
    for w, m, u in zip(self.server_weights, self.momentum, mean):
      m.assign(self.server_momentum * m + u if self.server_momentum > 0 else u)
      w.assign_sub(self.server_lr * m)
    if self.adaptive:
      # Records are (unclipped - 1/2); their noised mean + 1/2 estimates the fraction.
      noised = (unclipped - 0.5 * tf.cast(num_clients, tf.float32)
                + self._rng.normal([], stddev=self.clipped_count_stddev))
      fraction = tf.clip_by_value(noised / self.expected_clients + 0.5, 0.0, 1.0)
      new_clip = tf.maximum(
          clip * tf.exp(-self.clip_learning_rate * (fraction - self.target_quantile)), 0.0)
      self.clip.assign(new_clip)
    return collections.OrderedDict(
        clip=clip, next_clip=self.clip.read_value(), unclipped=unclipped,
        loss=loss_sum / tf.maximum(tf.cast(examples, tf.float32), 1.0),
        num_examples=examples)


def from_workload(work, noise_seed: Optional[int] = None) -> ReferenceDPFedAvg:
  """The reference for a `benchmarks.workload.Workload`: same model, data, DP and optimisers."""
  cfg = work.run.config
  return ReferenceDPFedAvg(
      cfg.model, work.run.splits.info, work.federated_data.serializable_dataset_fn,
      work.run.mechanism.spec, cfg.client_learning_rate, cfg.server_learning_rate, cfg.server_momentum,
      initial_weights=work.initial_weights, noise_seed=noise_seed)
