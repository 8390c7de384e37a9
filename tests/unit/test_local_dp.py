"""Local DP: clients clip and noise their own updates; the server only averages.

Each TFF process is built once per module and run on the session's
`tff_runtime`; tests vary the client values and the state, not the process.
"""

import collections
import copy
import math

import numpy as np
import pytest
from scipy import stats
import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy import local_dp
from tff_dpmed.privacy.spec import DPSpec

DIM = 20_000
Z, CLIP = 1.0, 1.0
SEED = 1234
# Two-sided false-failure probability of each statistical check.
ALPHA = 1e-6
VECTOR = tff.TensorType(np.float32, [DIM])
STRUCT = tff.to_type(collections.OrderedDict(
    a=tff.TensorType(np.float32, [3]), b=tff.TensorType(np.float32, [2, 2])))


def _std_interval(dim: int, sigma: float, alpha: float = ALPHA) -> tuple[float, float]:
  """Interval for the RMS of `dim` iid N(0, sigma^2) draws (mean known to be 0)."""
  lo, hi = stats.chi2.ppf([alpha / 2, 1 - alpha / 2], dim)
  return sigma * math.sqrt(lo / dim), sigma * math.sqrt(hi / dim)


def _rms(x) -> float:
  return math.sqrt(np.mean(np.square(np.asarray(x, np.float64))))


def _assert_noise_std(noise, sigma: float) -> None:
  lo, hi = _std_interval(np.size(noise), sigma)
  assert lo <= _rms(noise) <= hi, (_rms(noise), sigma)
  assert abs(np.mean(noise)) < 5 * sigma / math.sqrt(np.size(noise))


