"""Wraps a Keras model as a TFF model and builds the DP-FedAvg learning process."""

import collections
import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed import models
from tff_dpmed.data import client_data
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.federated import canaries as canaries_lib
from tff_dpmed.privacy import safe_updates


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  client_learning_rate: float = 0.05
  server_learning_rate: float = 1.0
  server_momentum: float = 0.9


class ExampleCount(tf.keras.metrics.Sum):
  """Examples trained on. TFF drops the metrics of a client whose update was
  non-finite, so a shortfall against the expected count reveals divergence."""

  def update_state(self, y_true, y_pred, sample_weight=None):
    del y_true, sample_weight
    return super().update_state(tf.ones(tf.shape(y_pred)[:1], tf.float32))


def metrics_constructor(info: DatasetInfo) -> collections.OrderedDict:
  """Train metrics: the loss (as a metric, so TFF reports it), accuracy, example count."""
  count = lambda: ExampleCount(name="num_examples")
  if info.multi_label:
    return collections.OrderedDict(
        loss=lambda: tf.keras.metrics.BinaryCrossentropy(from_logits=True, name="loss"),
        accuracy=lambda: tf.keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0),
        num_examples=count)
  return collections.OrderedDict(
      loss=lambda: tf.keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="loss"),
      accuracy=lambda: tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
      num_examples=count)


def make_functional_model(model_name: str, info: DatasetInfo, input_spec,
                          seed: Optional[int] = None,
                          keras_builder: Callable[..., tf.keras.Model] = models.build_model,
                          keras_model: Optional[tf.keras.Model] = None
                          ) -> tff.learning.models.FunctionalModel:
  """The Keras model as TFF pure functions of its weights.

  `keras_builder` builds it (`models.build_model`'s signature): pass
  `models.build_trainable` to train a scatter_* model's head on features.
  Or pass the built `keras_model` (which packed clients also need).

  A functional model is built once, eagerly. A `VariableModel` (from_keras_model)
  would be rebuilt by TFF inside v1 graphs, and Keras then globally swaps its
  layer base classes to v1, breaking every eager Keras model in the process
  (the evaluation and export model). Our models have no non-trainable state
  (no BatchNorm), which functional models require.
  """
  if keras_model is None:
    keras_model = keras_builder(model_name, info, seed=seed)
  return tff.learning.models.functional_model_from_keras(
      keras_model,
      loss_fn=models.loss_for(info),
      input_spec=input_spec,
      metrics_constructor=metrics_constructor(info))


# TFF's iterator loop runs the local steps in a while loop; its default
# (DATASET_REDUCE, which TPUs need) spent ~1.4x the CPU per round here
# (benchmarks/LEVERS.md). Same steps, same order, same result.
CLIENT_LOOP = tff.learning.LoopImplementation.DATASET_ITERATOR


def release_no_client_metrics(metric_finalizers, local_unfinalized_metrics_type=None):
  """A TFF metrics aggregator that releases nothing of the clients' metrics.

  TFF's default sums each client's loss, accuracy and example count in the
  clear, outside any DP mechanism; in DP modes they must not leave a client.
  """
  del metric_finalizers, local_unfinalized_metrics_type

  @tff.federated_computation
  def aggregate(client_metrics):
    del client_metrics
    return tff.federated_value((), tff.SERVER)

  return aggregate


