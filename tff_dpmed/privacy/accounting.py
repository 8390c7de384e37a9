"""Epsilon from `dp_accounting`: which accountant, and a cached engine.

Every (epsilon, delta) is an upper bound computed by `dp_accounting`'s RDP or
PLD accountant from the event a mechanism reports (`mechanisms`), wrapped in
the program's sampling (`events`); no privacy formula is written by hand.
"""

import dataclasses
import functools
import math
from typing import Optional

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import events
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.spec import Accountant, DPMode, DPSpec, Sampling

# PLD grids: dp_accounting's default interval, coarsened when a Gaussian is so
# narrow that its privacy-loss grid (about sigma^-2 + 20/sigma wide) would need
# more than _PLD_MAX_POINTS points (seconds and gigabytes otherwise, e.g. local
# DP after many rounds). The PLD stays a pessimistic upper bound either way.
_PLD_DEFAULT_INTERVAL = 1e-4
_PLD_MAX_POINTS = 2e5
# More compositions than this are not a training run: refuse rather than
# allocate (RDP is cheap, but PLD grids and calibration are not).
MAX_ROUNDS = 10**7


def resolve_accountant(spec: DPSpec) -> str:
  """'rdp' or 'pld': 'auto' is PLD when dp_accounting's PLD supports the event."""
  if spec.accountant is not Accountant.AUTO:
    return spec.accountant.value
  return "pld" if _pld_supports(spec) else "rdp"


def check_accountant(spec: DPSpec) -> None:
  """Raises UsageError if the requested accountant cannot account for `spec`."""
  if spec.accountant is Accountant.PLD and not _pld_supports(spec):
    raise UsageError(
        f"--accountant=pld cannot account for --sampling={spec.sampling.value} "
        "(dp_accounting's PLD accountant has no sampling-without-replacement "
        "amplification): use --accountant=rdp or --accountant=auto, or --sampling=poisson")


@functools.lru_cache(maxsize=64)
def _pld_supports(spec: DPSpec) -> bool:
  if spec.mode is DPMode.NONE:
    return True  # Nothing is composed.
  if spec.mode is DPMode.EXAMPLE:
    # PLD could (Poisson-sampled Gaussians), but a PLD query costs seconds per
    # client size and the ledger asks every round: RDP unless --accountant=pld.
    return False
  # z = 1 stands in for any positive z: support depends on structure only.
  probe = mechanisms.for_spec(dataclasses.replace(
      spec, noise_multiplier=1.0,
      clipped_count_stddev=None if spec.clipped_count_stddev is None else 1.0))
  accountant = dp_accounting.pld.PLDAccountant(probe.neighboring_relation)
  return accountant.supports(probe.accounted_event(single_gaussian=True))


def accounted_event(spec: DPSpec, accountant: str) -> dp_accounting.DpEvent:
  """One accounting step's event, in the form `accountant` ('rdp' or 'pld') takes."""
  return mechanisms.for_spec(spec).accounted_event(single_gaussian=accountant == "pld")


def pld_discretization_interval(sigma: float) -> float:
  """The PLD value discretization interval for a Gaussian with multiplier sigma."""
  if not sigma > 0 or math.isinf(sigma):
    return _PLD_DEFAULT_INTERVAL
  return max(_PLD_DEFAULT_INTERVAL, (sigma**-2 + 20.0 / sigma) / _PLD_MAX_POINTS)


def _pld_interval_for(event: dp_accounting.DpEvent, count: int) -> float:
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return pld_discretization_interval(events.effective_noise_multiplier(event.event))
  if isinstance(event, dp_accounting.GaussianDpEvent):
    # The PLD accountant turns count Gaussians into one with sigma / sqrt(count).
    return pld_discretization_interval(event.noise_multiplier / math.sqrt(max(count, 1)))
  return _PLD_DEFAULT_INTERVAL


def make_accountant(spec: DPSpec, count: int = 1, accountant: Optional[str] = None,
                    event: Optional[dp_accounting.DpEvent] = None
                    ) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant of the resolved kind, for `count` compositions of `event`
  (default: the spec's one accounted event)."""
  kind = accountant or resolve_accountant(spec)
  mechanism = mechanisms.for_spec(spec)
  relation = mechanism.neighboring_relation
  if kind == "rdp":
    if mechanism.amplified and spec.sampling is Sampling.FIXED and spec.mode is not DPMode.EXAMPLE:
      _check_wor_convention()
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  if event is None:
    event = mechanism.accounted_event(single_gaussian=True)
  return dp_accounting.pld.PLDAccountant(
      relation, value_discretization_interval=_pld_interval_for(event, count))


@functools.lru_cache(maxsize=None)
def _check_wor_convention() -> None:
  """Fails if dp_accounting stops treating WOR Gaussians as sigma / sensitivity."""
  # With m = N, sampling is the identity: if the accountant used G(s) as is,
  # both numbers agree; if it halved s itself (a fix of issue #378), ours
  # would be halved twice and we want to know.
  sampled = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=events.NeighboringRelation.REPLACE_ONE).compose(
          dp_accounting.SampledWithoutReplacementDpEvent(
              10, 10, dp_accounting.GaussianDpEvent(2.0)))
  plain = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(2.0))
  if not math.isclose(sampled.get_epsilon(1e-5), plain.get_epsilon(1e-5), rel_tol=1e-9):
    raise RuntimeError(
        "dp_accounting's RDP accountant changed how it treats the Gaussian inside "
        "SampledWithoutReplacementDpEvent; revisit events._REPLACE_ONE_SCALE "
        "before trusting fixed-sampling epsilons")