def _updates(n: int, norm: float, seed: int = 0) -> list[np.ndarray]:
  """`n` known client updates in random directions, each of L2 norm `norm`."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    u = rng.normal(size=DIM)
    out.append((norm * u / np.linalg.norm(u)).astype(np.float32))
  return out


class _ClientNoiseInspector(tff.aggregators.UnweightedAggregationFactory):
  """A mean that also reports min over clients of the RMS of the value it receives.

  Plugged in as `mean_factory`, it sees exactly the CLIENTS-placed values the
  local-DP process hands to the server-side aggregation.
  """

  def create(self, value_type):

    @tff.tensorflow.computation(value_type)
    def rms(value):
      return tf.sqrt(tf.reduce_mean(tf.square(value)))

    @tff.federated_computation()
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      return tff.templates.MeasuredProcessOutput(
          state=state,
          result=tff.federated_mean(value),
          measurements=tff.federated_min(tff.federated_map(rms, value)))

    return tff.templates.AggregationProcess(init_fn, next_fn)


# --- Processes, one per configuration, shared by the tests below.


@pytest.fixture(scope="module")
def unseeded():
  factory = mechanisms.for_spec(
      DPSpec(mode="local", clip_mode="fixed", noise_multiplier=Z, clip=CLIP)).aggregator()
  return factory.create(VECTOR)


@pytest.fixture(scope="module")
def seeded():
  factory = mechanisms.for_spec(DPSpec(mode="local", clip_mode="fixed", noise_multiplier=Z,
                                       clip=CLIP, noise_seed=SEED)).aggregator()
  return factory.create(VECTOR)


@pytest.fixture(scope="module")
def clean_struct():
  return local_dp.LocalGaussianFactory(clip=CLIP, noise_multiplier=0.0).create(STRUCT)


INSPECTED_DIM = 2_000


@pytest.fixture(scope="module")
def inspected():
  factory = local_dp.LocalGaussianFactory(clip=CLIP, noise_multiplier=Z,
                                          mean_factory=_ClientNoiseInspector())
  return factory.create(tff.TensorType(np.float32, [INSPECTED_DIM]))


def _with_seed(state, seed: int):
  state = copy.deepcopy(state)
  state["noise"]["seed"] = seed
  return state


# --- Noise level and placement.


def test_std_interval_detects_a_10_percent_error():
  lo, hi = _std_interval(DIM, 1.0)
  assert 0.9 < lo < 1.0 < hi < 1.1


def test_mean_noise_std_is_z_clip_over_sqrt_n(tff_runtime, unseeded):
  n = 5
  updates = _updates(n, 0.5 * CLIP)  # below the clip norm: clipping is a no-op
  out = unseeded.next(unseeded.initialize(), updates)
  _assert_noise_std(np.asarray(out.result) - np.mean(updates, axis=0),
                    Z * CLIP / math.sqrt(n))


def test_identical_clients_get_different_noise(tff_runtime, unseeded):
  # Identical noise on both would leave std z*C in the mean, not z*C/sqrt(2).
  zeros = [np.zeros(DIM, np.float32)] * 2
  out = unseeded.next(unseeded.initialize(), zeros)
  _assert_noise_std(out.result, Z * CLIP / math.sqrt(2))


def test_unseeded_runs_differ(tff_runtime, unseeded):
  state = unseeded.initialize()
  zeros = [np.zeros(DIM, np.float32)]
  first = unseeded.next(state, zeros).result
  second = unseeded.next(state, zeros).result
  assert not np.allclose(first, second)


def test_noise_is_added_on_the_clients(tff_runtime, inspected):
  # Clients send zeros, so any spread in what the server-side mean receives
  # is noise that was added at CLIENTS placement; a server-side noise
  # implementation would hand it zeros (RMS 0).
  n = 3
  out = inspected.next(inspected.initialize(), [np.zeros(INSPECTED_DIM, np.float32)] * n)
  lo, _ = _std_interval(INSPECTED_DIM, Z * CLIP, ALPHA / n)
  assert float(out.measurements["mean"]) >= lo
  next_type = inspected.next.type_signature
  assert next_type.parameter[1].placement is tff.CLIENTS


# --- Clipping.


def test_single_huge_client_is_clipped_to_exactly_clip(tff_runtime, clean_struct):
  value = collections.OrderedDict(a=np.array([300.0, 0.0, -400.0], np.float32),
                                  b=np.full([2, 2], 600.0, np.float32))
  out = clean_struct.next(clean_struct.initialize(), [value])
  flat = np.concatenate([np.ravel(out.result["a"]), np.ravel(out.result["b"])])
  assert np.linalg.norm(flat) == pytest.approx(CLIP, rel=1e-6)
  # One global norm over the whole structure: every tensor is scaled alike.
  scale = CLIP / np.linalg.norm(np.concatenate([value["a"], np.ravel(value["b"])]))
  np.testing.assert_allclose(out.result["a"], value["a"] * scale, rtol=1e-5)
  np.testing.assert_allclose(out.result["b"], value["b"] * scale, rtol=1e-5)


def test_each_client_is_clipped_before_averaging(tff_runtime, clean_struct):
  huge = collections.OrderedDict(a=np.array([1e3, 0.0, 0.0], np.float32),
                                 b=np.zeros([2, 2], np.float32))
  small = collections.OrderedDict(a=np.zeros(3, np.float32),
                                  b=np.array([[0.0, 0.1], [0.0, 0.0]], np.float32))
  out = clean_struct.next(clean_struct.initialize(), [huge, small])
  # Clipping the mean instead would give [0.995, 0, 0] in a.
  np.testing.assert_allclose(out.result["a"], [CLIP / 2, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out.result["b"], small["b"] / 2, rtol=1e-6)


def test_many_huge_clients_mean_norm_within_clip(tff_runtime, clean_struct):
  rng = np.random.default_rng(1)
  values = [collections.OrderedDict(a=(1e3 * rng.normal(size=3)).astype(np.float32),
                                    b=(1e3 * rng.normal(size=[2, 2])).astype(np.float32))
            for _ in range(4)]
  out = clean_struct.next(clean_struct.initialize(), values)
  flat = np.concatenate([np.ravel(out.result["a"]), np.ravel(out.result["b"])])
  assert np.linalg.norm(flat) <= CLIP * (1 + 1e-6)


# --- Seeding.


def test_same_seed_same_result(tff_runtime, seeded):
  state = seeded.initialize()
  updates = _updates(3, 0.5 * CLIP)
  first = seeded.next(state, updates).result
  second = seeded.next(state, updates).result
  np.testing.assert_array_equal(first, second)


def test_different_seed_different_result(tff_runtime, seeded):
  state = seeded.initialize()
  assert state["noise"]["seed"] == SEED
  updates = _updates(3, 0.5 * CLIP)
  first = seeded.next(state, updates).result
  other = seeded.next(_with_seed(state, SEED + 1), updates).result
  assert not np.allclose(first, other)


def test_seeded_noise_is_fresh_each_round(tff_runtime, seeded):
  state = seeded.initialize()
  updates = _updates(3, 0.5 * CLIP)
  out1 = seeded.next(state, updates)
  assert out1.state["noise"]["round_num"] == 1
  assert out1.state["noise"]["seed"] == SEED
  out2 = seeded.next(out1.state, updates)
  assert not np.allclose(out1.result, out2.result)


def test_seeded_clients_with_different_updates_get_independent_noise(tff_runtime, seeded):
  # Differ only in one coordinate, so only the fingerprint tells them apart.
  u1 = np.zeros(DIM, np.float32)
  u2 = u1.copy()
  u2[0] = 1e-3
  out = seeded.next(seeded.initialize(), [u1, u2])
  noise = np.asarray(out.result) - (u1 + u2) / 2
  _assert_noise_std(noise, Z * CLIP / math.sqrt(2))


# --- State, measurements and configuration.


def test_measurements_are_constants_only(tff_runtime, unseeded):
  out = unseeded.next(unseeded.initialize(), _updates(2, 10 * CLIP))
  # Nothing per client (e.g. how many were clipped) may be released.
  assert set(out.measurements) == {"clip", "noise_stddev", "mean"}
  assert out.measurements["clip"] == pytest.approx(CLIP)
  assert out.measurements["noise_stddev"] == pytest.approx(Z * CLIP)
  assert out.measurements["mean"] == ()
  assert out.state["noise"]["round_num"] == 1
  assert "seed" not in out.state["noise"]


def test_choices_describe_the_mechanism():
  choices = mechanisms.for_spec(DPSpec(mode="local", clip_mode="fixed", noise_multiplier=1.5,
                                       clip=0.2, noise_seed=3)).noise_choices()
  assert choices["noise_stddev_per_client"] == pytest.approx(0.3)
  assert choices["seeded"] is True
  assert "not private" in choices["why"]


def test_adaptive_clipping_with_local_dp_is_a_usage_error():
  with pytest.raises(UsageError) as e:
    DPSpec(mode="local", clip_mode="adaptive", noise_multiplier=1.0)
  assert "--clip_mode=fixed" in str(e.value) and "\n" not in str(e.value)


def test_overflowing_update_is_clipped_before_noise(tff_runtime, clean_struct):
  # Entries whose squares overflow float32 made tf.clip_by_global_norm return NaN.
  for magnitude in (2e19, 3e38):
    value = collections.OrderedDict(a=np.full(3, magnitude, np.float32),
                                    b=np.full((2, 2), magnitude, np.float32))
    out = clean_struct.next(clean_struct.initialize(), [value]).result
    flat = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
    assert np.all(np.isfinite(flat)), magnitude
    assert np.linalg.norm(flat) == pytest.approx(CLIP, rel=1e-5)
  value = collections.OrderedDict(a=np.array([np.inf, 1, 1], np.float32), b=np.ones((2, 2), np.float32))
  out = clean_struct.next(clean_struct.initialize(), [value]).result
  assert np.all(np.asarray(out["a"]) == 0) and np.all(np.asarray(out["b"]) == 0)


@pytest.mark.parametrize("kwargs", [dict(clip=0.0, noise_multiplier=1.0),
                                    dict(clip=1.0, noise_multiplier=-1.0),
                                    dict(clip=float("nan"), noise_multiplier=1.0),
                                    dict(clip=1.0, noise_multiplier=1.0, seed=1.5)])
def test_factory_rejects_bad_arguments(kwargs):
  with pytest.raises(UsageError):
    local_dp.LocalGaussianFactory(**kwargs)


def test_factory_rejects_non_float_values():
  factory = local_dp.LocalGaussianFactory(clip=1.0, noise_multiplier=1.0)
  with pytest.raises(TypeError, match="float"):
    factory.create(tff.TensorType(np.int32, [3]))
