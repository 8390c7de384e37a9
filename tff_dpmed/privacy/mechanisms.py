"""One class per DP placement; each is the single source of its own DP event.

After TF Privacy's `DPQuery` (the query that adds the noise reports the
`DpEvent` of what it released) and Flower's one wrapper per DP placement:

    mechanism = mechanisms.for_spec(spec)
    mechanism.aggregator()       # the TFF aggregation factory that does it
    mechanism.release_event()    # what one release is, for the accountant
    mechanism.describe()         # what is protected, and how, in words

The program adds only the client sampling around `release_event()`
(`events.sampled_event`); the ledger composes it. A new mechanism is one new
subclass registered in `_BY_MODE`, its flag value in `spec.DPMode`, and its
tests.

This module stays free of TensorFlow: `aggregator()` imports the TFF
factory modules when it is called, so the privacy calculator, which never
builds an aggregator, starts quickly.
"""

import abc
import math
from typing import Any, ClassVar, Mapping, Optional, Sequence

import dp_accounting

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import events
from tff_dpmed.privacy.spec import DPMode, DPSpec, LocalBatching, Sampling

# Relative tolerance when comparing our noise multipliers with the ones TFF
# records: TF Privacy computes them as float32 stddev / clip.
_EVENT_RTOL = 1e-5


