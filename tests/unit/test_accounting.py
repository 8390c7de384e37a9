"""Tests for tff_dpmed.privacy.accounting against dp_accounting used directly."""

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import events
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy import spec as spec_lib
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.spec import DPSpec

N, M, Z, DELTA = 3383, 120, 1.2, 1e-5
Q = M / N
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def setting(**overrides) -> DPSpec:
  fields = dict(dp_mode="central", noise_multiplier=Z, num_clients=N, clients_per_round=M,
                sampling="poisson", delta=DELTA, accountant="rdp", clip_mode="fixed")
  fields.update(overrides)
  if fields.pop("adaptive_clipping", False):
    fields["clip_mode"] = "adaptive"
  return DPSpec.from_json(fields)


def tff_split(z, cohort):
  """TFF's adaptive split for the trainer's clipped-count rule, written out here."""
  s = max(0.05 * cohort, z)
  return (z**-2 - (2 * s)**-2)**-0.5, s


def rdp_eps(event, rounds, relation=ADD_REMOVE):
  acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  return acc.compose(event, rounds).get_epsilon(DELTA)


def pld_eps(event, rounds, relation=ADD_REMOVE):
  acc = dp_accounting.pld.PLDAccountant(relation)
  return acc.compose(event, rounds).get_epsilon(DELTA)


def test_published_setting():
  # z=1.2, 120 of 3383 clients, 100 rounds, delta=1e-5, Poisson.
  eps = {acc: accounting.epsilon_for_rounds(setting(accountant=acc), 100)
         for acc in ("rdp", "pld", "auto")}
  assert eps["rdp"] == pytest.approx(1.99, abs=0.02)
  assert eps["pld"] == pytest.approx(1.71, abs=0.02)
  assert eps["auto"] == eps["pld"]


G = dp_accounting.GaussianDpEvent
z_v, s_b = tff_split(Z, M)
CASES = {
    # name: (setting overrides, event built by hand, relation, accountant)
    "central-poisson-rdp": (dict(), dp_accounting.PoissonSampledDpEvent(Q, G(Z)), ADD_REMOVE,
                            rdp_eps),
    "central-poisson-pld": (dict(accountant="pld"), dp_accounting.PoissonSampledDpEvent(Q, G(Z)),
                            ADD_REMOVE, pld_eps),
    "central-poisson-adaptive-rdp": (
        dict(adaptive_clipping=True),
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.ComposedDpEvent([G(z_v), G(2 * s_b)])),
        ADD_REMOVE, rdp_eps),
    # PLD cannot take a composition inside a sampled event: the one equivalent Gaussian.
    "central-poisson-adaptive-pld": (dict(adaptive_clipping=True, accountant="pld"),
                                     dp_accounting.PoissonSampledDpEvent(Q, G(Z)), ADD_REMOVE,
                                     pld_eps),
    # Replace-one: the sum of updates clipped to C moves by 2C, so G(z/2).
    "central-fixed-rdp": (dict(sampling="fixed"),
                          dp_accounting.SampledWithoutReplacementDpEvent(N, M, G(Z / 2)),
                          REPLACE_ONE, rdp_eps),
    "central-fixed-adaptive-rdp": (
        dict(sampling="fixed", adaptive_clipping=True),
        dp_accounting.SampledWithoutReplacementDpEvent(
            N, M, dp_accounting.ComposedDpEvent([G(z_v / 2), G(s_b)])),
        REPLACE_ONE, rdp_eps),
    "central-all-rdp": (dict(sampling="all", clients_per_round=N), G(Z), ADD_REMOVE, rdp_eps),
    "central-all-pld": (dict(sampling="all", clients_per_round=N, accountant="pld",
                             noise_multiplier=12.0), G(12.0), ADD_REMOVE, pld_eps),
    "local-rdp": (dict(dp_mode="local", noise_multiplier=10.0), G(5.0), REPLACE_ONE, rdp_eps),
    # z/2/sqrt(20) > 1: dp_accounting's default PLD grid (see the coarse-grid test).
    "local-pld": (dict(dp_mode="local", noise_multiplier=10.0, accountant="pld"), G(5.0),
                  REPLACE_ONE, pld_eps),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_agrees_with_dp_accounting(name):
  overrides, event, relation, eps_fn = CASES[name]
  s = setting(**overrides)
  rounds = 20
  expected = eps_fn(event, rounds, relation)
  assert accounting.epsilon_for_rounds(s, rounds) == pytest.approx(expected, rel=1e-9)
  assert mechanisms.for_spec(s).neighboring_relation is relation


