"""Client-level privacy accounting for DP-FedAvg, on top of `dp_accounting`.

The privacy unit is a *client* (a simulated hospital): neighbouring datasets
differ in one client's entire data. Every (epsilon, delta) here is an upper
bound computed by `dp_accounting`'s RDP or PLD accountant from a `DpEvent`
that describes what the training loop releases; no privacy formula is written
by hand.

Mechanisms (z = the noise multiplier, C = the clip norm):

* central, the server adds N(0, (zC)^2) to the sum of clipped updates and
  divides by a constant (the expected cohort size):
  - sampling='poisson': each client joins a round independently with
    q = clients_per_round / num_clients. Add/remove neighbours; the sum moves
    by at most C, so the per-round event is PoissonSampledDpEvent(q, G(z)).
  - sampling='fixed': a uniformly random cohort of exactly m clients (without
    replacement). Amplification for this sampling needs replace-one
    neighbours, under which the sum moves by up to 2C, so the Gaussian is
    G(z/2) (see `_REPLACE_ONE_SCALE`).
  - sampling='all': every client every round (q = 1): just G(z).
  - adaptive clipping (TFF `DifferentiallyPrivateFactory.gaussian_adaptive`)
    releases the noised sum (value multiplier z_v) and a noised count of
    unclipped clients (TF Privacy `QuantileEstimatorQuery`: records +-0.5,
    "clip" 0.5, stddev s, i.e. multiplier 2s). TF Privacy's
    `QuantileAdaptiveClipSumQuery` reports ComposedDpEvent([G(z_v), G(2s)]),
    and TFF splits z so that z^-2 = z_v^-2 + (2s)^-2: together they are exactly
    one Gaussian with multiplier z (`effective_noise_multiplier`).
* local: each client clips to C and adds N(0, (zC)^2) before sending; the
  server sees every noised update, so sampling does not amplify anything. One
  release is G(z/2) under replace-one (sensitivity 2C); a client that took
  part in k rounds has SelfComposedDpEvent(G(z/2), k). We report the worst
  client; before training (calculator, calibration) we assume k = rounds.
* none: nothing is private; epsilon = inf once anything is released.
"""

import collections
import dataclasses
import functools
import json
import math
import numbers
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from tff_dpmed.errors import UsageError

DP_MODES = ("central", "local", "none")
SAMPLINGS = ("poisson", "fixed", "all")
ACCOUNTANTS = ("rdp", "pld", "auto")

PRIVACY_UNIT = "client"
NeighboringRelation = dp_accounting.NeighboringRelation

# `GaussianDpEvent.noise_multiplier` is stddev / C (dp_accounting's docstring),
# which is stddev / sensitivity only under add/remove. dp_accounting 0.4.3's
# RDP accountant feeds the inner multiplier of a SampledWithoutReplacementDpEvent
# straight into the replace-one bound of Wang, Balle & Kasiviswanathan (2019),
# where it must be stddev / sensitivity = stddev / 2C (it uses a/(2 sigma^2) as
# the Gaussian's RDP; see also google/differential-privacy issue #378). So we
# halve every multiplier under replace-one ourselves; `_check_wor_convention`
# fails loudly if a future dp_accounting starts halving internally.
_REPLACE_ONE_SCALE = 0.5

# PLD grids: dp_accounting's default interval, coarsened when a Gaussian is so
# narrow that its privacy-loss grid (about sigma^-2 + 20/sigma wide) would need
# more than _PLD_MAX_POINTS points (seconds and gigabytes otherwise, e.g. local
# DP after many rounds). The PLD stays a pessimistic upper bound either way.
_PLD_DEFAULT_INTERVAL = 1e-4
_PLD_MAX_POINTS = 2e5

