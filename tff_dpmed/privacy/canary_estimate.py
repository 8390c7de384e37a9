"""The empirical epsilon of a canary audit (Andrew et al., ICLR 2024), from cosines alone.

One-shot empirical privacy estimation ("One-shot Empirical Privacy
Estimation for Federated Learning", Andrew, Kairouz, Oh, Oprea, McMahan,
Suriyakumar): k canary clients, each sending a fixed random unit direction
(times the clip norm) whenever it is sampled, take part in training. After
training, an auditor who sees only the final model delta computes

    cos(canary_i, final delta)   for every inserted canary, and
    cos(u_j, final delta)        for fresh random directions u_j never inserted.

In high dimension a direction that was never inserted is nearly orthogonal to
everything, so its cosine is ~N(0, 1/d) whatever the model learnt; an
inserted canary's cosine is shifted up by what its insertions left in the
model. The two samples are fitted by Gaussians, and the separation

    mu = (mean_in - mean_out) / std_out

is read as the sensitivity / noise-stddev ratio of a Gaussian mechanism: the
estimate is that mechanism's epsilon at the run's delta,

    epsilon(mu, delta) = min{eps : Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta}

(the exact (epsilon, delta) curve of N(0, 1) vs N(mu, 1), Balle & Wang 2018),
which is computed by `dp_accounting` (`GaussianPrivacyLoss.get_delta_for_epsilon`,
analytic, inverted by its `inverse_monotone_function`). We use the
equal-variance form (shift over the *unseen* stddev), a simplification of the
paper's fit of two Gaussians with their own variances; the canaries' own
stddev is reported beside it.

What it is and is not. It estimates the privacy loss against an adversary
who sees the *final model only* and whose canaries are random directions: it
is usually far below the theoretical epsilon, which bounds an adversary that
sees every round and crafts the worst update. It is not a proof of privacy:
"no violation found" means only that this attack did not beat the bound. An
estimate whose lower confidence bound is *above* the theoretical epsilon
does contradict the accounting: some noise is missing (a violation).

The unseen cosines need not be sampled: a direction drawn uniformly on the
unit sphere of R^d and never inserted is independent of the model delta, so
its cosine with it has mean 0 and variance exactly 1/d whatever the model
learnt ((1 + cos)/2 is Beta((d-1)/2, (d-1)/2)). The program uses this exact
null (`unseen_cosines=None`, `dimension=d`): drawing 1,000 directions of a
420,610-parameter model cost 9 s, a third of a short run. A sampled null
(the paper's form) is still accepted, and the tests check the two agree.

The confidence interval is a bootstrap over the canaries (and the unseen
directions, when sampled), mapped through epsilon(mu), which is increasing in
mu. It covers the sampling error of k canaries, not a misfit of the Gaussian
model.

TF-free, so the estimator is testable on simulated mechanisms in milliseconds.
"""

import math
from typing import Optional, Sequence

from dp_accounting.pld import common as pld_common
from dp_accounting.pld import privacy_loss_mechanism
import numpy as np

from tff_dpmed.errors import UsageError

METHOD = ("canary: one-shot empirical privacy estimation, final model only (Andrew et al., "
          "ICLR 2024)")
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
# Below this many canaries (or unseen directions) a mean and a stddev say nothing.
MIN_SAMPLES = 5
NOT_A_PROOF = ("an estimate against a final-model-only adversary with random canaries, not "
               "a proof: 'no violation found' means only that this test did not beat the "
               "theoretical bound; a violation (the lower confidence bound above the "
               "theoretical epsilon) means the noise the accounting assumes is missing")


def gaussian_epsilon(mu: float, delta: float) -> float:
  """Epsilon at `delta` of the Gaussian mechanism N(0, 1) vs N(mu, 1) (exact, via dp_accounting).

  0 for mu <= 0 (no separation); inf for mu = inf.
  """
  if not 0 < delta < 1:
    raise ValueError(f"delta={delta} is outside (0, 1)")
  if not mu > 0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  loss = privacy_loss_mechanism.GaussianPrivacyLoss(standard_deviation=1.0 / mu, sensitivity=1.0)
  if loss.get_delta_for_epsilon(0.0) <= delta:
    return 0.0
  # The privacy loss is N(mu^2/2, mu^2), so delta(eps) <= P[loss > eps] <= delta here.
  upper = mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1.0
  eps = pld_common.inverse_monotone_function(
      loss.get_delta_for_epsilon, delta,
      pld_common.BinarySearchParameters(0.0, upper, tolerance=1e-9 * max(1.0, upper)))
  return float(upper if eps is None else eps)


def separation(canary_cosines: np.ndarray, unseen_cosines: np.ndarray) -> float:
  """(mean_in - mean_out) / std_out: the Gaussian mechanism's shift over its noise stddev."""
  inside = np.asarray(canary_cosines, np.float64)[None]
  outside = np.asarray(unseen_cosines, np.float64)[None]
  return float(_separations(inside, outside)[0])