def test_adaptive_split_is_exactly_one_gaussian():
  for z, cohort in [(0.5, 4), (1.2, 120), (3.0, 10), (8.0, 1000)]:
    s = setting(noise_multiplier=z, clients_per_round=cohort, adaptive_clipping=True)
    inner = mechanisms.for_spec(s).release_event()
    assert isinstance(inner, dp_accounting.ComposedDpEvent)
    assert events.effective_noise_multiplier(inner) == pytest.approx(z, rel=1e-12)
    q = cohort / N
    composed = rdp_eps(dp_accounting.PoissonSampledDpEvent(q, inner), 50)
    single = rdp_eps(dp_accounting.PoissonSampledDpEvent(q, G(z)), 50)
    assert composed == pytest.approx(single, rel=1e-9)
  # Without sampling PLD composes the two Gaussians itself: same epsilon.
  inner = mechanisms.for_spec(setting(noise_multiplier=2.0, adaptive_clipping=True)).release_event()
  assert pld_eps(inner, 10) == pytest.approx(pld_eps(G(2.0), 10), rel=1e-3)


def test_float32_multipliers_would_be_under_reported_by_rdp():
  # Why we never compose TFF's event directly: TFF's state holds np.float32
  # multipliers, and dp_accounting 0.4.3's RDP reduction of a composition
  # inside a sampled event then keeps only the first Gaussian.
  tff_like = dp_accounting.ComposedDpEvent([G(np.float32(z_v)), G(np.float32(2 * s_b))])
  floats = dp_accounting.ComposedDpEvent([G(z_v), G(2 * s_b)])
  bad = rdp_eps(dp_accounting.PoissonSampledDpEvent(Q, tff_like), 100)
  good = rdp_eps(dp_accounting.PoissonSampledDpEvent(Q, floats), 100)
  assert bad < good  # The hazard exists...
  ours = accounting.epsilon_for_rounds(setting(adaptive_clipping=True), 100)
  assert ours == pytest.approx(good, rel=1e-9)  # ...and we do not fall into it.
  check_event(setting(adaptive_clipping=True), tff_like)


def test_replace_one_convention_of_dp_accounting_is_pinned():
  # With m = N sampling is the identity: the library then uses the inner
  # multiplier as stddev / sensitivity (no halving of its own), which is why
  # round_event halves it for replace-one.
  wor = rdp_eps(dp_accounting.SampledWithoutReplacementDpEvent(10, 10, G(2.0)), 1, REPLACE_ONE)
  assert wor == pytest.approx(rdp_eps(G(2.0), 1), rel=1e-9)
  fixed = setting(sampling="fixed")
  assert accounting.accounted_event(fixed, "rdp").event.noise_multiplier == pytest.approx(Z / 2)
  assert accounting.epsilon_for_rounds(fixed, 100) > accounting.epsilon_for_rounds(setting(), 100)


def test_local_uses_half_multiplier_and_no_sampling():
  local = setting(dp_mode="local", noise_multiplier=4.0)
  assert accounting.accounted_event(local, "rdp") == G(2.0)
  assert accounting.epsilon_for_rounds(local, 30) == pytest.approx(rdp_eps(G(2.0), 30), rel=1e-9)
  # Local DP gets nothing from sampling: same epsilon for any cohort.
  assert accounting.epsilon_for_rounds(dataclasses.replace(local, clients_per_round=5), 30) == \
      accounting.epsilon_for_rounds(local, 30)