# Relative tolerance when comparing our noise multipliers with the ones TFF
# reports: TF Privacy computes them as float32 stddev / clip.
_EVENT_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class PrivacySetting:
  """Everything the privacy of a DP-FedAvg run depends on.

  Attributes:
    dp_mode: 'central' (server-side noise), 'local' (client-side noise) or
      'none'.
    noise_multiplier: z, noise stddev in units of the clip norm. With
      adaptive clipping it is TFF's *total effective* multiplier (the update
      noise z_v is larger, to pay for the private clipped count).
    num_clients: N, the number of clients (the privacy units).
    clients_per_round: The expected cohort size (exact for 'fixed').
    sampling: 'poisson', 'fixed' (uniform without replacement) or 'all'.
    delta: The delta of the (epsilon, delta) guarantee, in (0, 1).
    accountant: 'rdp', 'pld' or 'auto' (PLD when it supports the event).
    adaptive_clipping: Central only: TFF's `gaussian_adaptive` aggregator.
    clipped_count_stddev: Adaptive only: the stddev s of the clipped-count
      noise as given to TFF; None means the trainer's rule,
      `calibration.choose_clipped_count_stddev`.
  """
  dp_mode: str
  noise_multiplier: float
  num_clients: int
  clients_per_round: int
  sampling: str
  delta: float
  accountant: str
  adaptive_clipping: bool = False
  clipped_count_stddev: Optional[float] = None

  def validate(self) -> None:
    """Raises `UsageError` naming the first bad field and how to fix it."""
    _check_choice(self.dp_mode, DP_MODES, "dp_mode")
    _check_choice(self.sampling, SAMPLINGS, "sampling")
    _check_choice(self.accountant, ACCOUNTANTS, "accountant")
    z = _finite(self.noise_multiplier, "noise_multiplier")
    if z < 0:
      raise UsageError(f"--noise_multiplier={z:g} is negative: use a value >= 0")
    n = _integer(self.num_clients, "num_clients")
    if n < 1:
      raise UsageError(f"--num_clients={n} must be at least 1: pass the number of clients")
    m = _integer(self.clients_per_round, "clients_per_round")
    if not 1 <= m <= n:
      raise UsageError(
          f"--clients_per_round={m} is outside [1, num_clients={n}]: "
          "use a cohort size between 1 and the number of clients")
    d = _finite(self.delta, "delta")
    if not 0 < d < 1:
      raise UsageError(
          f"--delta={d:g} is outside (0, 1): use a small positive delta below "
          f"1/num_clients, e.g. {default_delta(n):g}")
    if not isinstance(self.adaptive_clipping, bool):
      raise UsageError(f"adaptive_clipping={self.adaptive_clipping!r} must be True or False")
    if self.dp_mode == "none":
      if z > 0:
        # Noise the user asked for would otherwise be silently ignored.
        raise UsageError(
            f"--noise_multiplier={z:g} has no effect with --dp_mode=none: "
            "drop it or use --dp_mode=central or --dp_mode=local")
      return
    if self.sampling == "all" and m != n:
      raise UsageError(
          f"--sampling=all means every client every round, but "
          f"--clients_per_round={m} != --num_clients={n}: set them equal or "
          "use --sampling=poisson or --sampling=fixed")
    if self.dp_mode == "local" and self.adaptive_clipping:
      raise UsageError(
          "adaptive clipping is not supported with --dp_mode=local: its "
          "clipped-count query would need its own local randomiser and "
          "accounting; use --clip_mode=fixed")
    if self.clipped_count_stddev is not None:
      if not self.adaptive_clipping:
        raise UsageError(
            "--clipped_count_stddev only applies to --clip_mode=adaptive: "
            "omit it or use --clip_mode=adaptive")
      s = _finite(self.clipped_count_stddev, "clipped_count_stddev")
      if s < 0:
        raise UsageError(
            f"--clipped_count_stddev={s:g} is negative: use a value >= 0 or omit it")
      if z > 0 and z >= 2 * s:
        raise UsageError(
            f"--clipped_count_stddev={s:g} is too small for --noise_multiplier={z:g}: "
            "adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev; "
            f"raise --clipped_count_stddev above {z / 2:g} or omit it")
    if self.accountant == "pld" and not _pld_supports(self):
      raise UsageError(
          f"--accountant=pld cannot account for --sampling={self.sampling} "
          "(dp_accounting's PLD accountant has no sampling-without-replacement "
          "amplification): use --accountant=rdp or --accountant=auto, or "
          "--sampling=poisson")


