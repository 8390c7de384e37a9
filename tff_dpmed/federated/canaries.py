"""Canary clients inside the TFF learning process (the canary audit, issue 15).

A canary is a client with no data whose update is a fixed random direction:
canary j moves the model by `norm * direction(j)`, a unit vector in the space of the
model's trainable weights drawn from a stateless Gaussian seeded by
(seed, j), whenever it is sampled. It passes through exactly what a real
update passes through (`safe_updates.bounded`, the mechanism's clipping and
noise, on the clients for local DP), so the final model holds it as it holds
a real client.

How canaries get into a TFF 0.87 computation. A federated value cannot gain
clients inside a computation, so canaries are clients from the start: extra
client ids `first_id + j` (after every real id) in the list the program
passes to `next`. Their datasets are the real client data's pipeline cut to
zero elements (`take(0)`), so local training on them trains on nothing and
every train metric (loss, accuracy, example count) gets nothing from them;
beside it each client gets a one-element marker sequence (its canary index,
-1 for a real client). A wrapper client work runs TFF's own FedAvg client
work on the data and then, per client, replaces the update of a client whose
marker is >= 0 by its canary update. (Swapping inside the aggregator is not
possible: it sees updates, not client ids.) Client data must be a structure
of sequences in TFF's templates, hence the marker is a sequence too.

The privacy accounting is unchanged by the canaries (see README "Reading the
canary audit"): the real clients are sampled exactly as before and the
ledger sees only them; each canary's participation and update are
independent of the data, so what they add is post-processing of the
accounted releases.
"""

import collections
import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


@dataclasses.dataclass(frozen=True)
class CanaryPlan:
  """Which client ids are canaries, and what they send.

  Attributes:
    num_canaries: k; canary j (0 <= j < k) is client id `first_id + j`.
      Directions k, k+1, ... are never inserted (the audit's unseen ones).
    first_id: the first canary id, the number of real clients.
    norm: L2 norm of each canary update (before the aggregator clips it).
    seed: seeds the directions (public: canaries protect nobody).
  """
  num_canaries: int
  first_id: int
  norm: float
  seed: int


def unit_direction(seed: int, index, size: int, dtype=tf.float32) -> tf.Tensor:
  """Direction `index`: a flat unit vector of `size` entries, the same in graphs and eagerly.

  Stateless, so the client computation and the auditor (eagerly, after
  training) draw bit-identical directions from (seed, index) alone.
  """
  stateless_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
  draw = tf.random.stateless_normal([size], seed=stateless_seed, dtype=dtype)
  return draw / tf.norm(draw)


def directions(plan: CanaryPlan, indices, size: int) -> np.ndarray:
  """The flat unit directions `indices` (rows), as the canaries send them, for the audit."""
  return np.stack([unit_direction(plan.seed, j, size).numpy() for j in indices])


def _canary_update(plan: CanaryPlan, index, like: list) -> list:
  """`-plan.norm * direction(index)`, shaped as the tensors `like` (the trainable weights).

  Negated because a FedAvg client update is initial - trained weights, which
  the server optimizer subtracts: so the canary moves the model along
  +direction, and the audit's cosines with (final - initial) are positive.
  """
  sizes = [int(np.prod(t.shape)) for t in like]
  flat = -plan.norm * unit_direction(plan.seed, index, sum(sizes), like[0].dtype)
  return [tf.reshape(part, t.shape) for part, t in zip(tf.split(flat, sizes), like)]


def with_canaries(client_work: tff.learning.templates.ClientWorkProcess,
                  plan: CanaryPlan) -> tff.learning.templates.ClientWorkProcess:
  """`client_work` for client data `OrderedDict(data=..., canary=<int64>*)`: canaries
  send their canary update instead of what `client_work` computed from their (empty) data."""
  state_type, weights_type, data_type = client_work.next.type_signature.parameter
  result_type = client_work.next.type_signature.result.result.member
  marker_type = tff.SequenceType(np.int64)
  client_data_type = tff.FederatedType(
      collections.OrderedDict(data=data_type.member, canary=marker_type), tff.CLIENTS)

  @tff.tensorflow.computation(client_data_type.member)
  def data_of(client_data):
    return client_data["data"]

  @tff.tensorflow.computation(result_type, marker_type)
  def canary_or_trained(result, marker):
    index = marker.reduce(tf.constant(-1, tf.int64), tf.maximum)
    trained = tf.nest.flatten(result.update)
    update = tf.cond(index >= 0, lambda: _canary_update(plan, index, trained),
                     lambda: trained)
    # Unweighted aggregation ignores the weight; a canary counts as one client.
    weight = tf.where(index >= 0, tf.ones_like(result.update_weight), result.update_weight)
    return tff.learning.templates.ClientResult(
        update=tf.nest.pack_sequence_as(result.update, update), update_weight=weight)

  @tff.tensorflow.computation(client_data_type.member)
  def marker_of(client_data):
    return client_data["canary"]

  @tff.federated_computation(state_type, weights_type, client_data_type)
  def next_fn(state, weights, client_data):
    output = client_work.next(state, weights, tff.federated_map(data_of, client_data))
    markers = tff.federated_map(marker_of, client_data)
    result = tff.federated_map(canary_or_trained, (output.result, markers))
    return tff.templates.MeasuredProcessOutput(
        state=output.state, result=result, measurements=output.measurements)

  return tff.learning.templates.ClientWorkProcess(client_work.initialize, next_fn)


def compose_client_data(client_data: tff.simulation.datasets.ClientData, plan: CanaryPlan,
                        process: tff.learning.templates.LearningProcess
                        ) -> tff.learning.templates.LearningProcess:
  """`process` (built `with_canaries`) taking client ids: real ids "0".."N-1" read
  `client_data`; canary ids `plan.first_id + j` get no data and marker j.

  TFF's `compose_dataset_computation_with_learning_process`, for a client
  data that is a structure of sequences (which TFF's requires to be one).
  """
  dataset_fn = client_data.serializable_dataset_fn
  first_id = plan.first_id

  @tff.tensorflow.computation(np.str_)
  def data_for_client(client_id):
    number = tf.strings.to_number(client_id, out_type=tf.int64)
    is_canary = number >= first_id
    # A canary reads real client 0's pipeline cut to nothing: same element type, no data.
    source = dataset_fn(tf.where(is_canary, tf.constant("0"), client_id))
    data = source.take(tf.where(is_canary, tf.constant(0, tf.int64), -1))
    marker = tf.data.Dataset.from_tensors(
        tf.where(is_canary, number - first_id, tf.constant(-1, tf.int64)))
    return collections.OrderedDict(data=data, canary=marker)

  state_type = process.next.type_signature.parameter[0]

  @tff.federated_computation(state_type, tff.FederatedType(np.str_, tff.CLIENTS))
  def next_fn(state, client_ids):
    return process.next(state, tff.federated_map(data_for_client, client_ids))

  return tff.learning.templates.LearningProcess(
      initialize_fn=process.initialize, next_fn=next_fn,
      get_model_weights=process.get_model_weights,
      set_model_weights=process.set_model_weights,
      get_hparams_fn=process.get_hparams, set_hparams_fn=process.set_hparams)
