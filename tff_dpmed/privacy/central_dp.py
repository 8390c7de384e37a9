"""Central DP: the server clips each client update and noises the sum.

A thin layer over `tff.aggregators.DifferentiallyPrivateFactory` (TF Privacy's
Gaussian sum queries, normalised by the expected cohort size). It adds what
TFF leaves to the caller: a clipped-count noise level that works for the small
cohorts typical of hospital federations
(`calibration.choose_clipped_count_stddev`), and a record of the derived noise
parameters so the trainer can log *why* the noise is what it is.
"""

from typing import Any

import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy.dp_config import DPConfig


def build_central_dp_factory(
    cfg: DPConfig) -> tuple[tff.aggregators.UnweightedAggregationFactory, dict[str, Any]]:
  """The central-DP aggregation factory for `cfg`, and the noise parameters chosen.

  The factory's processes output the noised *mean* of the clipped updates,
  with denominator `cfg.expected_clients_per_round` (a constant, so the
  sensitivity does not depend on how many clients actually reported).

  Args:
    cfg: A config with `mode == 'central'`.

  Returns:
    (factory, choices). `choices` is a flat dict of what was derived, for
    logging: noise multipliers, clipped-count stddev and a one-line 'why'.

  Raises:
    UsageError: If `cfg` is invalid or not central.
  """
  cfg.validate()
  if cfg.mode != "central":
    raise UsageError(
        f"build_central_dp_factory needs --dp_mode=central, got {cfg.mode!r}: "
        "use aggregators.build_model_aggregator to dispatch on the mode")
  z = float(cfg.noise_multiplier)
  n = float(cfg.expected_clients_per_round)
  clip = float(cfg.clip)
  choices: dict[str, Any] = {
      "dp_mode": "central",
      "clip_mode": cfg.clip_mode,
      "noise_multiplier": z,
      "clients_per_round": n,
      "noise_seeded": False,  # TFF draws central noise non-deterministically.
  }

  if cfg.clip_mode == "fixed":
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=z, clients_per_round=n, clip=clip)
    choices.update(
        clip=clip,
        value_noise_multiplier=z,
        noise_stddev_of_sum=z * clip,
        noise_stddev_of_mean=z * clip / n,
        why=(f"fixed clip {clip:g}: the server adds N(0, ({z:g} * {clip:g})^2) to each "
             f"coordinate of the sum and divides by {n:g} expected clients"))
    return factory, choices

  if cfg.clipped_count_stddev is None:
    # The trainer's rule too, so logs and accounting agree on the stddev.
    stddev = calibration.choose_clipped_count_stddev(z, n)
    source = "automatic: max(0.05 * clients_per_round, noise_multiplier)"
  else:
    stddev = float(cfg.clipped_count_stddev)
    source = "given in the config"
  # Same split TFF will make inside gaussian_adaptive; computed here to log it.
  value_z, stddev = differential_privacy.adaptive_clip_noise_params(z, n, stddev)
  factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
      noise_multiplier=z,
      clients_per_round=n,
      initial_l2_norm_clip=clip,
      target_unclipped_quantile=float(cfg.target_unclipped_quantile),
      learning_rate=float(cfg.adaptive_clip_learning_rate),
      clipped_count_stddev=stddev)
  inflation = value_z / z if z > 0 else 1.0
  if z > 0:
    why = (f"z = {z:g} is the total effective multiplier; the update noise is "
           f"inflated by {inflation:.4f}x to z_v = {value_z:.4g} to pay for the private "
           f"clipped count (stddev {stddev:g}, {source}), since z^-2 = z_v^-2 + "
           "(2 * stddev)^-2")
  else:
    why = ("z = 0: adaptive clipping without noise, so no privacy guarantee; "
           f"clipped-count stddev {stddev:g}")
  choices.update(
      initial_clip=clip,
      target_unclipped_quantile=float(cfg.target_unclipped_quantile),
      adaptive_clip_learning_rate=float(cfg.adaptive_clip_learning_rate),
      clipped_count_stddev=stddev,
      clipped_count_stddev_source=source,
      value_noise_multiplier=value_z,
      value_noise_inflation=inflation,
      why=why)
  return factory, choices
