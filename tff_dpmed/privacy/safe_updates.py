"""Client updates that cannot overflow the clipping.

`tf.clip_by_global_norm` squares the entries: an update with finite entries
around 2e19 has an infinite float32 norm and comes out as NaN, which is then
sent (local DP) or summed (central DP) unclipped. Here the norm is computed
after scaling by the largest entry, so it is finite for every finite update,
and an update with a non-finite entry is replaced by zeros on the client
(what TFF itself does to a non-finite model delta), so no data-dependent
signal about it leaves the client.
"""

import tensorflow as tf
import tensorflow_federated as tff

# A bound far above any clip norm, applied before the DP aggregator clips:
# it changes nothing but updates whose norm would overflow the aggregator's.
MAX_UPDATE_NORM = 1e9


def safe_clip(tensors: list, clip) -> list:
  """`tensors` scaled to global L2 norm <= `clip`; all zeros if any entry is not finite."""
  return [row[0] for row in safe_clip_rows([t[tf.newaxis] for t in tensors], clip)]


def safe_clip_rows(rows: list, clip) -> list:
  """`safe_clip` for many units at once: each unit's slice (leading axis) of `rows`
  scaled to global L2 norm <= `clip`, or zeros if it has a non-finite entry
  (packed one-example clients, `packed_clients`)."""
  flat = [tf.reshape(r, [tf.shape(r)[0], -1]) for r in rows]
  finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(f), axis=1) for f in flat]),
                         axis=0)
  safe = [tf.where(finite[:, tf.newaxis], f, tf.zeros_like(f)) for f in flat]
  max_abs = tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(f), axis=1) for f in safe]), axis=0)
  scale = tf.where(max_abs > 0, max_abs, tf.ones_like(max_abs))
  # ||x|| = scale * ||x / scale||, and ||x / scale||^2 <= number of entries.
  unit_norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(f / scale[:, tf.newaxis]), axis=1)
                                for f in safe]))
  clip = tf.cast(clip, max_abs.dtype)
  # Scaled as (x / scale) * (clip / unit_norm): a factor clip / ||x|| itself can
  # be subnormal for huge entries, which the CPU flushes to zero.
  over = (unit_norm > clip / scale)[:, tf.newaxis]
  shrink = tf.math.divide_no_nan(clip, unit_norm)[:, tf.newaxis]
  clipped = [tf.where(over, (f / scale[:, tf.newaxis]) * shrink, f) for f in safe]
  return [tf.reshape(c, tf.shape(r)) for c, r in zip(clipped, rows)]


class BoundedUpdatesFactory(tff.aggregators.UnweightedAggregationFactory):
  """Bounds each client value with `safe_clip(MAX_UPDATE_NORM)`, then aggregates with `inner`.

  The inner process's state and measurements pass through unchanged, so TFF's
  DP event (`extract_dp_event_from_state`) still reads the inner state.
  """

  def __init__(self, inner: tff.aggregators.UnweightedAggregationFactory,
               max_norm: float = MAX_UPDATE_NORM):
    self._inner = inner
    self._max_norm = float(max_norm)

  def create(self, value_type) -> tff.templates.AggregationProcess:
    inner_process = self._inner.create(value_type)
    max_norm = self._max_norm

    @tff.tensorflow.computation(value_type)
    def bound(value):
      flat = tf.nest.flatten(value)
      return tf.nest.pack_sequence_as(value, safe_clip(flat, max_norm))

    @tff.federated_computation(inner_process.next.type_signature.parameter[0],
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      return inner_process.next(state, tff.federated_map(bound, value))

    return tff.templates.AggregationProcess(inner_process.initialize, next_fn)


def bounded(inner: tff.aggregators.UnweightedAggregationFactory) -> BoundedUpdatesFactory:
  return BoundedUpdatesFactory(inner)