def build_learning_process(model, mechanism, opt: OptimizerConfig,
                           release_client_metrics: bool,
                           loop_implementation: tff.learning.LoopImplementation = CLIENT_LOOP,
                           client_element_type=None,
                           canaries: Optional[canaries_lib.CanaryPlan] = None,
                           packed: bool = False, keras_model: Optional[tf.keras.Model] = None,
                           loss: Optional[tf.keras.losses.Loss] = None):
  """DP-FedAvg: uniform client weighting, as client-level DP needs bounded per-client influence.

  `mechanism` (a `privacy.mechanisms.Mechanism`) supplies the aggregator;
  client updates reach it through `safe_updates.bounded`, so no finite update
  can overflow the clipping. `loop_implementation` is TFF's client loop. A
  mechanism that trains inside the clients (DP-SGD) supplies the client work
  too; it reads datasets of `client_element_type`. With `canaries` (the canary
  audit) the process reads `canaries_lib.with_canaries`' client data: compose
  it with `canaries_lib.compose_client_data`. `packed`: each client is a pack
  of one-example clients (`client_data.make_packed_client_data`), trained and
  clipped one by one inside it (`mechanism.packed_parts`; with the
  `keras_model` `model` was made from and its `loss`, without materialising
  per-client gradients where the model allows).
  """
  server_optimizer = tff.learning.optimizers.build_sgdm(
      learning_rate=opt.server_learning_rate,
      momentum=opt.server_momentum if opt.server_momentum > 0 else None)
  if packed:
    client_work, aggregator = mechanism.packed_parts(
        model, client_element_type, opt.client_learning_rate, keras_model=keras_model,
        loss=loss)
    return _compose_with_client_work(model, client_work, safe_updates.bounded(aggregator),
                                     server_optimizer)
  aggregator = mechanism.aggregator()
  if aggregator is not None:
    aggregator = safe_updates.bounded(aggregator)
  if client_element_type is not None:
    client_work = mechanism.client_work(model, client_element_type, opt.client_learning_rate)
    if client_work is not None:
      if canaries is not None:
        raise ValueError("canaries cannot replace the updates of a mechanism's own client "
                         "work (example-level DP); config validation refuses this")
      if aggregator is None and mechanism.weights_updates_by_size():
        aggregator = tff.aggregators.MeanFactory()  # Weighted by the client's n_k.
      return _compose_with_client_work(model, client_work, aggregator, server_optimizer)
  client_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=opt.client_learning_rate)
  metrics_aggregator = None if release_client_metrics else release_no_client_metrics
  if canaries is not None:
    # What build_unweighted_fed_avg composes, with the canaries' client work around FedAvg's.
    client_work = tff.learning.templates.build_functional_model_delta_client_work(
        model=model, optimizer=client_optimizer,
        client_weighting=tff.learning.ClientWeighting.UNIFORM,
        metrics_aggregator=metrics_aggregator, loop_implementation=loop_implementation)
    return _compose_with_client_work(model, canaries_lib.with_canaries(client_work, canaries),
                                     aggregator, server_optimizer)
  return tff.learning.algorithms.build_unweighted_fed_avg(
      model,
      client_optimizer_fn=client_optimizer,
      server_optimizer_fn=server_optimizer,
      model_aggregator=aggregator,
      metrics_aggregator=metrics_aggregator,
      loop_implementation=loop_implementation)


def _compose_with_client_work(model, client_work, aggregator, server_optimizer):
  """FedAvg's composition (TFF's `build_unweighted_fed_avg`) around another client work."""

  @tff.tensorflow.computation
  def initial_model_weights():
    trainable, non_trainable = model.initial_weights
    return tff.learning.models.ModelWeights(
        tuple(tf.convert_to_tensor(w) for w in trainable),
        tuple(tf.convert_to_tensor(w) for w in non_trainable))

  weights_type = initial_model_weights.type_signature.result
  if not isinstance(aggregator, tff.aggregators.WeightedAggregationFactory):
    aggregator = tff.aggregators.as_weighted_aggregator(
        aggregator or tff.aggregators.UnweightedMeanFactory())
  update_aggregator = aggregator.create(weights_type.trainable, tff.TensorType(np.float32))
  return tff.learning.templates.compose_learning_process(
      initial_model_weights,
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work,
      update_aggregator,
      tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type))


class PackingProcess:
  """A learning process over packed one-example clients, called with the sampled
  clients' ids as the unpacked process is: `next` packs them
  (`client_data.pack_ids`); everything else is the wrapped process's."""

  def __init__(self, process, clients_per_pack: int):
    self._process = process
    self._clients_per_pack = int(clients_per_pack)

  def next(self, state, client_ids):
    return self._process.next(state, client_data.pack_ids(client_ids, self._clients_per_pack))

  def __getattr__(self, name):
    return getattr(self._process, name)