def _check_choice(value: Any, choices: Sequence[str], name: str) -> None:
  if value not in choices:
    raise UsageError(f"unknown --{name}={value!r}: use one of {', '.join(choices)}")


def _finite(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise UsageError(f"--{name}={value!r} is not a number: pass a finite number")
  value = float(value)
  if not math.isfinite(value):
    raise UsageError(f"--{name}={value} is not finite: pass a finite number")
  return value


def _integer(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise UsageError(f"--{name}={value!r} is not an integer: pass a whole number")
  return int(value)


def _rounds(rounds: Any) -> int:
  rounds = _integer(rounds, "rounds")
  if rounds < 0:
    raise UsageError(f"--rounds={rounds} is negative: pass a number of rounds >= 0")
  return rounds


def default_delta(num_units: int) -> float:
  """The default delta for `num_units` privacy units (here: clients).

  delta bounds the probability of a catastrophic failure *per unit*, so it
  must be well below 1/num_units (delta >= 1/N permits "publish one client's
  data"). We take one order of magnitude below the next power of ten >= N,
  capped at the customary 1e-5: min(1e-5, 10^-(ceil(log10 N) + 1)).

  Args:
    num_units: N >= 1, the number of clients.

  Returns:
    The delta, at most 1/(10 N) and at most 1e-5.
  """
  n = _integer(num_units, "num_clients")
  if n < 1:
    raise UsageError(f"--num_clients={n} must be at least 1: pass the number of clients")
  # Digits of N - 1 is ceil(log10(N)) without floating-point rounding.
  ceil_log10 = len(str(n - 1)) if n > 1 else 0
  return min(1e-5, 10.0 ** -(ceil_log10 + 1))


def clipped_count_stddev_for(setting: PrivacySetting) -> float:
  """The clipped-count stddev s TFF uses for `setting` (adaptive clipping only)."""
  if setting.clipped_count_stddev is not None:
    return float(setting.clipped_count_stddev)
  # Imported here: calibration imports this module.
  from tff_dpmed.privacy import calibration  # pylint: disable=g-import-not-at-top
  return calibration.choose_clipped_count_stddev(
      float(setting.noise_multiplier), setting.clients_per_round)


def adaptive_noise_split(setting: PrivacySetting) -> Tuple[float, float]:
  """(z_v, s): TFF's update noise multiplier and clipped-count stddev.

  Same rule as TFF's `adaptive_clip_noise_params`: z^-2 = z_v^-2 + (2 s)^-2,
  and both are 0 when z is 0.
  """
  z = float(setting.noise_multiplier)
  s = clipped_count_stddev_for(setting)
  if z == 0:
    return 0.0, s
  if z >= 2 * s:
    raise UsageError(
        f"clipped_count_stddev={s:g} is too small for noise_multiplier={z:g}: "
        f"adaptive clipping needs it above {z / 2:g}; raise it or omit it")
  return (z**-2 - (2 * s)**-2)**-0.5, s


def aggregator_inner_event(setting: PrivacySetting) -> dp_accounting.DpEvent:
  """The per-round, unsampled event the DP aggregator records, in TFF's terms.

  For central DP this is what `differential_privacy.extract_dp_event_from_state`
  returns after one `next` of TFF's `DifferentiallyPrivateFactory` (multipliers
  in the stddev / C convention, i.e. relative to add/remove sensitivity).
  For local DP it is one client's release, G(z), in the same convention (our
  local aggregator records no event). For 'none': NonPrivateDpEvent.
  """
  setting.validate()
  z = float(setting.noise_multiplier)
  if setting.dp_mode == "none":
    return dp_accounting.NonPrivateDpEvent()
  if setting.dp_mode == "central" and setting.adaptive_clipping:
    z_v, s = adaptive_noise_split(setting)
    # The order and structure of TF Privacy's QuantileAdaptiveClipSumQuery.
    return dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(float(z_v)),
        dp_accounting.GaussianDpEvent(float(2 * s)),
    ])
  return dp_accounting.GaussianDpEvent(z)