def _separations(inside: np.ndarray, outside: np.ndarray) -> np.ndarray:
  """`separation` of each row pair (bootstrap resamples)."""
  std_out = np.std(outside, axis=1, ddof=1)
  shift = np.mean(inside, axis=1) - np.mean(outside, axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(std_out > 0, shift / std_out, np.where(shift > 0, np.inf, 0.0))


def cosines(directions: np.ndarray, model_delta: np.ndarray) -> np.ndarray:
  """cos(direction_i, model_delta) for each row of `directions` (float64)."""
  delta = np.asarray(model_delta, np.float64).reshape(-1)
  directions = np.asarray(directions, np.float64).reshape(len(directions), -1)
  norm = np.linalg.norm(delta)
  if norm == 0:
    return np.zeros(len(directions))
  return directions @ delta / (np.linalg.norm(directions, axis=1) * norm)


def estimate(canary_cosines: Sequence[float], unseen_cosines: Optional[Sequence[float]],
             delta: float, theoretical_epsilon: Optional[float], seed: int = 0,
             confidence: float = CONFIDENCE,
             bootstrap_samples: int = BOOTSTRAP_SAMPLES,
             dimension: Optional[int] = None) -> dict:
  """The empirical epsilon, its confidence interval and the verdict, JSON-ready.

  Args:
    canary_cosines: cos(canary, final delta) of every inserted canary.
    unseen_cosines: the same for random directions never inserted, or None
      for the exact null of such directions in `dimension` dimensions (mean
      0, variance 1/dimension).
    delta: the run's delta (the estimate is the epsilon at this delta).
    theoretical_epsilon: the accountant's epsilon, or None (no DP: no bound).
    seed: seeds the bootstrap.
    confidence: of the two-sided bootstrap interval.
    bootstrap_samples: resamples of the sample(s).
    dimension: the model's number of parameters, with `unseen_cosines=None`.
  """
  inside = np.asarray(canary_cosines, np.float64)
  sampled_null = unseen_cosines is not None
  if sampled_null == (dimension is not None):
    raise ValueError("give either unseen_cosines or dimension (the exact null), not both")
  outside = np.asarray(unseen_cosines if sampled_null else [], np.float64)
  if len(inside) < MIN_SAMPLES or (sampled_null and len(outside) < MIN_SAMPLES):
    raise UsageError(f"a canary audit needs at least {MIN_SAMPLES} canaries and {MIN_SAMPLES} "
                     f"unseen directions (got {len(inside)} and {len(outside)}): raise "
                     "--num_canaries")
  if not (np.all(np.isfinite(inside)) and np.all(np.isfinite(outside))):
    raise ValueError("non-finite cosines: the final model delta is not finite")
  rng = np.random.default_rng(seed)
  # Vectorised bootstrap: row b resamples the sample(s) with replacement.
  boot_in = inside[rng.integers(0, len(inside), (bootstrap_samples, len(inside)))]
  if sampled_null:
    mu = separation(inside, outside)
    boot_out = outside[rng.integers(0, len(outside), (bootstrap_samples, len(outside)))]
    boot = _separations(boot_in, boot_out)
    mean_out, std_out = float(np.mean(outside)), float(np.std(outside, ddof=1))
  else:
    mean_out, std_out = 0.0, 1.0 / math.sqrt(dimension)
    mu = float(np.mean(inside)) / std_out
    boot = np.mean(boot_in, axis=1) / std_out
  tail = (1 - confidence) / 2
  mu_low, mu_high = (float(v) for v in np.quantile(boot, [tail, 1 - tail]))
  eps, eps_low, eps_high = (gaussian_epsilon(m, delta) for m in (mu, mu_low, mu_high))
  bounded = theoretical_epsilon is not None and math.isfinite(theoretical_epsilon)
  violation = bool(bounded and eps_low > theoretical_epsilon)
  if not bounded:
    verdict = "no theoretical bound to check (no DP): the estimate is a reference point"
  elif violation:
    verdict = (f"VIOLATION: even the lower {confidence:.0%} bound {_fmt(eps_low)} exceeds the "
               f"theoretical epsilon {theoretical_epsilon:.3g}; the accounted noise is missing")
  else:
    verdict = "no violation found (not a proof of privacy)"
  return {
      "method": METHOD,
      "epsilon_estimate": _json_float(eps),
      "epsilon_ci": [_json_float(eps_low), _json_float(eps_high)],
      "confidence": confidence,
      "confidence_note": ("bootstrap over the canaries" +
                          (" and unseen directions" if sampled_null else "") +
                          "; covers the sampling error of the canaries, not a misfit of the "
                          "Gaussian model"),
      "theoretical_epsilon": theoretical_epsilon if bounded else None,
      "delta": delta,
      "violation": violation,
      "verdict": verdict,
      "num_canaries": int(len(inside)),
      "null": (f"sampled: {len(outside)} random directions never inserted" if sampled_null
               else f"exact: a random direction never inserted has cosine mean 0 and "
                    f"variance 1/d with the model delta (d = {dimension})"),
      "num_unseen_directions": int(len(outside)),
      "separation": _json_float(mu),
      "separation_ci": [_json_float(mu_low), _json_float(mu_high)],
      "mean_canary_cosine": float(np.mean(inside)),
      "std_canary_cosine": float(np.std(inside, ddof=1)),
      "mean_unseen_cosine": mean_out,
      "std_unseen_cosine": std_out,
      "note": NOT_A_PROOF,
  }


def format_result(result: dict) -> str:
  """One progress line: the estimate, its interval, k, the bound and the verdict."""
  low, high = result["epsilon_ci"]
  theory = result["theoretical_epsilon"]
  bound = "inf (no DP)" if theory is None else f"{theory:.3f}"
  return (f"canary audit: empirical epsilon {_fmt(result['epsilon_estimate'])} "
          f"({result['confidence']:.0%} CI {_fmt(low)}..{_fmt(high)}) vs theoretical "
          f"{bound} at delta {result['delta']:g}; {result['num_canaries']} canaries, "
          f"{_null_words(result)}; {result['verdict']}")


def _null_words(result: dict) -> str:
  unseen = result["num_unseen_directions"]
  return f"{unseen} unseen directions" if unseen else "the exact null of unseen directions"


def _json_float(value: float):
  """Strict JSON has no inf: an unbounded value is the string "inf" (as in the ledger)."""
  return value if math.isfinite(value) else "inf"


def _fmt(value) -> str:
  return value if isinstance(value, str) else f"{value:.3f}"
