"""DP events: wrapping a mechanism's own event in the sampling the program does.

A mechanism reports one release as a `dp_accounting.DpEvent` in TF Privacy's
convention (Gaussian multipliers = stddev / C, i.e. relative to the add/remove
sensitivity). This module only adds what the *program* contributes: the
neighbouring relation that the sampling scheme needs, and the sampling
wrapper (Poisson, without replacement, or none).

- poisson: add/remove one client; PoissonSampledDpEvent(q, event).
- fixed: a uniformly random cohort of exactly m clients. Its amplification
  needs replace-one neighbours, under which the clipped sum moves by up to 2C,
  so every Gaussian is G(z/2) (see `_REPLACE_ONE_SCALE`).
- all: the event as it is (no amplification).
- mechanisms that are not amplified by sampling (local DP: the server sees
  each noised update) get replace-one and no wrapper.
"""

import math

import dp_accounting

from tff_dpmed.privacy.spec import Sampling

NeighboringRelation = dp_accounting.NeighboringRelation

# `GaussianDpEvent.noise_multiplier` is stddev / C (dp_accounting's docstring),
# which is stddev / sensitivity only under add/remove. dp_accounting 0.4.3's
# RDP accountant feeds the inner multiplier of a SampledWithoutReplacementDpEvent
# straight into the replace-one bound of Wang, Balle & Kasiviswanathan (2019),
# where it must be stddev / sensitivity = stddev / 2C (google/differential-privacy
# issue #378). So we halve every multiplier under replace-one ourselves;
# `accounting._check_wor_convention` fails loudly if dp_accounting changes.
_REPLACE_ONE_SCALE = 0.5


def neighboring_relation(sampling: Sampling, amplified_by_sampling: bool) -> NeighboringRelation:
  """Add/remove one client, or replace one (fixed-size sampling, unamplified mechanisms)."""
  if not amplified_by_sampling or sampling is Sampling.FIXED:
    return NeighboringRelation.REPLACE_ONE
  return NeighboringRelation.ADD_OR_REMOVE_ONE


def sampled_event(release: dp_accounting.DpEvent, sampling: Sampling, num_clients: int,
                  clients_per_round: int, amplified_by_sampling: bool,
                  amplify: bool = True, single_gaussian: bool = False) -> dp_accounting.DpEvent:
  """The event one accounting step composes: `release` under the program's sampling.

  Args:
    release: The mechanism's own event for one release (add/remove convention).
    sampling: How cohorts are drawn.
    num_clients, clients_per_round: N and the expected cohort size.
    amplified_by_sampling: False when an observer sees each release on its own
      (local DP): then only the replace-one rescaling applies.
    single_gaussian: Replace a composition of Gaussians by the one Gaussian it
      equals (exact; PLD cannot take a composition inside a sampled event).
    amplify: False when the cohorts are predictable (seeded sampling): the
      sampling wrapper is dropped, the neighbouring relation stays.

  Returns:
    NonPrivateDpEvent when the release has no noise.
  """
  if _noise_free(release):
    return dp_accounting.NonPrivateDpEvent()
  if neighboring_relation(sampling, amplified_by_sampling) is NeighboringRelation.REPLACE_ONE:
    release = scale_gaussians(release, _REPLACE_ONE_SCALE)
  if single_gaussian and isinstance(release, dp_accounting.ComposedDpEvent):
    release = dp_accounting.GaussianDpEvent(effective_noise_multiplier(release))
  if not (amplified_by_sampling and amplify) or sampling is Sampling.ALL:
    return release
  if sampling is Sampling.POISSON:
    return dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients, release)
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, clients_per_round, release)


def _noise_free(event: dp_accounting.DpEvent) -> bool:
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    return True
  try:
    return effective_noise_multiplier(event) == 0
  except ValueError:
    return False


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


def scale_gaussians(event: dp_accounting.DpEvent, factor: float) -> dp_accounting.DpEvent:
  """`event` with every Gaussian multiplier times `factor` (a sensitivity change)."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return dp_accounting.GaussianDpEvent(float(event.noise_multiplier) * factor)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([scale_gaussians(e, factor) for e in event.events])
  raise ValueError(f"cannot rescale {event}")


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