class Mechanism(abc.ABC):
  """A DP placement: how updates are clipped and noised, and what that releases."""

  mode: ClassVar[DPMode]
  privacy_unit: ClassVar[str] = "client"
  # Whether an observer sees only the aggregate of a sampled cohort, so that
  # sampling amplifies privacy (False: each release is seen on its own).
  amplified_by_sampling: ClassVar[bool] = True
  # Whether the run states an (epsilon, delta) at all (not for the baseline).
  states_guarantee: ClassVar[bool] = True
  # Whether the client work samples its own batches from all of a client's
  # examples (DP-SGD), rather than reading prepared batches.
  samples_batches_itself: ClassVar[bool] = False

  def __init__(self, spec: DPSpec):
    if spec.mode is not self.mode:
      raise ValueError(f"{type(self).__name__} needs dp_mode={self.mode.value}, "
                       f"got {spec.mode.value}")
    if spec.noise_multiplier is None:
      raise ValueError("the spec's noise multiplier is not calibrated yet "
                       "(calibration.calibrate)")
    self.spec = spec

  @property
  def is_private(self) -> bool:
    return self.spec.mode is not DPMode.NONE and self.spec.noise_multiplier > 0

  @abc.abstractmethod
  def release_event(self) -> dp_accounting.DpEvent:
    """One release (one round's aggregate, or one client's update), unsampled.

    Gaussian multipliers are stddev / C, as TF Privacy reports them.
    """

  @property
  def amplified(self) -> bool:
    """Whether this run's sampling amplifies (not when the cohorts are predictable)."""
    return self.amplified_by_sampling and not self.spec.reproducible_sampling

  def accounted_event(self, single_gaussian: bool = False) -> dp_accounting.DpEvent:
    """`release_event()` under the program's sampling: one accounting step."""
    s = self.spec
    return events.sampled_event(self.release_event(), s.sampling, s.num_clients,
                                s.clients_per_round, self.amplified_by_sampling,
                                amplify=self.amplified, single_gaussian=single_gaussian)

  def accounting_terms(self, single_gaussian: bool = False
                       ) -> list[tuple[dp_accounting.DpEvent, int]]:
    """(event, compositions per accounting step) for each class of privacy unit.

    Epsilon is the largest over the classes: the worst-off unit. One class
    for client-level mechanisms; one per client size for DP-SGD.
    """
    return [(self.accounted_event(single_gaussian), 1)]

  @property
  def neighboring_relation(self) -> events.NeighboringRelation:
    return events.neighboring_relation(self.spec.sampling, self.amplified_by_sampling)

  def client_work(self, model, element_type, learning_rate: float):
    """A TFF `ClientWorkProcess` that is part of the mechanism, or None (plain FedAvg).

    `element_type` is the type of the clients' dataset elements.
    """
    del model, element_type, learning_rate
    return None

  def client_level(self) -> Optional["Mechanism"]:
    """A second, client-level mechanism at the server (example mode), or None."""
    return None

  def weights_updates_by_size(self) -> bool:
    """Whether the server averages updates weighted by n_k, not uniformly."""
    return False

  def compositions(self, rounds: int, max_participation: int) -> int:
    """How many accounting steps `rounds` rounds are for the worst-off unit."""
    del max_participation
    return rounds

  def run_event(self, rounds: int) -> Optional[dp_accounting.DpEvent]:
    """The whole release of `rounds` rounds as one event, for mechanisms whose rounds
    are not independent releases (a tree over rounds); None: compose per round."""
    del rounds
    return None

  def composed_event(self, compositions: int,
                     single_gaussian: bool = False) -> dp_accounting.DpEvent:
    """`compositions` accounting steps as one event: `run_event`, else the accounted
    event self-composed."""
    whole_run = self.run_event(compositions)
    if whole_run is not None:
      return whole_run
    return dp_accounting.SelfComposedDpEvent(self.accounted_event(single_gaussian), compositions)

  # Whether the aggregator's state holds its noise's seed, so a checkpoint of
  # the server state could undo the noise (see CentralTreeFTRL).
  state_holds_noise_seed: ClassVar[bool] = False

  def tracks_participation(self) -> bool:
    """Whether the ledger must count each client's rounds (see `compositions`)."""
    return False

  def check_cohort(self, cohort_size: int) -> None:
    """Raises ValueError if a round's cohort contradicts the accounted sampling."""
    s = self.spec
    expected = {Sampling.FIXED: s.clients_per_round,
                Sampling.ALL: s.num_clients}.get(s.sampling)
    if expected is not None and cohort_size != expected:
      raise ValueError(f"sampling={s.sampling.value} accounts for exactly {expected} "
                       f"clients per round, but {cohort_size} took part")

  @abc.abstractmethod
  def aggregator(self):
    """The TFF `UnweightedAggregationFactory`, or None for TFF's default mean."""

  def noise_choices(self) -> dict[str, Any]:
    """What was derived for the aggregator, flat, for the run's log."""
    return {}

  def clip_norm(self, aggregator_metrics: Mapping[str, Any]) -> Optional[float]:
    """The clip norm a round used, from the aggregator's metrics."""
    del aggregator_metrics
    return self.spec.clip

  def verify_recorded_event(self, aggregator_state) -> None:
    """Raises RuntimeError if TFF's aggregator recorded another event than ours."""
    del aggregator_state

  @abc.abstractmethod
  def describe(self) -> list[str]:
    """What is protected and how, one line each."""


class NoDP(Mechanism):
  """No clipping, no noise: the non-private baseline."""

  mode = DPMode.NONE
  states_guarantee = False

  def release_event(self) -> dp_accounting.DpEvent:
    return dp_accounting.NonPrivateDpEvent()

  def aggregator(self):
    return None

  def clip_norm(self, aggregator_metrics):
    del aggregator_metrics
    return None

  def describe(self) -> list[str]:
    return ["dp_mode=none: no clipping or noise, epsilon = inf"]