def test_pld_grid_is_coarsened_for_narrow_gaussians_and_stays_an_upper_bound():
  local = setting(dp_mode="local", noise_multiplier=3.0, accountant="pld")
  rounds = 20  # sigma = 1.5 / sqrt(20) ~ 0.34: a finer grid than usual would be needed.
  assert accounting.pld_discretization_interval(1.5 / math.sqrt(rounds)) > 1e-4
  fine = pld_eps(G(1.5), rounds, REPLACE_ONE)
  ours = accounting.epsilon_for_rounds(local, rounds)
  assert fine <= ours <= fine * (1 + 1e-3)
  # Many rounds stay tractable (the default grid would need ~1e8 points here).
  many = accounting.epsilon_for_rounds(dataclasses.replace(local, noise_multiplier=1.0), 10000)
  assert many > accounting.epsilon_for_rounds(dataclasses.replace(local, noise_multiplier=1.0), 100)


@pytest.mark.parametrize("overrides", [
    dict(accountant="rdp"), dict(accountant="pld"), dict(sampling="fixed"),
    dict(dp_mode="local", noise_multiplier=5.0, accountant="pld"),
    dict(dp_mode="local", noise_multiplier=5.0, accountant="rdp"),
])
def test_epsilon_monotone(overrides):
  base = setting(**overrides)
  by_rounds = [accounting.epsilon_for_rounds(base, r) for r in (1, 10, 50, 200)]
  assert all(a < b for a, b in zip(by_rounds, by_rounds[1:])), by_rounds
  by_noise = [accounting.epsilon_for_rounds(dataclasses.replace(base, noise_multiplier=z), 50)
              for z in (0.8 * base.noise_multiplier, base.noise_multiplier,
                        1.5 * base.noise_multiplier, 3 * base.noise_multiplier)]
  assert all(a > b for a, b in zip(by_noise, by_noise[1:])), by_noise


def test_zero_rounds_zero_noise_and_none():
  assert accounting.epsilon_for_rounds(setting(), 0) == 0.0
  assert accounting.epsilon_for_rounds(setting(noise_multiplier=0.0), 1) == math.inf
  assert accounting.epsilon_for_rounds(
      setting(noise_multiplier=0.0, accountant="pld"), 1) == math.inf
  assert accounting.epsilon_for_rounds(
      setting(noise_multiplier=0.0, adaptive_clipping=True), 3) == math.inf
  assert accounting.epsilon_for_rounds(setting(dp_mode="none", noise_multiplier=0.0), 1) == math.inf


def test_default_delta():
  assert spec_lib.default_delta(3383) == 1e-5
  assert spec_lib.default_delta(1) == 1e-5
  assert spec_lib.default_delta(100_000) == pytest.approx(1e-6)
  assert spec_lib.default_delta(100_001) == pytest.approx(1e-7)
  assert spec_lib.default_delta(1_000_000) == pytest.approx(1e-7)
  for n in (1, 7, 10, 999, 1000, 1001, 12345, 10**6, 10**6 + 1):
    assert spec_lib.default_delta(n) < 1 / n
  with pytest.raises(UsageError):
    spec_lib.default_delta(0)


def test_resolve_accountant():
  assert accounting.resolve_accountant(setting(accountant="auto")) == "pld"
  assert accounting.resolve_accountant(setting(accountant="auto", adaptive_clipping=True)) == "pld"
  assert accounting.resolve_accountant(setting(accountant="auto", dp_mode="local")) == "pld"
  assert accounting.resolve_accountant(setting(accountant="auto", sampling="fixed")) == "rdp"
  assert accounting.resolve_accountant(setting(accountant="rdp")) == "rdp"


@pytest.mark.parametrize("overrides, words", [
    (dict(noise_multiplier=-1.0), "negative"),
    (dict(noise_multiplier=float("nan")), "not finite"),
    (dict(noise_multiplier=float("inf")), "not finite"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=float("nan")), "delta"),
    (dict(clients_per_round=0), "clients_per_round"),
    (dict(clients_per_round=N + 1), "clients_per_round"),
    (dict(num_clients=0, clients_per_round=1), "num_clients"),
    (dict(num_clients=10.5), "num_clients"),
    (dict(dp_mode="global"), "dp_mode"),
    (dict(sampling="shuffle"), "sampling"),
    (dict(accountant="gdp"), "accountant"),
    (dict(sampling="fixed", accountant="pld"), "pld"),
    (dict(sampling="all"), "sampling=all"),
    (dict(dp_mode="local", adaptive_clipping=True), "clip_mode=fixed"),
    (dict(adaptive_clipping=True, clipped_count_stddev=0.5), "clipped_count_stddev"),
    (dict(clipped_count_stddev=5.0), "clip_mode=adaptive"),
    (dict(dp_mode="none"), "dp_mode=none"),
])
def test_validate_rejects(overrides, words):
  with pytest.raises(UsageError) as e:
    accounting.check_accountant(setting(**overrides))
  message = str(e.value)
  assert words in message and "\n" not in message


