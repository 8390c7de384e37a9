"""DP-FTRL (`--dp_mode=central_tree`): its accounting against TF Privacy's tree
accountant, its validation, and the TFF aggregator's noise and clipping."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats
import tensorflow_federated as tff
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy import safe_updates
from tff_dpmed.privacy.spec import DPSpec

ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [128, 256]


def _spec(z=3.0, n=10, **kwargs) -> DPSpec:
  kwargs.setdefault("clip_mode", "fixed")
  return DPSpec(mode="central_tree", noise_multiplier=z, num_clients=n, clients_per_round=n,
                sampling="all", **kwargs)


@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 8, 13, 40, 64, 100])
def test_tree_sensitivity_is_tf_privacys_worst_case(rounds):
  # A client in every round: at most `rounds` participations, none apart (min_separation 0).
  rdp = tree_aggregation_accountant.compute_rdp_single_tree(1.0, rounds, rounds, 0, 2.0)
  assert mechanisms.tree_sensitivity_square_sum(rounds) == pytest.approx(rdp)  # 2 S / (2 * 1)


@pytest.mark.parametrize("z,rounds", [(3.0, 10), (20.0, 60), (50.0, 200)])
def test_epsilon_is_tf_privacys_tree_accounting(z, rounds):
  spec = _spec(z, accountant="rdp")
  rdp = tree_aggregation_accountant.compute_rdp_single_tree(z, rounds, rounds, 0, ORDERS)
  theirs, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, spec.delta)
  assert accounting.epsilon_for_rounds(spec, rounds) == pytest.approx(theirs, rel=1e-3)
  # PLD (the default) is the tight curve of the same single Gaussian: never above RDP.
  assert accounting.epsilon_for_rounds(_spec(z), rounds) <= theirs


def test_epsilon_grows_with_rounds_and_is_worse_than_independent_gaussians():
  spec, gaussian = _spec(5.0), DPSpec(mode="central", noise_multiplier=5.0, num_clients=10,
                                      clients_per_round=10, sampling="all", clip_mode="fixed")
  eps = [accounting.epsilon_for_rounds(spec, t) for t in (1, 2, 10, 40)]
  assert eps == sorted(eps) and eps[0] > 0
  # One round is one Gaussian either way; after that a client's share of the
  # tree's nodes grows like 2 T^2, against T for independent rounds.
  assert eps[0] == pytest.approx(accounting.epsilon_for_rounds(gaussian, 1), rel=1e-6)
  assert eps[3] > accounting.epsilon_for_rounds(gaussian, 40)


def test_the_budget_ledger_composes_a_tree_run_as_its_tree(tmp_path):
  from tff_dpmed.privacy.budget import BudgetLedger  # pylint: disable=g-import-not-at-top
  spec = _spec(20.0, accountant="rdp")
  ledger = BudgetLedger(str(tmp_path / "budget.json"))
  ledger.record("run", spec, 40, str(tmp_path))
  # Not 40 independent G(20): the 40 rounds are one G(20 / sqrt(S(40))).
  assert ledger.total(spec.delta).epsilon == pytest.approx(
      accounting.epsilon_for_rounds(spec, 40), rel=1e-6)
  independent = DPSpec(mode="central", noise_multiplier=20.0, num_clients=10,
                       clients_per_round=10, sampling="all", clip_mode="fixed", accountant="rdp")
  assert ledger.total(spec.delta).epsilon > 2 * accounting.epsilon_for_rounds(independent, 40)


def test_calibration_meets_the_target():
  z = calibration.calibrate_noise_multiplier(_spec(None), 40, 8.0)
  eps = accounting.epsilon_for_rounds(_spec(z), 40)
  assert (1 - calibration.TOLERANCE) * 8.0 <= eps <= 8.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampling="poisson", clients_per_round=5), "--sampling=all"),
    (dict(clip_mode="adaptive"), "--clip_mode=fixed"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
  base = dict(mode="central_tree", noise_multiplier=1.0, num_clients=10, clients_per_round=10,
              sampling="all", clip_mode="fixed")
  with pytest.raises(UsageError, match=message):
    DPSpec(**{**base, **kwargs})


# --- The TFF aggregator (what training aggregates with).

DIM, N, Z, CLIP = 20_000, 4, 1.1, 0.5
ALPHA = 1e-6


def _process(z):
  mechanism = mechanisms.for_spec(_spec(z, n=N, clip=CLIP))
  return safe_updates.bounded(mechanism.aggregator()).create(
      tff.TensorType(np.float32, [DIM]))


@pytest.fixture(scope="module")
def noisy():
  return _process(Z)


def _rms_interval(sigma):
  lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], DIM)
  return sigma * math.sqrt(lo / DIM), sigma * math.sqrt(hi / DIM)


def test_prefix_sums_carry_the_trees_noise(tff_runtime, noisy):
  del tff_runtime
  zeros = [np.zeros(DIM, np.float32)] * N
  state = noisy.initialize()
  first = noisy.next(state, zeros)
  second = noisy.next(first.state, zeros)
  sigma = Z * CLIP / N  # Per tree node, of the mean over N clients.
  prefix_1 = np.asarray(first.result, np.float64)  # One leaf.
  prefix_2 = prefix_1 + np.asarray(second.result, np.float64)
  lo, hi = _rms_interval(sigma)
  assert lo <= math.sqrt(np.mean(prefix_1**2)) <= hi
  # Round 2 completes the node over both leaves; the efficient estimator
  # combines it (variance s^2) with its two leaves (2 s^2): 2 s^2 / 3.
  lo, hi = _rms_interval(sigma * math.sqrt(2 / 3))
  assert lo <= math.sqrt(np.mean(prefix_2**2)) <= hi
  # Not seeded: a fresh state draws other noise.
  again = np.asarray(noisy.next(noisy.initialize(), zeros).result)
  assert not np.allclose(again, prefix_1)


def test_each_update_is_clipped(tff_runtime):
  del tff_runtime
  clean = _process(0.0)
  rng = np.random.default_rng(0)
  huge = [(1e3 * v / np.linalg.norm(v)).astype(np.float32) for v in rng.normal(size=(N, DIM))]
  result = np.asarray(clean.next(clean.initialize(), huge).result)
  expected = np.mean([h * (CLIP / np.linalg.norm(h)) for h in huge], axis=0)
  np.testing.assert_allclose(result, expected, atol=1e-6)