class CentralGaussian(Mechanism):
  """The server clips each update to C and adds N(0, (zC)^2) once to the sum.

  Fixed clipping releases G(z) per round. Adaptive clipping (TFF's
  `gaussian_adaptive`, Andrew et al. 2021) releases the noised sum with the
  update multiplier z_v and a noised count of unclipped clients (TF Privacy's
  `QuantileEstimatorQuery`: records +-0.5, stddev s, i.e. multiplier 2s); TF
  Privacy's `QuantileAdaptiveClipSumQuery` reports
  ComposedDpEvent([G(z_v), G(2s)]), and z^-2 = z_v^-2 + (2s)^-2.
  """

  mode = DPMode.CENTRAL

  def noise_split(self) -> tuple[float, float]:
    """(z_v, s): the update multiplier and the clipped-count stddev (adaptive).

    TFF's `adaptive_clip_noise_params` rule, restated because importing TFF
    would cost the calculator seconds; a test pins the two to each other.
    """
    z, s = self.spec.noise_multiplier, self.spec.count_stddev
    if z == 0:
      return 0.0, s
    return (z**-2 - (2 * s)**-2)**-0.5, s

  def release_event(self) -> dp_accounting.DpEvent:
    if not self.spec.adaptive:
      return dp_accounting.GaussianDpEvent(self.spec.noise_multiplier)
    z_v, s = self.noise_split()
    # The order and structure of TF Privacy's QuantileAdaptiveClipSumQuery.
    return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(float(z_v)),
                                          dp_accounting.GaussianDpEvent(float(2 * s))])

  def aggregator(self):
    from tff_dpmed.privacy import central_dp  # TFF: only when a process is built.
    return central_dp.build_factory(self)

  def packed_parts(self, model, element_type, learning_rate: float, keras_model=None,
                   loss=None):
    """(client work, aggregator) for one-example clients sent in packs: each
    client's update clipped to C inside its pack, the sum noised as
    `aggregator()` noises it (`packed_clients`; `keras_model` and `loss`, what
    `model` was made of, let it clip without materialising per-client
    gradients). Fixed clipping only."""
    from tff_dpmed.privacy import central_dp, packed_clients  # TFF: only when built.
    client_work = packed_clients.build_packed_client_work(
        model, element_type=element_type, clip=self.spec.clip, learning_rate=learning_rate,
        keras_model=keras_model, loss=loss)
    return client_work, central_dp.build_packed_factory(self)

  def noise_choices(self) -> dict[str, Any]:
    s = self.spec
    z, n = s.noise_multiplier, float(s.clients_per_round)
    choices = {"dp_mode": "central", "clip_mode": s.clip_mode.value, "noise_multiplier": z,
               "clients_per_round": n, "noise_seeded": False}
    if not s.adaptive:
      choices.update(clip=s.clip, value_noise_multiplier=z, noise_stddev_of_sum=z * s.clip,
                     noise_stddev_of_mean=z * s.clip / n,
                     why=(f"fixed clip {s.clip:g}: the server adds N(0, ({z:g} * {s.clip:g})^2) "
                          f"to each coordinate of the sum and divides by {n:g} expected clients"))
      return choices
    value_z, stddev = self.noise_split()
    inflation = value_z / z if z > 0 else 1.0
    why = (f"z = {z:g} is the total effective multiplier; the update noise is inflated by "
           f"{inflation:.4f}x to z_v = {value_z:.4g} to pay for the private clipped count "
           f"(stddev {stddev:g}, {s.count_stddev_source}), since z^-2 = z_v^-2 + "
           "(2 * stddev)^-2" if z > 0 else
           "z = 0: adaptive clipping without noise, so no privacy guarantee; "
           f"clipped-count stddev {stddev:g}")
    choices.update(initial_clip=s.clip, target_unclipped_quantile=s.target_unclipped_quantile,
                   adaptive_clip_learning_rate=s.adaptive_clip_learning_rate,
                   clipped_count_stddev=stddev, clipped_count_stddev_source=s.count_stddev_source,
                   value_noise_multiplier=value_z, value_noise_inflation=inflation, why=why)
    return choices

  def clip_norm(self, aggregator_metrics):
    found = _find_key(aggregator_metrics, "clip")
    return float(found) if found is not None else self.spec.clip

  def verify_recorded_event(self, aggregator_state) -> None:
    from tensorflow_federated.python.aggregators import differential_privacy  # TFF-only path.
    self.check_event(differential_privacy.extract_dp_event_from_state(aggregator_state))

  def check_event(self, theirs: dp_accounting.DpEvent) -> None:
    """Raises RuntimeError unless `theirs` (as TFF recorded it) is our release event."""
    ours = self.release_event()
    problems: list[str] = []
    _compare_events(ours, theirs, "event", problems)
    if problems:
      raise RuntimeError(
          "the DP event TFF's aggregator recorded is not the one the privacy accounting "
          f"assumes ({'; '.join(problems)}); accounted: {ours}, TFF: {theirs}")

  def describe(self) -> list[str]:
    s = self.spec
    z, n, m = s.noise_multiplier, s.num_clients, s.clients_per_round
    lines = [f"sampling: Poisson, each client joins a round with q = {m}/{n} = {m / n:.6g}"
             if s.sampling is Sampling.POISSON else
             f"sampling: fixed-size cohorts of {m} of {n} clients, without replacement"
             if s.sampling is Sampling.FIXED else
             f"sampling: all {n} clients every round (no amplification)"]
    if self.neighboring_relation is events.NeighboringRelation.REPLACE_ONE:
      lines.append("neighbouring relation: replace one client (needed for fixed-size "
                   "sampling); the clipped sum moves by up to 2C, so the Gaussian is "
                   f"G(z/2) = G({z / 2:g})")
    else:
      lines.append("neighbouring relation: add/remove one client; the clipped sum moves by "
                   f"up to C, so the Gaussian is G(z) = G({z:g})")
    if s.adaptive:
      z_v, stddev = self.noise_split()
      lines.append(f"adaptive clipping: update noise z_v = {z_v:.6g} and clipped-count "
                   f"stddev {stddev:g} (multiplier {2 * stddev:g}) compose to exactly "
                   f"z = {z:g}")
    return lines