def test_ledger_central_restores_exactly():
  for acc in ("rdp", "pld"):
    ledger = PrivacyLedger(setting(accountant=acc, adaptive_clipping=True))
    rng = np.random.default_rng(0)
    for _ in range(7):
      ledger.record_round(np.flatnonzero(rng.random(N) < Q).tolist())
    eps = ledger.epsilon()
    assert eps == accounting.epsilon_for_rounds(ledger.spec, 7)
    restored = PrivacyLedger.from_json(ledger.to_json())
    assert restored.rounds == 7
    assert restored.epsilon() == eps
    assert restored.epsilon_history == ledger.epsilon_history == [(7, eps)]
    restored.record_round([1, 2, 3])
    assert restored.epsilon() > eps


def test_ledger_local_worst_client():
  local = setting(dp_mode="local", noise_multiplier=6.0, accountant="pld")
  ledger = PrivacyLedger(local)
  for ids in ([0, 1], [0], [0, 2], [1, 2], [3]):
    ledger.record_round(ids)
  assert ledger.rounds == 5
  assert ledger.max_participation == 3  # Client 0.
  expected = dp_accounting.pld.PLDAccountant(
      REPLACE_ONE, value_discretization_interval=accounting.pld_discretization_interval(
          3.0 / math.sqrt(3))).compose(G(3.0), 3).get_epsilon(DELTA)
  eps = ledger.epsilon()
  assert eps == pytest.approx(expected, rel=1e-9)
  assert eps == accounting.epsilon_for_rounds(local, 3)  # Not the 5 rounds run.
  assert eps < accounting.epsilon_for_rounds(local, 5)
  restored = PrivacyLedger.from_json(ledger.to_json())
  assert restored.epsilon() == eps and restored.max_participation == 3
  restored.record_round([2])  # Client 2 now ties client 0.
  assert restored.epsilon() == eps
  restored.record_round([2])
  assert restored.epsilon() == accounting.epsilon_for_rounds(local, 4)


def test_ledger_rejects_cohorts_that_contradict_the_setting():
  with pytest.raises(ValueError, match="more than once"):
    PrivacyLedger(setting()).record_round([1, 1])
  with pytest.raises(ValueError, match="exactly 120"):
    PrivacyLedger(setting(sampling="fixed")).record_round(list(range(119)))
  with pytest.raises(ValueError, match="exactly 3"):
    PrivacyLedger(setting(sampling="all", num_clients=3, clients_per_round=3)
                            ).record_round([0, 1])


def test_ledger_from_corrupt_json_is_a_usage_error():
  for text in ("not json", json.dumps({"format": "other"}), json.dumps({
      "format": "tff_dpmed.privacy_ledger.v1", "setting": {"dp_mode": "central"}})):
    with pytest.raises(UsageError):
      PrivacyLedger.from_json(text)


def test_check_event_matches_rejects_other_events():
  adaptive = setting(adaptive_clipping=True)
  check_event(adaptive, dp_accounting.ComposedDpEvent([G(z_v), G(2 * s_b)]))
  for wrong in (G(Z), dp_accounting.ComposedDpEvent([G(z_v * 0.99), G(2 * s_b)]),
                dp_accounting.ComposedDpEvent([G(z_v)]), dp_accounting.NonPrivateDpEvent()):
    with pytest.raises(RuntimeError, match="not the one the privacy accounting assumes"):
      check_event(adaptive, wrong)
  check_event(setting(), G(np.float32(Z)))
  with pytest.raises(RuntimeError):
    check_event(setting(), G(Z * 1.001))


