"""The canary audit's estimator on simulated Gaussian mechanisms (no TFF, milliseconds).

The simulation is the mechanism the audit reads the model as: the final delta
is the sum of the inserted canaries' unit directions times C plus
N(0, sigma^2 I) in high dimension, so the estimate must recover the epsilon
of G(sigma / C) at delta, within the interval it states.
"""

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import canary_estimate

DIM = 20_000
DELTA = 1e-5


def _balle_wang_epsilon(mu: float, delta: float) -> float:
  """The Gaussian mechanism's exact epsilon (Balle & Wang 2018, Thm 8), by root finding."""
  # e^eps * Phi(.) in log space: e^eps alone overflows for large mu.
  gap = lambda eps: (stats.norm.cdf(-eps / mu + mu / 2)
                     - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)) - delta)
  return optimize.brentq(gap, 0, mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1)


def _unit_rows(rng, n, dim=DIM):
  rows = rng.standard_normal((n, dim)).astype(np.float32)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _simulated_audit(noise_multiplier, clip=0.5, canaries=300, unseen=300, seed=0):
  """One release of the Gaussian mechanism with every canary inserted once."""
  rng = np.random.default_rng(seed)
  inserted, fresh = _unit_rows(rng, canaries), _unit_rows(rng, unseen)
  final_delta = clip * inserted.sum(axis=0, dtype=np.float64)
  final_delta += rng.normal(0, noise_multiplier * clip, DIM)
  return (canary_estimate.cosines(inserted, final_delta),
          canary_estimate.cosines(fresh, final_delta))


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.5, 40.0])
def test_gaussian_epsilon_is_the_exact_gaussian_curve(mu):
  assert canary_estimate.gaussian_epsilon(mu, DELTA) == pytest.approx(
      _balle_wang_epsilon(mu, DELTA), rel=1e-6)


def test_gaussian_epsilon_edges():
  assert canary_estimate.gaussian_epsilon(0.0, DELTA) == 0.0
  assert canary_estimate.gaussian_epsilon(-1.0, DELTA) == 0.0
  assert canary_estimate.gaussian_epsilon(math.inf, DELTA) == math.inf
  # Increasing in mu, as the interval's mapping needs; finite where floats overflow.
  values = [canary_estimate.gaussian_epsilon(m, DELTA) for m in (0.5, 1, 2, 8, 200)]
  assert values == sorted(values) and math.isfinite(values[-1])


def _estimate(inside, outside, null, theoretical_epsilon):
  """`estimate` with the sampled null (`outside`) or the exact one (dimension DIM)."""
  if null == "sampled":
    return canary_estimate.estimate(inside, outside, DELTA, theoretical_epsilon)
  return canary_estimate.estimate(inside, None, DELTA, theoretical_epsilon, dimension=DIM)


@pytest.mark.parametrize("null", ["sampled", "exact"])
@pytest.mark.parametrize("noise_multiplier", [0.7, 1.0, 2.0])
def test_estimate_recovers_the_gaussian_mechanisms_epsilon(noise_multiplier, null):
  inside, outside = _simulated_audit(noise_multiplier)
  theory = _balle_wang_epsilon(1 / noise_multiplier, DELTA)
  result = _estimate(inside, outside, null, theory)
  low, high = result["epsilon_ci"]
  assert low <= theory <= high, result
  assert result["epsilon_estimate"] == pytest.approx(theory, rel=0.25)
  assert result["separation"] == pytest.approx(1 / noise_multiplier, rel=0.2)
  assert not result["violation"] and result["verdict"].startswith("no violation found")
  assert result["num_canaries"] == 300
  assert result["num_unseen_directions"] == (300 if null == "sampled" else 0)
  assert result["null"].startswith(null)
  assert "not a proof" in result["note"]


def test_the_exact_null_is_what_unseen_directions_show():
  # Cosines of never-inserted directions with a trained-like delta (a few
  # strong directions plus noise): mean 0 and stddev 1/sqrt(d), as the exact
  # null says; 2,000 draws pin the stddev to about 3%.
  rng = np.random.default_rng(7)
  final_delta = 5 * _unit_rows(rng, 3).sum(axis=0) + rng.normal(0, 0.01, DIM)
  unseen = canary_estimate.cosines(_unit_rows(rng, 2000), final_delta)
  assert abs(np.mean(unseen)) < 4 * DIM ** -0.5 / math.sqrt(2000)
  assert np.std(unseen, ddof=1) == pytest.approx(DIM ** -0.5, rel=0.06)


def test_a_null_is_given_once():
  with pytest.raises(ValueError, match="not both"):
    canary_estimate.estimate([0.1] * 6, [0.0] * 6, DELTA, 1.0, dimension=DIM)
  with pytest.raises(ValueError, match="not both"):
    canary_estimate.estimate([0.1] * 6, None, DELTA, 1.0)


@pytest.mark.parametrize("null", ["sampled", "exact"])
def test_missing_noise_is_a_violation(null):
  # The accounting claims G(1) but the mechanism added 1/20 of that noise.
  inside, outside = _simulated_audit(noise_multiplier=0.05)
  claimed = _balle_wang_epsilon(1.0, DELTA)
  result = _estimate(inside, outside, null, claimed)
  assert result["violation"] and result["epsilon_ci"][0] > claimed
  assert result["verdict"].startswith("VIOLATION")
  assert "VIOLATION" in canary_estimate.format_result(result)


def test_no_insertions_estimate_zero_and_no_bound_is_a_reference_point():
  rng = np.random.default_rng(1)
  final_delta = rng.normal(0, 1, DIM)
  inside = canary_estimate.cosines(_unit_rows(rng, 200), final_delta)
  outside = canary_estimate.cosines(_unit_rows(rng, 200), final_delta)
  result = canary_estimate.estimate(inside, outside, DELTA, theoretical_epsilon=None)
  assert result["epsilon_ci"][0] == 0.0 and result["epsilon_estimate"] < 1.0
  assert result["theoretical_epsilon"] is None and not result["violation"]
  line = canary_estimate.format_result(result)
  assert "inf (no DP)" in line and "200 canaries" in line and "200 unseen" in line
  exact = canary_estimate.estimate(inside, None, DELTA, None, dimension=DIM)
  assert exact["epsilon_ci"][0] == 0.0 and exact["epsilon_estimate"] < 1.0
  assert "exact null" in canary_estimate.format_result(exact)


def test_too_few_canaries_is_a_usage_error():
  with pytest.raises(UsageError, match="--num_canaries"):
    canary_estimate.estimate([0.1] * 3, [0.0, 0.1, -0.1, 0.2, -0.2], DELTA, 1.0)