def tree_sensitivity_square_sum(rounds: int) -> int:
  """Sum over a tree's released nodes of (a client's contribution / C)^2, when the
  client is in every one of `rounds` rounds (leaves).

  The prefix sums of `rounds` leaves are read from the complete dyadic nodes:
  rounds // 2^h of them at height h, each summing 2^h of the client's clipped
  updates. (TF Privacy's dynamic programme for any participation pattern,
  `tree_aggregation_accountant`, gives the same; a test pins them.)
  """
  return sum((rounds >> h) * 4**h for h in range(max(rounds, 1).bit_length()))


class CentralTreeFTRL(Mechanism):
  """DP-FTRL (Kairouz et al. 2021): tree-aggregated noise on the prefix sums of rounds.

  Every hospital takes part in every round (no sampling, so nothing to
  amplify). The server clips each update to C, sums, and adds the noise of a
  binary tree over the rounds (TFF's `DifferentiallyPrivateFactory.
  tree_aggregation`, TF Privacy's `TreeResidualSumQuery`, Honaker's efficient
  estimator): each tree node has N(0, (zC)^2), and round t releases the
  difference of the noised prefix sums up to t and t-1, which the server
  optimizer applies. The rounds are not independent releases: together, the
  first T are the Gaussian mechanism on all tree nodes, whose sensitivity is
  sqrt(S(T)) C for a client in all T rounds (`tree_sensitivity_square_sum`),
  so they are one G(z / sqrt(S(T))) event (`run_event`). TF Privacy's tree
  queries record no DP event (UnsupportedDpEvent): this is the accounting.

  The tree's noise is drawn from seeds kept in the aggregator's state, so a
  checkpoint of the server state could replay it: the trainer keeps the
  checkpoints owner-only, saves one after every round before anything of the
  round is released (a resume never re-runs a released round with the same
  noise), and deletes them when the run finishes.
  """

  mode = DPMode.CENTRAL_TREE
  amplified_by_sampling = False
  state_holds_noise_seed = True

  def release_event(self) -> dp_accounting.DpEvent:
    """One tree node: the clipped sum of a round moves by C, noise zC."""
    return dp_accounting.GaussianDpEvent(self.spec.noise_multiplier)

  def run_event(self, rounds: int) -> dp_accounting.DpEvent:
    z = self.spec.noise_multiplier
    if rounds == 0:
      return dp_accounting.NoOpDpEvent()
    if z == 0:
      return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.GaussianDpEvent(z / math.sqrt(tree_sensitivity_square_sum(rounds)))

  @property
  def neighboring_relation(self) -> events.NeighboringRelation:
    return events.NeighboringRelation.ADD_OR_REMOVE_ONE

  def aggregator(self):
    from tff_dpmed.privacy import central_dp  # TFF: only when a process is built.
    return central_dp.build_tree_factory(self)

  def noise_choices(self) -> dict[str, Any]:
    s = self.spec
    z, n = s.noise_multiplier, float(s.clients_per_round)
    return {"dp_mode": "central_tree", "clip_mode": "fixed", "clip": s.clip,
            "noise_multiplier": z, "clients_per_round": n, "noise_stddev_per_tree_node": z * s.clip,
            "noise_seeded": False,
            "why": (f"fixed clip {s.clip:g}: each node of the tree over rounds gets "
                    f"N(0, ({z:g} * {s.clip:g})^2); round t applies the difference of the "
                    f"noised prefix sums to t and t-1, divided by {n:g} clients")}

  def describe(self) -> list[str]:
    s = self.spec
    return [f"sampling: all {s.num_clients} clients every round (DP-FTRL; no amplification)",
            "neighbouring relation: add/remove one client, who is in every round",
            f"tree aggregation: N(0, (zC)^2) per tree node, z = {s.noise_multiplier:g}; T rounds "
            "are one Gaussian mechanism G(z / sqrt(S(T))), S(T) = sum over the released nodes "
            "of the client's share squared (S(T) ~ 2 T^2)",
            "the aggregator's state holds the noise seeds: checkpoints are owner-only and "
            "deleted at the end of the run"]