def effective_noise_multiplier(event: dp_accounting.DpEvent) -> float:
  """The multiplier of the single Gaussian equivalent to `event`.

  Gaussians released on the same data compose into one Gaussian with
  sigma^-2 = sum_i sigma_i^-2 (Mironov, Talwar & Zhang 2019, Sec. 3; the same
  reduction dp_accounting's RDP accountant applies inside sampled events).

  Raises:
    ValueError: If `event` is not built from Gaussian events only.
  """
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return float(event.noise_multiplier)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    sigmas = [effective_noise_multiplier(e) for e in event.events]
  elif isinstance(event, dp_accounting.SelfComposedDpEvent):
    sigmas = [effective_noise_multiplier(event.event)] * event.count
  else:
    raise ValueError(f"not a composition of Gaussian events: {event}")
  if not sigmas:
    return math.inf
  if any(s == 0 for s in sigmas):
    return 0.0
  return math.fsum(s**-2 for s in sigmas)**-0.5


def _scale_gaussians(event: dp_accounting.DpEvent, factor: float) -> dp_accounting.DpEvent:
  """`event` with every Gaussian multiplier times `factor` (sensitivity change)."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return dp_accounting.GaussianDpEvent(float(event.noise_multiplier) * factor)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([_scale_gaussians(e, factor) for e in event.events])
  raise ValueError(f"cannot rescale {event}")


def neighboring_relation(setting: PrivacySetting) -> NeighboringRelation:
  """Add/remove one client, or replace one (fixed-size sampling, local DP)."""
  if setting.dp_mode == "local" or setting.sampling == "fixed":
    return NeighboringRelation.REPLACE_ONE
  return NeighboringRelation.ADD_OR_REMOVE_ONE


def round_event(setting: PrivacySetting, accountant: str = "rdp") -> dp_accounting.DpEvent:
  """The event composed into `accountant` per round (central) or per release (local).

  Multipliers are relative to the sensitivity under `neighboring_relation`.
  For PLD, whose accountant cannot take a composition inside a sampled event,
  adaptive clipping's two Gaussians are replaced by the one Gaussian they are
  equivalent to (`effective_noise_multiplier`; exact, not an approximation).

  Args:
    setting: A valid setting.
    accountant: 'rdp' or 'pld' (resolved, not 'auto').

  Returns:
    The per-round event; NonPrivateDpEvent when z == 0 or dp_mode == 'none'.
  """
  if accountant not in ("rdp", "pld"):
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
  inner = aggregator_inner_event(setting)
  if setting.dp_mode == "none" or setting.noise_multiplier == 0:
    # No noise: not private at all (also avoids 0^-2 in the Gaussian reduction).
    return dp_accounting.NonPrivateDpEvent()
  if neighboring_relation(setting) is NeighboringRelation.REPLACE_ONE:
    inner = _scale_gaussians(inner, _REPLACE_ONE_SCALE)
  if accountant == "pld" and isinstance(inner, dp_accounting.ComposedDpEvent):
    inner = dp_accounting.GaussianDpEvent(effective_noise_multiplier(inner))
  if setting.dp_mode == "local" or setting.sampling == "all":
    return inner
  if setting.sampling == "poisson":
    q = setting.clients_per_round / setting.num_clients
    return dp_accounting.PoissonSampledDpEvent(q, inner)
  return dp_accounting.SampledWithoutReplacementDpEvent(
      setting.num_clients, setting.clients_per_round, inner)


def _pld_supports(setting: PrivacySetting) -> bool:
  if setting.dp_mode == "none":
    return True  # Nothing is composed.
  # z = 1 stands in for any positive z: support depends on structure only.
  probe = dataclasses.replace(
      setting, noise_multiplier=1.0, accountant="rdp",
      clipped_count_stddev=None if setting.clipped_count_stddev is None else 1.0)
  accountant = dp_accounting.pld.PLDAccountant(neighboring_relation(probe))
  return accountant.supports(round_event(probe, "pld"))


def resolve_accountant(setting: PrivacySetting) -> str:
  """'rdp' or 'pld': 'auto' is PLD when dp_accounting's PLD supports the event."""
  setting.validate()
  if setting.accountant != "auto":
    return setting.accountant
  return "pld" if _pld_supports(setting) else "rdp"


