"""The one-run example-level audit's lower bound (Steinke et al. 2023), on known mechanisms."""

import math

import numpy as np
import pytest

from tff_dpmed.privacy import one_run_audit


def test_perfect_guesses_give_the_binomial_bound_worked_out_by_hand():
  # 1000 canaries, scores that reveal every bit: the k = 500 guess is 1000 of 1000 right.
  # P[Binomial(1000, q) = 1000] = q^1000 must reach 0.05 / 4 (Bonferroni over 4 sizes):
  # q = 0.0125^(1/1000), epsilon = log(q / (1 - q)).
  q = 0.0125**(1 / 1000)
  expected = math.log(q / (1 - q))
  included = np.random.default_rng(0).permutation(np.arange(1000) < 500)  # 500 in.
  result = one_run_audit.audit(included.astype(float), included, delta=0.0,
                               theoretical_epsilon=1.0)
  assert result["epsilon_lower_bound"] == pytest.approx(expected, rel=1e-6)
  assert (result["guesses"], result["correct_guesses"]) == (1000, 1000)
  assert result["violation"] and result["verdict"].startswith("VIOLATION")


def test_randomized_response_at_a_known_epsilon_is_not_flagged_and_is_seen():
  # Each canary's score is its bit told truthfully with probability e^eps / (1 + e^eps):
  # exactly eps-DP, so the 95% lower bound may exceed eps in at most ~5% of runs.
  eps, m, runs = 2.0, 1000, 40
  rng = np.random.default_rng(1)
  bounds = []
  for _ in range(runs):
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
    said_in = np.where(truthful, included, ~included)
    scores = said_in + 1e-3 * rng.random(m)  # Ties broken at random.
    result = one_run_audit.audit(scores, included, delta=1e-5, theoretical_epsilon=eps)
    bounds.append(result["epsilon_lower_bound"])
    assert result["violation"] == (result["epsilon_lower_bound"] > eps)
  assert sum(b > eps for b in bounds) <= 4
  assert np.mean(bounds) > 0.8  # The audit does see a large part of the leak.


def test_chance_guesses_give_no_bound_and_delta_only_raises_the_p_value():
  rng = np.random.default_rng(2)
  included = rng.random(400) < 0.5
  result = one_run_audit.audit(rng.random(400), included, 1e-5, None)
  assert result["epsilon_lower_bound"] < 0.5 and not result["violation"]
  assert result["theoretical_epsilon"] is None and "reference" in result["verdict"]
  assert one_run_audit.p_value(1000, 100, 90, 1.0, 1e-3) > one_run_audit.p_value(
      1000, 100, 90, 1.0, 0.0)
  assert one_run_audit.epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0


@pytest.mark.parametrize("scores,bits", [([1.0], [True]), ([1.0, 2.0], [True]),
                                         ([1.0, math.nan], [True, False])])
def test_bad_inputs_are_refused(scores, bits):
  with pytest.raises(ValueError):
    one_run_audit.audit(scores, bits, 1e-5, 1.0)