class LocalGaussian(Mechanism):
  """Each client clips to C and adds N(0, (zC)^2) before its update leaves it.

  The server sees every noised update, so sampling does not amplify: one
  release is G(z/2) under replace-one (sensitivity 2C), and a client that
  took part in k rounds has k of them. The ledger reports the worst client.
  """

  mode = DPMode.LOCAL
  amplified_by_sampling = False

  def release_event(self) -> dp_accounting.DpEvent:
    return dp_accounting.GaussianDpEvent(self.spec.noise_multiplier)

  def compositions(self, rounds: int, max_participation: int) -> int:
    del rounds
    return max_participation

  def tracks_participation(self) -> bool:
    return True

  def check_cohort(self, cohort_size: int) -> None:
    del cohort_size  # Not amplified by sampling: any cohort is accounted the same.

  def aggregator(self):
    from tff_dpmed.privacy import local_dp  # TFF: only when a process is built.
    s = self.spec
    return local_dp.LocalGaussianFactory(clip=s.clip, noise_multiplier=s.noise_multiplier,
                                         seed=s.noise_seed)

  def noise_choices(self) -> dict[str, Any]:
    s = self.spec
    z, clip, seeded = s.noise_multiplier, s.clip, s.noise_seed is not None
    return {"dp_mode": "local", "clip_mode": "fixed", "clip": clip, "noise_multiplier": z,
            "noise_stddev_per_client": z * clip, "seeded": seeded,
            "why": (f"each client clips its whole update to L2 norm {clip:g} and adds "
                    f"N(0, ({z:g} * {clip:g})^2) per coordinate before sending; the server "
                    f"only averages, so the mean of n clients has noise stddev {z * clip:g} "
                    "/ sqrt(n)" + ("; SEEDED: reproducible and not private, debugging only"
                                   if seeded else ""))}

  def describe(self) -> list[str]:
    z = self.spec.noise_multiplier
    return ["local DP: each client noises its own update, so sampling does not amplify; "
            "neighbouring relation: replace one client, sensitivity 2C, "
            f"G(z/2) = G({z / 2:g}) per release; epsilon is for the worst-case client that "
            "takes part in every round"]


