"""Example-level DP (`--dp_mode=example`): DP-SGD inside each client, and its accounting.

The client work is built once per setting and run on the session's
`tff_runtime`; the accounting is checked against independent `dp_accounting`
compositions.
"""

import collections
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import process as process_lib
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy import example_dp
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.spec import DPSpec

INFO = DatasetInfo(name="tiny", task="binary-class", class_names=("a", "b"),
                   image_shape=(8, 8, 1))
ELEMENT = collections.OrderedDict(x=tf.TensorSpec([None, 8, 8, 1], tf.float32),
                                  y=tf.TensorSpec([None], tf.int32),
                                  client=tf.TensorSpec([], tf.int64))
ALPHA = 1e-6  # Two-sided false-failure probability of each statistical check.


def _model():
  spec = collections.OrderedDict(x=ELEMENT["x"], y=ELEMENT["y"])
  return process_lib.make_functional_model("cnn", INFO, spec, seed=3)


def _spec(**overrides) -> DPSpec:
  fields = dict(mode="example", noise_multiplier=1.1, num_clients=3, clients_per_round=3,
                sampling="all", clip_mode="fixed", clip=1.0, batch_size=20, local_epochs=2,
                client_sizes=(100, 200, 300))
  fields.update(overrides)
  return DPSpec(**fields)


def _client_dataset(n: int, client: int = 0, seed: int = 0) -> tf.data.Dataset:
  rng = np.random.default_rng(seed)
  return tf.data.Dataset.from_tensors(collections.OrderedDict(
      x=rng.random((n, 8, 8, 1), dtype=np.float32),
      y=rng.integers(0, 2, n).astype(np.int32),
      client=np.int64(client)))


def _weights(model):
  return process_lib.tff.learning.models.ModelWeights(*model.initial_weights)


def _delta(work, model, datasets, state=None) -> list[np.ndarray]:
  state = work.initialize() if state is None else state
  out = work.next(state, [_weights(model)] * len(datasets), datasets)
  return [np.concatenate([np.ravel(u) for u in r.update]) for r in out.result]


# --- The client work ---------------------------------------------------------

@pytest.mark.parametrize("n", [10, 11])
def test_noise_std_per_step_is_z_clip_over_expected_batch(tff_runtime, n):
  # A clip so small that the gradients vanish next to the noise: the update is
  # lr * sum over the steps of N(0, (zC)^2) / B, i.e. stddev lr sqrt(T) z C / B,
  # with T = ceil(E n / B) steps (2 for n=10, 3 for n=11: the accounted count).
  z, clip, batch, lr = 1e4, 1e-4, 5, 1.0
  model = _model()
  work = example_dp.build_dp_sgd_client_work(
      model, element_type=ELEMENT, clip=clip, noise_multiplier=z, batch_size=batch,
      local_epochs=1, learning_rate=lr)
  steps = _spec(batch_size=batch, local_epochs=1, client_sizes=(n, n, n)).local_steps(n)
  assert steps == math.ceil(n / batch)
  (delta,) = _delta(work, model, [_client_dataset(n)])
  sigma = lr * math.sqrt(steps) * z * clip / batch
  lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], delta.size)
  rms = math.sqrt(np.mean(np.square(delta.astype(np.float64))))
  # The clipped gradients add at most lr * T * n * C / B (2e-3 relative): inside the interval.
  assert sigma * math.sqrt(lo / delta.size) <= rms <= sigma * math.sqrt(hi / delta.size), (
      rms, sigma)


