"""The model-update aggregator for a `DPConfig`: one entry point for the trainer."""

from typing import Any, Optional

import tensorflow_federated as tff

from tff_dpmed.privacy import central_dp
from tff_dpmed.privacy import local_dp
from tff_dpmed.privacy.dp_config import DPConfig


def build_model_aggregator(
    cfg: DPConfig,
) -> tuple[Optional[tff.aggregators.UnweightedAggregationFactory], dict[str, Any]]:
  """Validates `cfg` and builds the aggregation factory for its DP placement.

  Args:
    cfg: The DP settings.

  Returns:
    (factory, choices). For mode 'none', (None, {}): the caller keeps TFF's
    default (weighted) aggregator. Otherwise an unweighted factory, central
    (server clips and noises) or local (clients clip and noise), and a flat
    dict of the derived noise parameters for logging.

  Raises:
    UsageError: If `cfg` is invalid.
  """
  cfg.validate()
  if cfg.mode == "none":
    return None, {}
  if cfg.mode == "central":
    return central_dp.build_central_dp_factory(cfg)
  if cfg.mode == "local":
    return local_dp.build_local_dp_factory(cfg)
  # validate() admits only the modes above.
  raise AssertionError(f"unhandled DP mode {cfg.mode!r}")
