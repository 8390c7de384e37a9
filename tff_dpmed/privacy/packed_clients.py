"""Packed one-example clients: many patients per TFF client, each clipped on its own.

With one image per client (`--partition=per_example`) and one local step,
a client's FedAvg update is its learning rate times its one example's
gradient. TFF spends ~7-11 ms of dataset, iterator and dispatch overhead on
each client (benchmarks/RESULTS_PATIENTS.md) to compute that one gradient.
Here a TFF client is a *pack* of sampled patients: it clips each patient's
update to C and sends the sum, computed from per-patient gradient norms and
one weighted backward pass (`fast_clipping`) where the model allows, else
from materialised per-patient gradients (`example_dp.per_example_gradients`).
The server's aggregator (`central_dp.build_packed_factory`) adds the same
N(0, (zC)^2) to the sum and divides by the same expected cohort as the
unpacked central aggregator.

So the release is the same function of the sampled patients, with the same
noise: the patient is still the unit, sampled as the accountant assumes
(the packs are formed after sampling), and one patient moves the sum by at
most C. Nothing else leaves a pack: no metrics, no counts.
"""

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed.privacy import fast_clipping
from tff_dpmed.privacy.example_dp import per_example_gradients
from tff_dpmed.privacy.safe_updates import safe_clip_rows


def build_packed_client_work(model: tff.learning.models.FunctionalModel, *, element_type,
                             clip: float, learning_rate: float,
                             keras_model: Optional[tf.keras.Model] = None,
                             loss: Optional[tf.keras.losses.Loss] = None
                             ) -> tff.learning.templates.ClientWorkProcess:
  """A `ClientWorkProcess` whose client is a pack of one-example clients.

  Each pack's dataset holds one element, `OrderedDict(x=(m, ...), y=(m, ...))`:
  m patients' examples (`client_data.make_packed_client_data`). Patient i's
  update is what FedAvg's client work makes of one SGD step on its example,
  `learning_rate * grad_i` (initial minus trained weights); the pack returns
  the sum of those updates, each clipped to `clip`.

  With `keras_model` (the model `model` was made from) and its `loss`, and
  `fast_clipping.supports(keras_model)`, the sum is computed without
  materialising the per-patient gradients (`fast_clipping`); otherwise, and
  for patients whose update overflows, from materialised ones.

  Measurements: none.
  """
  if not 0 < clip < float("inf") or not 0 < learning_rate < float("inf"):
    raise ValueError(f"clip={clip!r} and learning_rate={learning_rate!r} must be finite "
                     "and > 0")
  clip, lr = float(clip), float(learning_rate)
  fast = (keras_model is not None and loss is not None
          and fast_clipping.supports(keras_model))
  weights_type = tff.learning.models.ModelWeights(
      tuple(tff.TensorType(w.dtype, w.shape) for w in model.initial_weights[0]),
      tuple(tff.TensorType(w.dtype, w.shape) for w in model.initial_weights[1]))
  data_type = tff.SequenceType(tf.nest.map_structure(
      lambda spec: tff.TensorType(spec.dtype.as_numpy_dtype, spec.shape), element_type))

  @tff.tensorflow.computation(weights_type, data_type)
  def client_update(weights, dataset):
    element = dataset.get_single_element()
    trainable = list(weights.trainable)

    def materialised():
      grads = per_example_gradients(model, trainable, list(weights.non_trainable),
                                    element["x"], element["y"])
      return [tf.reduce_sum(c, axis=0) for c in safe_clip_rows([lr * g for g in grads], clip)]

    if fast:
      update = fast_clipping.clipped_gradient_sum(
          keras_model, loss, trainable, element["x"], element["y"], scale=lr, clip=clip,
          materialised=materialised)
    else:
      update = materialised()
    update = tuple(update)
    return tff.learning.templates.ClientResult(update=update, update_weight=tf.constant(1.0))

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(tff.FederatedType((), tff.SERVER),
                             tff.FederatedType(weights_type, tff.CLIENTS),
                             tff.FederatedType(data_type, tff.CLIENTS))
  def next_fn(state, weights, client_data):
    results = tff.federated_map(client_update, (weights, client_data))
    measurements = tff.federated_value(collections.OrderedDict(train=()), tff.SERVER)
    return tff.templates.MeasuredProcessOutput(state, results, measurements)

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