def test_per_example_clipping_bounds_one_extreme_example():
  model = _model()
  trainable, non_trainable = model.initial_weights
  rng = np.random.default_rng(0)
  x = rng.random((6, 8, 8, 1), dtype=np.float32)
  y = np.array([0, 1, 0, 1, 1, 0], np.int32)
  outlier = 30 * rng.random((1, 8, 8, 1), dtype=np.float32)
  clip = 0.05
  with tf.Graph().as_default():
    weights = [tf.constant(w) for w in trainable]
    fixed = [tf.constant(w) for w in non_trainable]
    logits = model.predict_on_batch((weights, fixed), tf.constant(outlier), training=False)
    with tf.compat.v1.Session() as session:
      # Mislabelled: the class the model finds least likely, so its loss is large.
      wrong = int(np.argmin(session.run(logits)[0]))
  extreme_x = np.concatenate([x, outlier])
  extreme_y = np.concatenate([y, [wrong]]).astype(np.int32)
  with tf.Graph().as_default():
    weights = [tf.constant(w) for w in trainable]
    fixed = [tf.constant(w) for w in non_trainable]

    def clipped(xs, ys):
      return example_dp._per_example_clipped_sum(model, weights, fixed, tf.constant(xs),
                                                 tf.constant(ys), clip)

    with tf.GradientTape() as tape:
      tape.watch(weights)
      out = model.predict_on_batch((weights, fixed), tf.constant(extreme_x[-1:]), training=True)
      loss = model.loss(output=out, label=tf.constant(extreme_y[-1:]))
    raw = tape.gradient(loss, weights)
    with tf.compat.v1.Session() as session:
      without, with_extreme, raw_grad = session.run([clipped(x, y),
                                                     clipped(extreme_x, extreme_y), raw])
  flat = lambda grads: np.concatenate([np.ravel(g) for g in grads])
  raw_norm = np.linalg.norm(flat(raw_grad))
  assert raw_norm > 100 * clip  # The example would dominate the step unclipped.
  contribution = np.linalg.norm(flat(with_extreme) - flat(without))
  assert contribution <= clip * (1 + 1e-4), (contribution, clip)
  assert contribution >= clip * (1 - 1e-3)  # Clipped to the bound, not dropped.
  # Six ordinary examples: the clipped sum is at most 6 C.
  assert np.linalg.norm(flat(without)) <= 6 * clip * (1 + 1e-4)


def test_seeded_is_reproducible_and_unseeded_is_not(tff_runtime):
  model = _model()
  build = lambda seed: example_dp.build_dp_sgd_client_work(
      model, element_type=ELEMENT, clip=1.0, noise_multiplier=1.0, batch_size=4,
      local_epochs=1, learning_rate=0.1, seed=seed)
  data = [_client_dataset(12, client=0), _client_dataset(12, client=1)]
  seeded = build(7)
  first, second = _delta(seeded, model, data), _delta(seeded, model, data)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  # Two clients with identical data still draw different batches and noise.
  same_data = [_client_dataset(12, client=0, seed=5), _client_dataset(12, client=1, seed=5)]
  a, b = _delta(seeded, model, same_data)
  assert not np.allclose(a, b)
  # The next round (state advanced) draws fresh randomness too.
  state = seeded.next(seeded.initialize(), [_weights(model)] * 2, data).state
  assert not np.allclose(_delta(seeded, model, data, state)[0], first[0])
  unseeded = build(None)
  assert not np.allclose(_delta(unseeded, model, data)[0], _delta(unseeded, model, data)[0])


def test_only_the_update_leaves_a_client(tff_runtime):
  model = _model()
  work = example_dp.build_dp_sgd_client_work(
      model, element_type=ELEMENT, clip=1.0, noise_multiplier=1.0, batch_size=4,
      local_epochs=1, learning_rate=0.1)
  out = work.next(work.initialize(), [_weights(model)], [_client_dataset(8)])
  # No loss, accuracy, example count or batch sizes.
  assert out.measurements == collections.OrderedDict(train=())


# --- Accounting --------------------------------------------------------------

@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_the_worst_client_of_independent_compositions(accountant):
  spec = _spec(accountant=accountant)
  rounds = 7
  expected = []
  for n in (100, 200, 300):
    event = dp_accounting.PoissonSampledDpEvent(20 / n, dp_accounting.GaussianDpEvent(1.1))
    fresh = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else
             dp_accounting.pld.PLDAccountant())
    expected.append(fresh.compose(event, rounds * math.ceil(2 * n / 20)).get_epsilon(1e-5))
  assert math.isclose(accounting.epsilon_for_rounds(spec, rounds), max(expected),
                      rel_tol=1e-6 if accountant == "rdp" else 1e-3)
  # The smallest hospital (highest sampling rate) is the worst here.
  assert max(expected) == expected[0]


def test_ledger_counts_every_round_for_every_client_and_restores():
  spec = _spec()
  ledger = PrivacyLedger(spec)
  for _ in range(5):
    ledger.record_round([0])  # Only client 0 took part: all are still accounted.
  eps = ledger.epsilon()
  assert eps == accounting.epsilon_for_rounds(spec, 5)
  restored = PrivacyLedger.from_json(ledger.to_json())
  assert restored.epsilon() == eps
  with pytest.raises(UsageError, match="client_sizes"):
    restored.check_matches(_spec(client_sizes=(100, 200, 301)))


def test_calibration_meets_the_target_for_the_worst_client():
  spec = _spec(noise_multiplier=None)
  z = calibration.calibrate_noise_multiplier(spec, 10, 3.0)
  eps = accounting.epsilon_for_rounds(spec.with_noise(z), 10)
  assert (1 - calibration.TOLERANCE) * 3.0 <= eps <= 3.0