class ExampleDPSGD(Mechanism):
  """DP-SGD inside every client: patient-level (example-level) DP.

  Each local step Poisson-samples the client's examples with q_k = B / n_k,
  clips each example's gradient to C, adds N(0, (zC)^2) to the sum once and
  divides by B (fixed, so one example moves the step by at most C / B). One
  step releases PoissonSampled(q_k, G(z)) of each example's data; a round is
  `spec.local_steps(n_k)` of them. Every round is accounted for every client,
  whether it was sampled or not (no amplification by client sampling:
  conservative), and epsilon is that of the worst client size.

  The updates that leave a client are DP per example already, so the server
  need not be trusted for it; nothing else leaves a client (no metrics). With
  `client_dp=central` the server also clips and noises each client's update
  (`client_level()`), a client-level guarantee reported beside this one.
  """

  mode = DPMode.EXAMPLE
  privacy_unit = "example"
  samples_batches_itself = True

  def __init__(self, spec: DPSpec):
    super().__init__(spec)
    if not spec.client_sizes:
      raise ValueError("example-level DP needs the client sizes (DPSpec.client_sizes)")
    server = spec.client_level_spec()
    self._client_level = CentralGaussian(server) if server is not None else None

  def release_event(self) -> dp_accounting.DpEvent:
    """One DP-SGD step (unsampled): the clipped sum moves by C, noise zC."""
    return dp_accounting.GaussianDpEvent(self.spec.noise_multiplier)

  @property
  def neighboring_relation(self) -> events.NeighboringRelation:
    return events.NeighboringRelation.ADD_OR_REMOVE_ONE

  def accounted_event(self, single_gaussian: bool = False) -> dp_accounting.DpEvent:
    raise NotImplementedError("DP-SGD has one event per client size: use accounting_terms")

  def step_event(self, client_size: int) -> dp_accounting.DpEvent:
    """One local step of a client with `client_size` examples, as accounted."""
    release = self.release_event()
    if self.spec.noise_multiplier == 0 or not self.amplified:
      return dp_accounting.NonPrivateDpEvent()
    q = self.spec.sampling_rate(client_size)
    return release if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, release)

  @property
  def amplified(self) -> bool:
    # With --seed the batches and the noise are predictable: nothing is protected.
    return self.spec.noise_seed is None

  def accounting_terms(self, single_gaussian: bool = False):
    del single_gaussian  # Already single Gaussians.
    terms = []
    for n in sorted(set(self.spec.client_sizes)):
      term = (self.step_event(n), self.spec.local_steps(n))
      if term not in terms:  # One term for all sizes under a fixed rate.
        terms.append(term)
    return terms

  def weights_updates_by_size(self) -> bool:
    """Whether the server averages updates weighted by n_k (public), not uniformly."""
    return (self.spec.local_batching is LocalBatching.FIXED_RATE
            and self._client_level is None)

  def check_cohort(self, cohort_size: int) -> None:
    # Example-level accounting counts every round for every client; the
    # client-level layer accounts for the sampling it assumes.
    if self._client_level is not None:
      self._client_level.check_cohort(cohort_size)

  def client_level(self) -> Optional[Mechanism]:
    return self._client_level

  def aggregator(self):
    return self._client_level.aggregator() if self._client_level is not None else None

  def client_work(self, model, element_type, learning_rate: float):
    from tff_dpmed.privacy import example_dp  # TFF: only when a process is built.
    s = self.spec
    fixed_rate = s.local_batching is LocalBatching.FIXED_RATE
    any_size = s.client_sizes[0]  # Under a fixed rate, rate and steps are the same for all.
    return example_dp.build_dp_sgd_client_work(
        model, element_type=element_type, clip=s.clip, noise_multiplier=s.noise_multiplier,
        batch_size=s.batch_size, local_epochs=s.local_epochs, learning_rate=learning_rate,
        seed=s.noise_seed,
        sampling_rate=s.sampling_rate(any_size) if fixed_rate else None,
        steps=s.local_steps(any_size) if fixed_rate else None,
        weight_by_size=self.weights_updates_by_size())

  def clip_norm(self, aggregator_metrics):
    del aggregator_metrics
    return self.spec.clip

  def verify_recorded_event(self, aggregator_state) -> None:
    if self._client_level is not None:
      self._client_level.verify_recorded_event(aggregator_state)

  def noise_choices(self) -> dict[str, Any]:
    s = self.spec
    z, clip, b = s.noise_multiplier, s.clip, s.batch_size
    smallest = min(s.client_sizes)
    choices = {
        "dp_mode": "example", "clip": clip, "noise_multiplier": z, "expected_batch": b,
        "local_epochs": s.local_epochs, "smallest_client": smallest,
        "steps_per_round_smallest_client": s.local_steps(smallest),
        "noise_stddev_per_step": z * clip / b, "seeded": s.noise_seed is not None,
        "why": (f"each local step Poisson-samples examples with q = {b} / n_k, clips each "
                f"example's gradient to L2 norm {clip:g}, adds N(0, ({z:g} * {clip:g})^2) to "
                f"the sum and divides by {b}: gradient noise stddev {z * clip / b:.4g}"
                + ("; SEEDED: predictable, so not private (epsilon = inf)"
                   if s.noise_seed is not None else ""))}
    if self._client_level is not None:
      choices.update({f"client_level_{k}": v
                      for k, v in self._client_level.noise_choices().items()})
    return choices

  def describe(self) -> list[str]:
    s = self.spec
    sizes = sorted(set(s.client_sizes))
    lines = [f"DP-SGD in every client: Poisson batches with q_k = {s.batch_size} / n_k, "
             f"per-example clip {s.clip:g}, noise G(z) = G({s.noise_multiplier:g}) per step, "
             f"ceil({s.local_epochs} * n_k / {s.batch_size}) steps per round",
             "neighbouring relation: add/remove one example; every round counts for every "
             "client (client sampling is not used to amplify: conservative)",
             f"epsilon is the worst client's: sizes {sizes[0]}..{sizes[-1]} "
             f"({len(sizes)} distinct)"]
    if not self.amplified:
      lines.append("seeded batches and noise: predictable, so epsilon = inf")
    if self._client_level is not None:
      lines += ["client level (server): " + line for line in self._client_level.describe()]
    return lines


