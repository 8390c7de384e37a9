"""An example-level epsilon lower bound from one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023): m canary
examples are each put in the training data independently with probability
1/2. After training, the auditor scores every canary (here: minus the
released model's loss on the canary's label, so an included canary scores
high), guesses "in" for the k highest scores and "out" for the k lowest, and
abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses
v out of r = 2k is stochastically dominated by Binomial(r, e^eps / (1 + e^eps))
up to a delta term (their Theorem 3.1 and Proposition 5.7):

    p(eps) = P[Binomial(r, q_eps) >= v] + 2 m delta * max_i P[v > Binomial >= v - i] / i

A run whose guesses are so good that p(eps) < 1 - confidence cannot be
eps-DP at that confidence; the lower bound is the largest such eps.

The guess size k is not tuned on the outcome (that would void the
confidence): the bound is computed for every k in `guess_counts`, fixed in
advance, each at confidence 1 - (1 - confidence) / len(guess_counts)
(Bonferroni), and the largest is reported.

A lower bound above the theoretical epsilon contradicts the accounting (a
violation). One below it proves nothing: the audit is weak (one run, random
out-of-distribution canaries, final model only); the paper's own lower
bounds sit far below the theoretical epsilon in this black-box setting.

TF-free: tested on simulated randomized response in milliseconds.
"""

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats

METHOD = ("one run: example-level epsilon lower bound from canary examples each included "
          "with probability 1/2 (Steinke, Nasr, Jagielski, NeurIPS 2023)")
CONFIDENCE = 0.95
# Guesses on each side, as fractions of the canaries; fixed before any score is seen.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
NOT_A_PROOF = ("a lower bound at or below the theoretical epsilon is not a proof of privacy: "
               "it says only that this audit did not find more")
_MAX_EPSILON = 50.0


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
  """P[at least v of r guesses right] for an (epsilon, delta)-DP run with m canaries."""
  if not 0 <= v <= r <= m:
    raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
  q = 1 / (1 + math.exp(-epsilon))  # Accuracy of epsilon-DP randomized response.
  tail = stats.binom.sf(v - 1, r, q)
  # The delta term: the largest average mass just below v (Proposition 5.7).
  below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ...
  alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1))) if v > 0 else 0.0
  return float(min(1.0, tail + 2 * m * delta * alpha))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                        confidence: float = CONFIDENCE) -> float:
  """The largest epsilon that v correct of r guesses rule out at `confidence` (0 if none)."""
  level = 1 - confidence
  if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
    return 0.0
  low, high = 0.0, 1.0  # p_value(low) < level <= p_value(high), once high is found.
  while p_value(m, r, v, high, delta) < level:
    low, high = high, 2 * high
    if high > _MAX_EPSILON:
      return _MAX_EPSILON
  for _ in range(50):
    mid = (low + high) / 2
    if p_value(m, r, v, mid, delta) < level:
      low = mid
    else:
      high = mid
  return low


def audit(scores: Sequence[float], included: Sequence[bool], delta: float,
          theoretical_epsilon: Optional[float], confidence: float = CONFIDENCE,
          guess_fractions: Sequence[float] = GUESS_FRACTIONS) -> dict:
  """The audit's result, JSON-ready.

  Args:
    scores: one per canary; higher means "more likely trained on".
    included: whether each canary was in the training data.
    delta: the run's delta.
    theoretical_epsilon: the run's example-level epsilon, None without a bound.
    confidence: of the lower bound (split over the guess sizes).
    guess_fractions: guess sizes k / m tried, fixed in advance.
  """
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  m = len(scores)
  if m != len(included) or m < 2:
    raise ValueError(f"need one inclusion bit per score and at least 2 canaries, got {m} "
                     f"scores and {len(included)} bits")
  if not np.all(np.isfinite(scores)):
    raise ValueError("canary scores must be finite")
  order = np.argsort(-scores, kind="stable")  # Highest score first.
  per_guess = 1 - (1 - confidence) / len(guess_fractions)
  trials = []
  for fraction in guess_fractions:
    k = max(1, min(m // 2, int(round(fraction * m))))
    correct = int(np.sum(included[order[:k]]) + np.sum(~included[order[m - k:]]))
    trials.append({"guesses": 2 * k, "correct": correct,
                   "epsilon_lower_bound": epsilon_lower_bound(m, 2 * k, correct, delta,
                                                              per_guess)})
  best = max(trials, key=lambda t: t["epsilon_lower_bound"])
  bound = best["epsilon_lower_bound"]
  bounded = theoretical_epsilon is not None and math.isfinite(theoretical_epsilon)
  violation = bounded and bound > theoretical_epsilon
  verdict = ("VIOLATION: the lower bound exceeds the theoretical epsilon (noise is missing or "
             "the accounting is wrong)" if violation else
             "no violation found (not a proof of privacy)" if bounded else
             "reference run without a bound (no DP)")
  return {
      "method": METHOD,
      "epsilon_lower_bound": bound,
      "confidence": confidence,
      "confidence_note": (f"Bonferroni over {len(guess_fractions)} guess sizes fixed in "
                          f"advance, each at {per_guess:.4f}"),
      "theoretical_epsilon": theoretical_epsilon if bounded else None,
      "delta": delta,
      "violation": bool(violation),
      "verdict": verdict,
      "num_canaries": m,
      "num_included": int(included.sum()),
      "guesses": best["guesses"],
      "correct_guesses": best["correct"],
      "trials": trials,
      "note": NOT_A_PROOF,
  }


def format_result(result: dict) -> str:
  """One progress line."""
  theory = result["theoretical_epsilon"]
  bound = "inf (no DP)" if theory is None else f"{theory:.3f}"
  return (f"canary audit (example level): epsilon lower bound "
          f"{result['epsilon_lower_bound']:.3f} at {result['confidence']:.0%} confidence "
          f"({result['correct_guesses']} of {result['guesses']} guesses right, "
          f"{result['num_canaries']} canaries, {result['num_included']} included) vs "
          f"theoretical {bound} at delta {result['delta']:g}; {result['verdict']}")