def test_tff_aggregator_events_match(tff_runtime):
  """One compile: TFF's gaussian_adaptive and gaussian_fixed, one `next` each."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_federated.python.aggregators import differential_privacy

  del tff_runtime
  cohort, z_adaptive, z_fixed = 4, 1.2, 0.7
  sigma_b = spec_lib.choose_clipped_count_stddev(z_adaptive, cohort)  # = z here: small cohort.
  value_type = tff.TensorType(np.float32, [3])
  dpf = tff.aggregators.DifferentiallyPrivateFactory
  adaptive = dpf.gaussian_adaptive(noise_multiplier=z_adaptive, clients_per_round=float(cohort),
                                   clipped_count_stddev=sigma_b).create(value_type)
  fixed = dpf.gaussian_fixed(noise_multiplier=z_fixed, clients_per_round=float(cohort),
                             clip=1.0).create(value_type)

  @tff.federated_computation(tff.FederatedType(value_type, tff.CLIENTS))
  def one_round_each(values):
    return (adaptive.next(adaptive.initialize(), values).state,
            fixed.next(fixed.initialize(), values).state)

  adaptive_state, fixed_state = one_round_each([np.ones(3, np.float32)] * cohort)
  adaptive_event = differential_privacy.extract_dp_event_from_state(adaptive_state)
  fixed_event = differential_privacy.extract_dp_event_from_state(fixed_state)

  ours = setting(noise_multiplier=z_adaptive, clients_per_round=cohort, adaptive_clipping=True)
  assert ours.count_stddev == sigma_b
  check_event(ours, adaptive_event)
  check_event(
      setting(noise_multiplier=z_fixed, clients_per_round=cohort), fixed_event)
  # And what it composes to is z: the accounting of the run is that of G(z).
  assert events.effective_noise_multiplier(adaptive_event) == pytest.approx(
      z_adaptive, rel=1e-5)
  with pytest.raises(RuntimeError):
    check_event(dataclasses.replace(ours, noise_multiplier=1.0), adaptive_event)


def check_event(spec: DPSpec, theirs) -> None:
  mechanisms.for_spec(spec).check_event(theirs)


def test_adaptive_split_is_tffs():
  from tensorflow_federated.python.aggregators import differential_privacy  # pylint: disable=g-import-not-at-top
  for z, cohort in [(0.5, 4), (1.2, 120), (3.0, 10)]:
    spec = setting(noise_multiplier=z, clients_per_round=cohort, adaptive_clipping=True)
    ours = mechanisms.for_spec(spec).noise_split()
    theirs = differential_privacy.adaptive_clip_noise_params(z, cohort, spec.count_stddev)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_ledger_refuses_other_settings():
  ledger = PrivacyLedger(setting(noise_multiplier=5.0))
  ledger.check_matches(setting(noise_multiplier=5.0))
  for other in (setting(noise_multiplier=0.5), setting(noise_multiplier=5.0, delta=1e-6),
                setting(noise_multiplier=5.0, clients_per_round=10)):
    with pytest.raises(UsageError, match="other privacy settings"):
      ledger.check_matches(other)


def test_reproducible_sampling_is_accounted_without_amplification():
  seeded = setting(reproducible_sampling=True)
  assert accounting.accounted_event(seeded, "rdp") == G(Z)
  assert accounting.epsilon_for_rounds(seeded, 100) == pytest.approx(rdp_eps(G(Z), 100), rel=1e-9)
  assert accounting.epsilon_for_rounds(seeded, 100) > 3 * accounting.epsilon_for_rounds(setting(), 100)
  fixed = setting(sampling="fixed", reproducible_sampling=True)
  assert accounting.accounted_event(fixed, "rdp") == G(Z / 2)  # Still replace-one.


def test_absurd_round_counts_are_refused_not_allocated():
  for rounds in (10**9, -1):
    with pytest.raises(UsageError, match="--rounds"):
      accounting.epsilon_for_rounds(setting(accountant="pld"), rounds)


def test_ledger_json_is_strict_even_without_noise():
  ledger = PrivacyLedger(setting(noise_multiplier=0.0))
  ledger.record_round([1, 2])
  assert ledger.epsilon() == math.inf
  text = ledger.to_json()
  json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
  assert PrivacyLedger.from_json(text).epsilon_history == [(1, math.inf)]
