"""Central DP's TFF aggregator: the server clips each client update and noises the sum.

A thin layer over `tff.aggregators.DifferentiallyPrivateFactory` (TF Privacy's
Gaussian sum queries, normalised by the expected cohort size, so the
sensitivity does not depend on how many clients actually reported). The
parameters, including a clipped-count noise level that works for the small
cohorts of hospital federations, come from `mechanisms.CentralGaussian`.
"""

import tensorflow_federated as tff


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