class _EpsilonEngine:
  """Epsilon after k compositions of one of a spec's accounting terms, cached.

  RDP: the one-step RDP curve is computed once; k steps are k times it
  (exactly what RdpAccountant.compose(event, k) does), so each query is cheap.
  PLD: the one-step PLD is built once and self-composed k times with FFTs
  (for Poisson sampling; unsampled Gaussians are cheap to redo); memoised.
  """

  def __init__(self, spec: DPSpec, term: int = 0):
    self.spec = spec
    self.accountant = resolve_accountant(spec)
    self.event, _ = mechanisms.for_spec(spec).accounting_terms(
        single_gaussian=self.accountant == "pld")[term]
    self._memo: dict[int, float] = {}
    self._rdp_one = None
    self._orders = None
    self._pld_one = None

  def epsilon(self, count: int) -> float:
    if count == 0:
      return 0.0
    if isinstance(self.event, dp_accounting.NonPrivateDpEvent):
      return math.inf
    if self.accountant == "rdp":
      if self._rdp_one is None:
        acc = make_accountant(self.spec, 1, "rdp").compose(self.event)
        self._rdp_one, self._orders = acc.rdp, acc.orders
      eps, _ = rdp_privacy_accountant.compute_epsilon(
          self._orders, count * self._rdp_one, self.spec.delta)
      return float(eps)
    if count not in self._memo:
      if self._pld_sampled_gaussian():
        # The calls PLDAccountant.compose(event, count) makes, minus rebuilding
        # the one-step PLD (most of the cost) every round; the tests pin both
        # to the same epsilon.
        if self._pld_one is None:
          self._pld_one = privacy_loss_distribution.from_gaussian_mechanism(
              standard_deviation=self.event.event.noise_multiplier,
              value_discretization_interval=_pld_interval_for(self.event, 1),
              sampling_prob=self.event.sampling_probability)
        eps = self._pld_one.self_compose(count).get_epsilon_for_delta(self.spec.delta)
      else:
        acc = make_accountant(self.spec, count, "pld", self.event).compose(self.event, count)
        eps = acc.get_epsilon(self.spec.delta)
      self._memo[count] = float(eps)
    return self._memo[count]

  def _pld_sampled_gaussian(self) -> bool:
    return (isinstance(self.event, dp_accounting.PoissonSampledDpEvent)
            and isinstance(self.event.event, dp_accounting.GaussianDpEvent)
            and self.event.event.noise_multiplier > 0)


@functools.lru_cache(maxsize=64)
def _engine(spec: DPSpec, term: int = 0) -> _EpsilonEngine:
  return _EpsilonEngine(spec, term)


def clear_caches() -> None:
  """Forgets cached accountants (for benchmarks)."""
  _engine.cache_clear()
  _pld_supports.cache_clear()
  _run_event_epsilon.cache_clear()


def check_rounds(rounds) -> int:
  """`rounds` as an int in [0, MAX_ROUNDS], or a one-line UsageError."""
  if isinstance(rounds, bool) or not isinstance(rounds, int):
    raise UsageError(f"--rounds={rounds!r} is not an integer: pass a whole number")
  if not 0 <= rounds <= MAX_ROUNDS:
    raise UsageError(f"--rounds={rounds} is outside [0, {MAX_ROUNDS:.0e}]: pass a "
                     "realistic number of rounds")
  return rounds


def epsilon_after(spec: DPSpec, compositions: int) -> float:
  """Epsilon at `spec.delta` after `compositions` accounting steps, for the worst-off unit.

  For DP-SGD an accounting step is a round: each client size's step event
  composed `local_steps` times per round; epsilon is the largest.
  """
  mechanism = mechanisms.for_spec(mechanisms.require_calibrated(spec))
  count = check_rounds(compositions)
  if mechanism.run_event(count) is not None:
    return _run_event_epsilon(spec, count)
  return max(_engine(spec, term).epsilon(count * per_step)
             for term, (_, per_step) in enumerate(mechanism.accounting_terms()))


@functools.lru_cache(maxsize=1024)
def _run_event_epsilon(spec: DPSpec, rounds: int) -> float:
  """Epsilon of a mechanism whose `rounds` rounds are one event (DP-FTRL's tree)."""
  event = mechanisms.for_spec(spec).run_event(rounds)
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return 0.0
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    return math.inf
  kind = resolve_accountant(spec)
  accountant = make_accountant(spec, 1, kind, event).compose(event)
  return float(accountant.get_epsilon(spec.delta))


def epsilon_for_rounds(spec: DPSpec, rounds: int) -> float:
  """Epsilon at `spec.delta` after `rounds` rounds, for the worst-off unit.

  Central: `rounds` compositions of the sampled per-round event. Local: a
  client that took part in every round (the ledger uses actual
  participation). None: inf after any round.
  """
  return epsilon_after(spec, rounds)


def explain(spec: DPSpec) -> list[str]:
  """Human-readable lines: what is accounted for, how, and why."""
  mechanism = mechanisms.for_spec(mechanisms.require_calibrated(spec))
  lines = [f"privacy unit: one {mechanism.privacy_unit} (all of one hospital's data)"
           if mechanism.privacy_unit == "client" else
           f"privacy unit: one {mechanism.privacy_unit} (one patient's image)"]
  if not mechanism.states_guarantee:
    return lines + mechanism.describe()
  kind = resolve_accountant(spec)
  why = (" (requested)" if spec.accountant is not Accountant.AUTO else
         " (auto: PLD supports this event)" if kind == "pld" else
         " (auto: RDP; PLD costs seconds per client size per query)"
         if spec.mode is DPMode.EXAMPLE else
         " (auto: PLD cannot amplify this sampling, so RDP)")
  lines.append(f"accountant: {kind.upper()}{why}")
  lines += mechanism.describe()
  if kind == "pld":
    lines.append("PLD: pessimistic discretization (an upper bound)")
  return lines
