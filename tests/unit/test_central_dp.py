"""Central DP aggregators, DPConfig validation and the aggregator dispatch.

Each TFF process is built once per module (tracing and compiling a new
computation costs seconds) and run on the session's `tff_runtime`.
"""

import math

import numpy as np
import pytest
from scipy import stats
import tensorflow_federated as tff

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import local_dp
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy import safe_updates
from tff_dpmed.privacy.spec import DPSpec

DIM = 20_000
# Two-sided false-failure probability of each statistical check.
ALPHA = 1e-6


def _spec(mode="central", expected_clients_per_round=1, seed=None, **kwargs) -> DPSpec:
  """A DPSpec in the words of the aggregator tests (expected cohort, seed)."""
  kwargs.setdefault("noise_multiplier", 0.0)
  cohort = expected_clients_per_round
  return DPSpec(mode=mode, num_clients=max(100, cohort) if isinstance(cohort, int) else 100,
                clients_per_round=cohort, noise_seed=seed if mode == "local" else None,
                **kwargs)


def _central(**kwargs) -> DPSpec:
  return _spec(mode="central", **kwargs)


def _factory(spec: DPSpec):
  """What training aggregates with: the mechanism's factory behind the overflow guard."""
  mechanism = mechanisms.for_spec(spec)
  return safe_updates.bounded(mechanism.aggregator()), mechanism.noise_choices()


def _build(cfg: DPSpec, dim: int):
  factory, choices = _factory(cfg)
  return factory.create(tff.TensorType(np.float32, [dim])), choices


def _clip_in(state) -> float:
  """The clip norm an adaptive DP state will use in its next round."""
  return float(state.query_state.numerator_state.sum_state.l2_norm_clip)


def _std_interval(dim: int, sigma: float) -> tuple[float, float]:
  """Interval for the RMS of `dim` iid N(0, sigma^2) draws (mean known to be 0)."""
  lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], dim)
  return sigma * math.sqrt(lo / dim), sigma * math.sqrt(hi / dim)


# --- Processes, one per configuration, shared by the tests below.

FIXED_Z, FIXED_CLIP, FIXED_N = 1.1, 0.5, 4


@pytest.fixture(scope="module")
def fixed_noisy():
  return _build(_central(noise_multiplier=FIXED_Z, clip_mode="fixed", clip=FIXED_CLIP,
                         expected_clients_per_round=FIXED_N), DIM)


@pytest.fixture(scope="module")
def fixed_clean():
  return _build(_central(noise_multiplier=0.0, clip_mode="fixed", clip=FIXED_CLIP,
                         expected_clients_per_round=FIXED_N), DIM)


ADAPTIVE_DIM, ADAPTIVE_N = 10, 3


@pytest.fixture(scope="module")
def adaptive_clean():
  return _build(_central(noise_multiplier=0.0, clip_mode="adaptive", clip=0.1,
                         target_unclipped_quantile=0.5, adaptive_clip_learning_rate=0.2,
                         expected_clients_per_round=ADAPTIVE_N), ADAPTIVE_DIM)


# --- Statistical behaviour.


def test_std_interval_detects_a_10_percent_error():
  # The check below must be able to fail: a 10% wrong std falls outside.
  lo, hi = _std_interval(DIM, 1.0)
  assert 0.9 < lo < 1.0 < hi < 1.1


def test_fixed_noise_std_is_z_times_clip_over_clients(tff_runtime, fixed_noisy):
  process, choices = fixed_noisy
  zeros = [np.zeros(DIM, np.float32)] * FIXED_N
  out = process.next(process.initialize(), zeros)
  result = np.asarray(out.result, np.float64)
  sigma = FIXED_Z * FIXED_CLIP / FIXED_N
  assert choices["noise_stddev_of_mean"] == pytest.approx(sigma)
  lo, hi = _std_interval(DIM, sigma)
  rms = math.sqrt(np.mean(result**2))
  assert lo <= rms <= hi, (rms, sigma)
  # Mean of DIM draws: |mean| < 5 standard errors.
  assert abs(result.mean()) < 5 * sigma / math.sqrt(DIM)


def test_fixed_noise_is_fresh_each_round(tff_runtime, fixed_noisy):
  process, _ = fixed_noisy
  state = process.initialize()
  zeros = [np.zeros(DIM, np.float32)] * FIXED_N
  first = process.next(state, zeros).result
  second = process.next(state, zeros).result
  assert not np.allclose(first, second)


def test_fixed_clipping_bounds_huge_updates(tff_runtime, fixed_clean):
  process, _ = fixed_clean
  rng = np.random.default_rng(0)
  huge = []
  for _ in range(FIXED_N):
    direction = rng.normal(size=DIM)
    huge.append((1e3 * FIXED_CLIP * direction / np.linalg.norm(direction)).astype(np.float32))
  result = np.asarray(process.next(process.initialize(), huge).result)
  # Each update is scaled to norm C; the mean of FIXED_N of them has norm <= C.
  assert np.linalg.norm(result) <= FIXED_CLIP * (1 + 1e-5)
  expected = np.mean([h * (FIXED_CLIP / np.linalg.norm(h)) for h in huge], axis=0)
  np.testing.assert_allclose(result, expected, atol=1e-6)