_BY_MODE: dict[DPMode, type[Mechanism]] = {
    DPMode.NONE: NoDP, DPMode.CENTRAL: CentralGaussian, DPMode.CENTRAL_TREE: CentralTreeFTRL,
    DPMode.LOCAL: LocalGaussian, DPMode.EXAMPLE: ExampleDPSGD}


def for_spec(spec: DPSpec) -> Mechanism:
  """The mechanism `spec` asks for."""
  return _BY_MODE[spec.mode](spec)


def class_for(mode: DPMode) -> type[Mechanism]:
  """The mechanism class of `mode` (its class attributes, before z is calibrated)."""
  return _BY_MODE[mode]


def require_calibrated(spec: DPSpec) -> DPSpec:
  if spec.noise_multiplier is None:
    raise UsageError(f"--dp_mode={spec.mode.value} needs --noise_multiplier or "
                     "--target_epsilon")
  return spec


def _find_key(tree, key):
  if isinstance(tree, Mapping):
    if key in tree:
      return tree[key]
    for value in tree.values():
      found = _find_key(value, key)
      if found is not None:
        return found
  return None


def _compare_events(ours: dp_accounting.DpEvent, theirs: dp_accounting.DpEvent,
                    path: str, problems: list[str]) -> None:
  # TFF's multipliers may be numpy float32: compare values, never compose them.
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
        _compare_events(a, b, f"{path}[{k}]", problems)
  elif ours != theirs:
    problems.append(f"{path}: {ours} accounted, TFF has {theirs}")


__all__: Sequence[str] = ("CentralGaussian", "CentralTreeFTRL", "ExampleDPSGD", "LocalGaussian",
                          "Mechanism", "NoDP", "class_for", "for_spec", "require_calibrated")