def pld_discretization_interval(sigma: float) -> float:
  """The PLD value discretization interval for a Gaussian with multiplier sigma."""
  if not sigma > 0 or math.isinf(sigma):
    return _PLD_DEFAULT_INTERVAL
  return max(_PLD_DEFAULT_INTERVAL, (sigma**-2 + 20.0 / sigma) / _PLD_MAX_POINTS)


def _pld_interval_for(setting: PrivacySetting, count: int) -> float:
  """The PLD interval for composing `round_event(setting, 'pld')` `count` times."""
  event = round_event(setting, "pld")
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return pld_discretization_interval(effective_noise_multiplier(event.event))
  if isinstance(event, dp_accounting.GaussianDpEvent):
    # The PLD accountant turns count Gaussians into one with sigma / sqrt(count).
    return pld_discretization_interval(event.noise_multiplier / math.sqrt(max(count, 1)))
  return _PLD_DEFAULT_INTERVAL


def make_accountant(setting: PrivacySetting, count: int = 1,
                    accountant: Optional[str] = None) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant of the resolved kind, for `count` compositions."""
  kind = accountant or resolve_accountant(setting)
  relation = neighboring_relation(setting)
  if kind == "rdp":
    if setting.dp_mode == "central" and setting.sampling == "fixed":
      _check_wor_convention()
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  return dp_accounting.pld.PLDAccountant(
      relation, value_discretization_interval=_pld_interval_for(setting, count))


@functools.lru_cache(maxsize=None)
def _check_wor_convention() -> None:
  """Fails if dp_accounting stops treating WOR Gaussians as sigma / sensitivity."""
  # With m = N, sampling is the identity: if the accountant used G(s) as is,
  # both numbers agree; if it halved s itself (a fix of issue #378), ours
  # would be halved twice and we want to know.
  sampled = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=NeighboringRelation.REPLACE_ONE).compose(
          dp_accounting.SampledWithoutReplacementDpEvent(
              10, 10, dp_accounting.GaussianDpEvent(2.0)))
  plain = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(2.0))
  if not math.isclose(sampled.get_epsilon(1e-5), plain.get_epsilon(1e-5), rel_tol=1e-9):
    raise RuntimeError(
        "dp_accounting's RDP accountant changed how it treats the Gaussian inside "
        "SampledWithoutReplacementDpEvent; revisit _REPLACE_ONE_SCALE in "
        "tff_dpmed/privacy/accounting.py before trusting fixed-sampling epsilons")


class _EpsilonEngine:
  """Epsilon after k compositions of one setting's event, cached.

  RDP: the one-round RDP curve is computed once; k rounds are k times it
  (exactly what RdpAccountant.compose(event, k) does), so each query is cheap.
  PLD: the one-round PLD is built once and self-composed k times with FFTs
  (for Poisson sampling; unsampled Gaussians are cheap to redo); memoised.
  """

  def __init__(self, setting: PrivacySetting):
    setting.validate()
    self.setting = setting
    self.accountant = resolve_accountant(setting)
    self.event = round_event(setting, self.accountant)
    self._memo: Dict[int, float] = {}
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
        acc = make_accountant(self.setting, 1, "rdp").compose(self.event)
        self._rdp_one, self._orders = acc.rdp, acc.orders
      eps, _ = rdp_privacy_accountant.compute_epsilon(
          self._orders, count * self._rdp_one, self.setting.delta)
      return float(eps)
    if count not in self._memo:
      if self._pld_sampled_gaussian():
        # The calls PLDAccountant.compose(event, count) makes, minus rebuilding
        # the one-round PLD (most of the cost) every round; the tests pin both
        # to the same epsilon.
        if self._pld_one is None:
          self._pld_one = privacy_loss_distribution.from_gaussian_mechanism(
              standard_deviation=self.event.event.noise_multiplier,
              value_discretization_interval=_pld_interval_for(self.setting, 1),
              sampling_prob=self.event.sampling_probability)
        eps = self._pld_one.self_compose(count).get_epsilon_for_delta(self.setting.delta)
      else:
        acc = make_accountant(self.setting, count, "pld").compose(self.event, count)
        eps = acc.get_epsilon(self.setting.delta)
      self._memo[count] = float(eps)
    return self._memo[count]

  def _pld_sampled_gaussian(self) -> bool:
    return (isinstance(self.event, dp_accounting.PoissonSampledDpEvent)
            and isinstance(self.event.event, dp_accounting.GaussianDpEvent)
            and self.event.event.noise_multiplier > 0)


@functools.lru_cache(maxsize=32)
def _engine(setting: PrivacySetting) -> _EpsilonEngine:
  return _EpsilonEngine(setting)


def clear_caches() -> None:
  """Forgets cached accountants (for benchmarks)."""
  _engine.cache_clear()


def epsilon_for_rounds(setting: PrivacySetting, rounds: int) -> float:
  """Epsilon at `setting.delta` after `rounds` rounds.

  Central: `rounds` compositions of the sampled per-round event. Local: the
  worst case, a client that took part in every round (the ledger uses actual
  participation). None: inf after any round.
  """
  setting.validate()
  return _engine(setting).epsilon(_rounds(rounds))


def explain(setting: PrivacySetting) -> List[str]:
  """Human-readable lines: what is accounted for, how, and why."""
  setting.validate()
  lines = [f"privacy unit: one {PRIVACY_UNIT} (all of one hospital's data)"]
  if setting.dp_mode == "none":
    lines.append("dp_mode=none: no clipping or noise, epsilon = inf")
    return lines
  kind = resolve_accountant(setting)
  why = {"auto": " (auto: PLD supports this event)" if kind == "pld"
                 else " (auto: PLD cannot amplify this sampling, so RDP)"}
  lines.append(f"accountant: {kind.upper()}{why.get(setting.accountant, ' (requested)')}")
  relation = neighboring_relation(setting)
  z = float(setting.noise_multiplier)
  if setting.dp_mode == "central":
    n, m = setting.num_clients, setting.clients_per_round
    if setting.sampling == "poisson":
      lines.append(f"sampling: Poisson, each client joins a round with q = {m}/{n} = {m / n:.6g}")
    elif setting.sampling == "fixed":
      lines.append(f"sampling: fixed-size cohorts of {m} of {n} clients, without replacement")
    else:
      lines.append(f"sampling: all {n} clients every round (no amplification)")
    if relation is NeighboringRelation.REPLACE_ONE:
      lines.append(
          "neighbouring relation: replace one client (needed for fixed-size sampling); "
          f"the clipped sum moves by up to 2C, so the Gaussian is G(z/2) = G({z / 2:g})")
    else:
      lines.append("neighbouring relation: add/remove one client; the clipped sum "
                   f"moves by up to C, so the Gaussian is G(z) = G({z:g})")
    if setting.adaptive_clipping:
      z_v, s = adaptive_noise_split(setting)
      lines.append(
          f"adaptive clipping: update noise z_v = {z_v:.6g} and clipped-count stddev "
          f"{s:g} (multiplier {2 * s:g}) compose to exactly z = {z:g}")
  else:
    lines.append(
        "local DP: each client noises its own update, so sampling does not amplify; "
        f"neighbouring relation: replace one client, sensitivity 2C, G(z/2) = G({z / 2:g}) "
        "per release; epsilon is for the worst-case client that takes part in every round")
  if kind == "pld":
    lines.append("PLD: pessimistic discretization (an upper bound)")
  return lines


class PrivacyLedger:
  """Incremental accounting for a training run, one `record_round` per round.

  Central DP: epsilon of `rounds` compositions of the per-round event (who
  took part does not matter; the sampling is what protects them). Local DP:
  epsilon of the client that took part most often.
  """

  _FORMAT = "tff_dpmed.privacy_ledger.v1"

  def __init__(self, setting: PrivacySetting):
    setting.validate()
    self._setting = setting
    self._rounds = 0
    self._participation: collections.Counter = collections.Counter()
    self._history: List[Tuple[int, float]] = []

  @property
  def setting(self) -> PrivacySetting:
    return self._setting

  @property
  def rounds(self) -> int:
    return self._rounds

  @property
  def max_participation(self) -> int:
    """The most rounds any one client took part in (tracked for local DP)."""
    return max(self._participation.values(), default=0)

  @property
  def epsilon_history(self) -> List[Tuple[int, float]]:
    """(round, epsilon) for every round at which `epsilon()` was asked."""
    return list(self._history)

  def record_round(self, participant_ids: Sequence[int]) -> None:
    """Records one completed round in which `participant_ids` sent updates.

    Raises:
      ValueError: If the cohort contradicts the setting (duplicate clients,
        the wrong size for fixed or 'all' sampling, more clients than exist):
        the accounting would then not describe what was trained.
    """
    ids = [operator.index(i) for i in participant_ids]
    if len(set(ids)) != len(ids):
      dupes = sorted(i for i, c in collections.Counter(ids).items() if c > 1)
      raise ValueError(f"clients {dupes[:5]} appear more than once in one round: "
                       "each client may contribute one clipped update per round")
    s = self._setting
    if len(ids) > s.num_clients:
      raise ValueError(f"{len(ids)} participants > num_clients={s.num_clients}")
    if s.dp_mode == "central":
      expected = {"fixed": s.clients_per_round, "all": s.num_clients}.get(s.sampling)
      if expected is not None and len(ids) != expected:
        raise ValueError(
            f"sampling={s.sampling} accounts for exactly {expected} clients per "
            f"round, but {len(ids)} took part")
    if s.dp_mode == "local":
      self._participation.update(ids)
      if len(self._participation) > s.num_clients:
        raise ValueError(f"{len(self._participation)} distinct clients have taken part, "
                         f"more than num_clients={s.num_clients}")
    self._rounds += 1

  def epsilon(self) -> float:
    """Epsilon so far, at `setting.delta`."""
    count = self.max_participation if self._setting.dp_mode == "local" else self._rounds
    if self._setting.dp_mode == "none":
      eps = math.inf if self._rounds else 0.0
    else:
      eps = _engine(self._setting).epsilon(count)
    if not self._history or self._history[-1][0] != self._rounds:
      self._history.append((self._rounds, eps))
    return eps

  def to_json(self) -> str:
    """The ledger as JSON, for checkpoints; `from_json` restores it exactly."""
    return json.dumps({
        "format": self._FORMAT,
        "setting": dataclasses.asdict(self._setting),
        "rounds": self._rounds,
        "participation": sorted([i, c] for i, c in self._participation.items()),
        "epsilon_history": [[r, e] for r, e in self._history],
    })

  @classmethod
  def from_json(cls, text: str) -> "PrivacyLedger":
    """Restores a ledger written by `to_json`.

    Raises:
      UsageError: If `text` is not a ledger this version wrote.
    """
    try:
      data = json.loads(text)
      if data.get("format") != cls._FORMAT:
        raise ValueError(f"format {data.get('format')!r}")
      ledger = cls(PrivacySetting(**data["setting"]))
      ledger._rounds = _rounds(data["rounds"])
      ledger._participation = collections.Counter(
          {operator.index(i): operator.index(c) for i, c in data["participation"]})
      ledger._history = [(int(r), float(e)) for r, e in data["epsilon_history"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise UsageError(
          f"privacy ledger in the checkpoint is unreadable ({e}): restore it from "
          "an intact checkpoint or start a new run") from None
    if ledger.max_participation > ledger._rounds:
      raise UsageError("privacy ledger in the checkpoint is inconsistent (a client took "
                       "part in more rounds than were run): restore an intact checkpoint")
    return ledger


def _same_event(ours: dp_accounting.DpEvent, theirs: dp_accounting.DpEvent,
                path: str, problems: List[str]) -> None:
  if type(ours) is not type(theirs):
    problems.append(f"{path}: expected {type(ours).__name__}, TFF has {type(theirs).__name__}")
  elif isinstance(ours, dp_accounting.GaussianDpEvent):
    a, b = float(ours.noise_multiplier), float(theirs.noise_multiplier)
    if not math.isclose(a, b, rel_tol=_EVENT_RTOL, abs_tol=1e-9):
      problems.append(f"{path}: noise multiplier {a:.7g} accounted, TFF has {b:.7g}")
  elif isinstance(ours, dp_accounting.ComposedDpEvent):
    if len(ours.events) != len(theirs.events):
      problems.append(f"{path}: {len(ours.events)} sub-events accounted, "
                      f"TFF has {len(theirs.events)}")
    else:
      for k, (a, b) in enumerate(zip(ours.events, theirs.events)):
        _same_event(a, b, f"{path}[{k}]", problems)
  elif isinstance(ours, dp_accounting.SelfComposedDpEvent):
    if ours.count != theirs.count:
      problems.append(f"{path}: count {ours.count} accounted, TFF has {theirs.count}")
    _same_event(ours.event, theirs.event, f"{path}.event", problems)
  elif ours != theirs:
    problems.append(f"{path}: {ours} accounted, TFF has {theirs}")


def check_event_matches(setting: PrivacySetting,
                        event_from_tff_state: dp_accounting.DpEvent) -> None:
  """Raises RuntimeError unless TFF's recorded event is the one we account for.

  Args:
    setting: The setting the ledger accounts with.
    event_from_tff_state: `extract_dp_event_from_state(state)` after a `next`.
      (Its multipliers may be numpy float32; we compare values, and never
      compose this event directly: dp_accounting's RDP reduction of composed
      Gaussians silently drops non-`float` multipliers.)
  """
  ours = aggregator_inner_event(setting)
  problems: List[str] = []
  _same_event(ours, event_from_tff_state, "event", problems)
  if problems:
    raise RuntimeError(
        "the DP event TFF's aggregator recorded is not the one the privacy "
        f"accounting assumes ({'; '.join(problems)}); accounted: {ours}, "
        f"TFF: {event_from_tff_state}")


def describe_event(event: dp_accounting.DpEvent) -> str:
  """A compact string for logs, e.g. 'Poisson(q=0.0355, Gaussian(1.2))'."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return f"Gaussian({event.noise_multiplier:.6g})"
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    return f"Poisson(q={event.sampling_probability:.6g}, {describe_event(event.event)})"
  if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
    return (f"WithoutReplacement({event.sample_size} of {event.source_dataset_size}, "
            f"{describe_event(event.event)})")
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return "Composed(" + ", ".join(describe_event(e) for e in event.events) + ")"
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    return f"{event.count} x {describe_event(event.event)}"
  return type(event).__name__


__all__: List[str] = [
    "ACCOUNTANTS", "DP_MODES", "SAMPLINGS", "PRIVACY_UNIT", "PrivacyLedger",
    "PrivacySetting", "adaptive_noise_split", "aggregator_inner_event",
    "check_event_matches", "clear_caches", "clipped_count_stddev_for",
    "default_delta", "describe_event", "effective_noise_multiplier",
    "epsilon_for_rounds", "explain", "make_accountant", "neighboring_relation",
    "pld_discretization_interval", "resolve_accountant", "round_event",
]