def test_seeded_noise_is_not_private():
  spec = _spec(noise_seed=5)
  assert accounting.epsilon_for_rounds(spec, 1) == math.inf
  with pytest.raises(UsageError, match="--seed"):
    calibration.calibrate_noise_multiplier(_spec(noise_multiplier=None, noise_seed=5), 3, 3.0)


def test_client_level_layer_is_accounted_beside_the_example_level():
  spec = _spec(client_dp="central", server_noise_multiplier=0.8, server_clip=0.5,
               sampling="poisson", num_clients=3, clients_per_round=2)
  mechanism = mechanisms.for_spec(spec)
  inner = mechanism.client_level()
  assert inner.privacy_unit == "client" and inner.spec.clip == 0.5
  ledger = PrivacyLedger(spec)
  for _ in range(4):
    ledger.record_round([0, 2])
  assert accounting.resolve_accountant(inner.spec) == "pld"
  independent = dp_accounting.pld.PLDAccountant().compose(
      dp_accounting.PoissonSampledDpEvent(2 / 3, dp_accounting.GaussianDpEvent(0.8)), 4)
  assert math.isclose(ledger.client_level_epsilon(), independent.get_epsilon(inner.spec.delta),
                      rel_tol=1e-3)
  assert ledger.client_level_delta == inner.spec.delta
  assert ledger.epsilon() == accounting.epsilon_for_rounds(spec, 4)


@pytest.mark.parametrize("overrides, words", [
    (dict(batch_size=150), "larger than the smallest client"),
    (dict(clip_mode="adaptive"), "adaptive clipping is not supported"),
    (dict(client_dp="central"), "needs --server_noise_multiplier"),
    (dict(server_clip=1.0), "only apply with --client_dp=central"),
    (dict(client_dp="local"), "not available"),
])
def test_bad_settings_are_usage_errors(overrides, words):
  with pytest.raises(UsageError, match=words):
    _spec(**overrides)


def test_client_dp_needs_example_mode():
  with pytest.raises(UsageError, match="--dp_mode=example only"):
    DPSpec(mode="central", noise_multiplier=1.0, num_clients=3, clients_per_round=3,
           client_dp="central")


def test_fixed_rate_gives_every_hospital_one_rate_and_the_worst_size_nothing():
  sizes = (72, 160, 946)
  spec = _spec(client_sizes=sizes, num_clients=3, batch_size=30, local_batching="fixed_rate")
  q = 30 * 3 / sum(sizes)
  assert all(spec.sampling_rate(n) == q for n in sizes)
  steps = math.ceil(2 / q)  # E = 2 local epochs at rate q.
  assert all(spec.local_steps(n) == steps for n in sizes)
  event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1))
  independent = dp_accounting.rdp.RdpAccountant().compose(event, 5 * steps).get_epsilon(1e-5)
  assert math.isclose(accounting.epsilon_for_rounds(spec, 5), independent, rel_tol=1e-9)
  # Fixed-size batches of the same B make the 72-image hospital the worst off.
  assert accounting.epsilon_for_rounds(_spec(client_sizes=sizes, num_clients=3,
                                             batch_size=30), 5) > independent
  assert mechanisms.for_spec(spec).weights_updates_by_size()
  with pytest.raises(UsageError, match="larger than the average client"):
    _spec(client_sizes=sizes, num_clients=3, batch_size=400, local_batching="fixed_rate")


def test_fixed_rate_noise_is_divided_by_the_expected_batch(tff_runtime):
  # Rate q: each step's noise zC is divided by q n_k, over `steps` steps.
  z, clip, lr, n, q, steps = 1e4, 1e-4, 1.0, 20, 0.25, 3
  model = _model()
  work = example_dp.build_dp_sgd_client_work(
      model, element_type=ELEMENT, clip=clip, noise_multiplier=z, batch_size=99,
      local_epochs=1, learning_rate=lr, sampling_rate=q, steps=steps, weight_by_size=True)
  out = work.next(work.initialize(), [_weights(model)], [_client_dataset(n)])
  (result,) = out.result
  assert float(result.update_weight) == n  # Weighted by the hospital's size.
  delta = np.concatenate([np.ravel(u) for u in result.update])
  sigma = lr * math.sqrt(steps) * z * clip / (q * n)
  lo, hi = stats.chi2.ppf([ALPHA / 2, 1 - ALPHA / 2], delta.size)
  rms = math.sqrt(np.mean(np.square(delta.astype(np.float64))))
  assert sigma * math.sqrt(lo / delta.size) <= rms <= sigma * math.sqrt(hi / delta.size)