def test_fixed_clipping_leaves_small_updates_alone(tff_runtime, fixed_clean):
  process, _ = fixed_clean
  small = [np.full(DIM, 0.1 * FIXED_CLIP / math.sqrt(DIM), np.float32)] * FIXED_N
  result = np.asarray(process.next(process.initialize(), small).result)
  np.testing.assert_allclose(result, small[0], rtol=1e-5)


def test_adaptive_result_norm_within_state_clip(tff_runtime, adaptive_clean):
  process, _ = adaptive_clean
  state = process.initialize()
  huge = [np.full(ADAPTIVE_DIM, 100.0, np.float32)] * ADAPTIVE_N
  for _ in range(3):
    clip = _clip_in(state)
    out = process.next(state, huge)
    assert np.linalg.norm(out.result) <= clip * (1 + 1e-5)
    # All clients clipped, so the mean is exactly one clipped update.
    assert np.linalg.norm(out.result) == pytest.approx(clip, rel=1e-5)
    state = out.state


def test_adaptive_clip_grows_toward_target_quantile(tff_runtime, adaptive_clean):
  process, _ = adaptive_clean
  state = process.initialize()
  assert _clip_in(state) == pytest.approx(0.1)
  unit_norm = [np.full(ADAPTIVE_DIM, 1 / math.sqrt(ADAPTIVE_DIM), np.float32)] * ADAPTIVE_N
  clips = [0.1]
  for _ in range(5):
    out = process.next(state, unit_norm)
    state = out.state
    clips.append(float(out.measurements["dp_query_metrics"]["clip"]))
    assert clips[-1] == pytest.approx(_clip_in(state))
  # Every norm (1.0) is above the clip, so each round the clip grows by the
  # geometric step exp(lr * target_quantile) = exp(0.2 * 0.5).
  np.testing.assert_allclose(np.diff(np.log(clips)), 0.1, rtol=1e-4)
  assert clips[-1] < 1.0


def test_adaptive_clip_shrinks_when_updates_are_small(tff_runtime, adaptive_clean):
  process, _ = adaptive_clean
  state = process.initialize()
  tiny = [np.full(ADAPTIVE_DIM, 1e-4, np.float32)] * ADAPTIVE_N
  out = process.next(state, tiny)
  assert _clip_in(out.state) == pytest.approx(0.1 * math.exp(-0.2 * 0.5), rel=1e-4)


# --- Small cohorts and the clipped-count stddev.


def test_small_cohort_adaptive_builds_and_runs(tff_runtime):
  cfg = _central(noise_multiplier=1.1, clip_mode="adaptive", clip=0.1,
                 expected_clients_per_round=3)
  process, choices = _build(cfg, 4)
  assert choices["clipped_count_stddev"] == pytest.approx(1.1)
  assert choices["clipped_count_stddev_source"].startswith("automatic")
  # z^-2 = z_v^-2 + (2 s)^-2 with s = z gives z_v = z / sqrt(3/4).
  assert choices["value_noise_multiplier"] == pytest.approx(1.1 / math.sqrt(0.75))
  assert choices["value_noise_inflation"] == pytest.approx(1 / math.sqrt(0.75))
  assert "inflated by 1.1547x" in choices["why"]
  out = process.next(process.initialize(), [np.ones(4, np.float32)] * 3)
  assert np.all(np.isfinite(out.result))
  # The query really uses the inflated value noise.
  state = out.state.query_state.numerator_state
  assert float(state.noise_multiplier) == pytest.approx(1.1 / math.sqrt(0.75), rel=1e-6)


def test_tff_default_stddev_would_fail_for_small_cohort():
  # The reason for choose_clipped_count_stddev: TFF's 0.05 * n needs n >= 12 at z = 1.1.
  with pytest.raises(ValueError, match="too low"):
    tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=1.1, clients_per_round=3.0)


@pytest.mark.parametrize("z, n, expected", [
    (0.0, 3, 0.0),
    (1.1, 3, 1.1),
    (1.1, 100, 5.0),
    (0.5, 10, 0.5),
])
def test_automatic_clipped_count_stddev(z, n, expected):
  _, choices = _factory(
      _central(noise_multiplier=z, expected_clients_per_round=n))
  assert choices["clipped_count_stddev"] == pytest.approx(expected)
  assert z < 2 * expected or z == 0


def test_large_cohort_keeps_tff_default_stddev():
  _, choices = _factory(
      _central(noise_multiplier=1.1, expected_clients_per_round=100))
  assert choices["clipped_count_stddev"] == pytest.approx(5.0)
  assert choices["value_noise_inflation"] < 1.01


def test_explicit_too_small_stddev_is_a_usage_error():
  with pytest.raises(UsageError) as e:  # At construction: a DPSpec that exists is valid.
    _central(noise_multiplier=1.1, expected_clients_per_round=3, clipped_count_stddev=0.15)
  message = str(e.value)
  assert "\n" not in message
  assert "--clipped_count_stddev" in message and "0.55" in message
  assert "2 * clipped_count_stddev" in message


