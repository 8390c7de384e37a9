"""Central DP's TFF aggregators: the server clips each client update and noises the sum
(Gaussian per round, or tree-aggregated over rounds for DP-FTRL); for packed
one-example clients, clipped inside their packs, it only noises the sum.

A thin layer over `tff.aggregators.DifferentiallyPrivateFactory` (TF Privacy's
Gaussian sum queries, normalised by the expected cohort size, so the
sensitivity does not depend on how many clients actually reported). The
parameters, including a clipped-count noise level that works for the small
cohorts of hospital federations, come from `mechanisms.CentralGaussian`.
"""

import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_federated.python.core.impl.types import type_conversions


def build_factory(mechanism) -> tff.aggregators.UnweightedAggregationFactory:
  """The factory for a `mechanisms.CentralGaussian`: its noised *mean* of clipped updates."""
  spec = mechanism.spec
  z, n, clip = float(spec.noise_multiplier), float(spec.clients_per_round), float(spec.clip)
  if not spec.adaptive:
    return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=z, clients_per_round=n, clip=clip)
  return tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
      noise_multiplier=z, clients_per_round=n, initial_l2_norm_clip=clip,
      target_unclipped_quantile=float(spec.target_unclipped_quantile),
      learning_rate=float(spec.adaptive_clip_learning_rate),
      clipped_count_stddev=float(spec.count_stddev))


class _TreeFactory(tff.aggregators.UnweightedAggregationFactory):
  """TFF's `tree_aggregation` factory, made when the update's type is known.

  TFF's classmethod needs the record specs up front; the process builder only
  knows them when it calls `create`.
  """

  def __init__(self, noise_multiplier: float, clients_per_round: float, clip: float):
    self._args = dict(noise_multiplier=noise_multiplier, clients_per_round=clients_per_round,
                      l2_norm_clip=clip)

  def create(self, value_type):
    specs = type_conversions.type_to_tf_tensor_specs(value_type)
    # noise_seed=None: TF Privacy draws the tree's seeds at random on initialize.
    return tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
        record_specs=specs, noise_seed=None, use_efficient=True, **self._args).create(value_type)


def build_tree_factory(mechanism) -> tff.aggregators.UnweightedAggregationFactory:
  """The factory for a `mechanisms.CentralTreeFTRL`: tree-noised mean of clipped updates."""
  spec = mechanism.spec
  return _TreeFactory(float(spec.noise_multiplier), float(spec.clients_per_round),
                      float(spec.clip))


class PreClippedGaussianSumQuery(tfp.GaussianSumQuery):
  """TF Privacy's Gaussian sum query over records that are sums of units each already
  clipped to `l2_norm_clip` (packed one-example clients: `packed_clients`).

  Each unit (a patient) is in exactly one record, so adding or removing it
  moves the sum by at most `l2_norm_clip`: the query's sensitivity, as for
  `GaussianSumQuery` over one unit per record, and its event is the same
  G(stddev / l2_norm_clip). Only the per-record clipping goes, since a record
  (a pack of units) may exceed `l2_norm_clip` by design.
  """

  def preprocess_record_impl(self, params, record):
    del params
    flat = tf.nest.flatten(record)
    return record, tf.linalg.global_norm(flat)


def build_packed_factory(mechanism) -> tff.aggregators.UnweightedAggregationFactory:
  """The factory for a `mechanisms.CentralGaussian` with fixed clipping whose clients
  arrive packed: the same noise N(0, (zC)^2) on the sum and the same denominator
  (the expected cohort) as `build_factory`'s, over updates clipped per patient
  inside the packs (`packed_clients.build_packed_client_work`)."""
  spec = mechanism.spec
  if spec.adaptive:
    raise ValueError("packed clients need fixed clipping: adaptive clipping counts "
                     "unclipped clients, which a pack hides")
  z, n, clip = float(spec.noise_multiplier), float(spec.clients_per_round), float(spec.clip)
  query = tfp.NormalizedQuery(PreClippedGaussianSumQuery(l2_norm_clip=clip, stddev=z * clip),
                              denominator=n)
  return tff.aggregators.DifferentiallyPrivateFactory(query)