def test_explicit_sufficient_stddev_is_used():
  _, choices = _factory(
      _central(noise_multiplier=1.1, expected_clients_per_round=3, clipped_count_stddev=2.0))
  assert choices["clipped_count_stddev"] == 2.0
  assert choices["clipped_count_stddev_source"] == "given by --clipped_count_stddev"
  assert choices["value_noise_multiplier"] == pytest.approx((1.1**-2 - 4.0**-2)**-0.5)


# --- Validation and dispatch (no TFF execution).


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(mode="centre"), "--dp_mode"),
    (dict(mode="central", clip_mode="auto"), "--clip_mode"),
    (dict(mode="central", noise_multiplier=-0.1), "--noise_multiplier"),
    (dict(mode="central", noise_multiplier=float("nan")), "--noise_multiplier"),
    (dict(mode="central", noise_multiplier=float("inf")), "--noise_multiplier"),
    (dict(mode="central", clip=0.0), "--clip"),
    (dict(mode="central", clip=float("nan")), "--clip"),
    (dict(mode="central", clip=-1.0), "--clip"),
    (dict(mode="central", target_unclipped_quantile=0.0), "--target_unclipped_quantile"),
    (dict(mode="central", target_unclipped_quantile=1.0), "--target_unclipped_quantile"),
    (dict(mode="central", adaptive_clip_learning_rate=-0.1), "--adaptive_clip_learning_rate"),
    (dict(mode="central", expected_clients_per_round=0), "--clients_per_round"),
    (dict(mode="central", clip=1e-40), "--clip"),
    (dict(mode="central", clip=1e39), "--clip"),
    (dict(mode="central", noise_multiplier=3.5e38), "--noise_multiplier"),
    (dict(mode="central", clip_mode="fixed", clipped_count_stddev=1.0),
     "--clipped_count_stddev"),
    (dict(mode="central", clipped_count_stddev=-1.0), "--clipped_count_stddev"),
    (dict(mode="local", clip_mode="adaptive"), "--clip_mode=fixed"),
    (dict(mode="none", noise_multiplier=1.0), "--noise_multiplier"),
    (dict(mode="local", clip_mode="fixed", seed=2**64), "--seed"),
    (dict(mode="central", noise_multiplier="1.1"), "--noise_multiplier"),
])
def test_validate_rejects_bad_config(kwargs, fragment):
  with pytest.raises(UsageError) as e:
    _spec(**kwargs)
  assert fragment in str(e.value)
  assert "\n" not in str(e.value)


def test_validate_accepts_good_configs():
  _spec(mode="none")
  _central(noise_multiplier=1.1, expected_clients_per_round=3)
  _central(clip_mode="fixed", noise_multiplier=0.0, clip=1)
  _spec(mode="local", clip_mode="fixed", noise_multiplier=2.0, seed=7)


def test_dispatch_none_keeps_tff_default():
  mechanism = mechanisms.for_spec(_spec(mode="none"))
  assert mechanism.aggregator() is None and mechanism.noise_choices() == {}


def test_dispatch_central():
  mechanism = mechanisms.for_spec(_central(noise_multiplier=1.0, clip_mode="fixed", clip=0.2,
                                           expected_clients_per_round=5))
  assert isinstance(mechanism.aggregator(), tff.aggregators.DifferentiallyPrivateFactory)
  choices = mechanism.noise_choices()
  assert choices["dp_mode"] == "central" and choices["clip"] == 0.2


def test_dispatch_local():
  mechanism = mechanisms.for_spec(_spec(mode="local", clip_mode="fixed", noise_multiplier=1.0,
                                        clip=0.2))
  assert isinstance(mechanism.aggregator(), local_dp.LocalGaussianFactory)
  assert mechanism.noise_choices()["noise_stddev_per_client"] == pytest.approx(0.2)


def test_overflowing_update_is_clipped_not_nan(tff_runtime, fixed_clean):
  # Finite entries whose squares overflow float32: tf.clip_by_global_norm gives NaN.
  process, _ = fixed_clean
  for magnitude in (2e19, 1e20, 3e38):
    huge = np.full(DIM, magnitude, np.float32)
    normal = np.full(DIM, 0.1 * FIXED_CLIP / math.sqrt(DIM), np.float32)
    result = np.asarray(process.next(process.initialize(), [huge, normal, normal, normal]).result)
    assert np.all(np.isfinite(result)), magnitude
    # The huge update counts as one update of norm C: the mean stays <= C.
    assert np.linalg.norm(result) <= FIXED_CLIP * (1 + 1e-5)
    expected = (np.full(DIM, FIXED_CLIP / math.sqrt(DIM)) + 3 * normal) / FIXED_N
    np.testing.assert_allclose(result, expected, rtol=1e-4)
  nan_update = np.full(DIM, np.nan, np.float32)
  result = np.asarray(process.next(process.initialize(), [nan_update] + [normal] * 3).result)
  np.testing.assert_allclose(result, 3 * normal / FIXED_N, rtol=1e-5)  # Zeroed, not NaN.
