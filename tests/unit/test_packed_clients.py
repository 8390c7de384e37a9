"""Packed one-example clients (--client_packing): the same release as one TFF client each.

The packed process must produce the model the unpacked one produces on the
same cohort (no noise), add the same noise (measured), record the same DP
event, and clip each patient on its own.
"""

import collections
import math

import numpy as np
import pytest
from scipy import stats
import tensorflow as tf
import tensorflow_federated as tff

from tff_dpmed.data import client_data
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import process as process_lib
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy import safe_updates
from tff_dpmed.privacy.spec import DPSpec
from tff_dpmed.program.config import RunConfig

INFO = DatasetInfo(name="fake", task="multi-class", class_names=("a", "b", "c"),
                   image_shape=(8, 8, 1))
PATIENTS, COHORT, LR, CLIP = 50, 23, 0.5, 0.2


def _tiny_model(name, info, seed=None):
  del name
  init = tf.keras.initializers.GlorotUniform(seed=seed)
  inputs = tf.keras.Input(info.image_shape)
  x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                             kernel_initializer=init)(inputs)
  x = tf.keras.layers.GlobalAveragePooling2D()(x)
  logits = tf.keras.layers.Dense(info.num_classes, kernel_initializer=init)(x)
  return tf.keras.Model(inputs, logits)


def _arrays():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (PATIENTS, 8, 8, 1), dtype=np.uint8)
  labels = (np.arange(PATIENTS) % 3).astype(np.int64)
  return images, labels, [np.array([i]) for i in range(PATIENTS)]


def _process(packed: bool, noise_multiplier: float = 0.0, ghost: bool = False):
  images, labels, partitions = _arrays()
  if packed:
    data = client_data.make_packed_client_data(images, labels, partitions, INFO)
  else:
    data = client_data.make_federated_train_data(images, labels, partitions, INFO,
                                                 batch_size=1, epochs=1)
  element_type = client_data.any_client_size(data.element_type_structure)
  keras_model = _tiny_model("tiny", INFO, seed=3)
  model = process_lib.make_functional_model("tiny", INFO, element_type, keras_model=keras_model)
  spec = DPSpec(mode="central", num_clients=PATIENTS, clients_per_round=COHORT,
                noise_multiplier=noise_multiplier, clip_mode="fixed", clip=CLIP)
  mechanism = mechanisms.for_spec(spec)
  process = process_lib.build_learning_process(
      model, mechanism, process_lib.OptimizerConfig(LR, 1.0, 0.0),
      release_client_metrics=False, client_element_type=element_type, packed=packed,
      # With the Keras model, packs clip without materialised gradients (fast_clipping).
      keras_model=keras_model if ghost else None,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  process = tff.simulation.compose_dataset_computation_with_learning_process(
      data.dataset_computation, process)
  if packed:
    process = process_lib.PackingProcess(process, 5)  # Five packs of 4-5 patients.
  return process, mechanism


@pytest.mark.parametrize("ghost", [False, True])
def test_a_packed_round_is_the_unpacked_round(ghost, tff_runtime):
  from tff_dpmed.privacy import fast_clipping  # pylint: disable=g-import-not-at-top
  assert fast_clipping.supports(_tiny_model("tiny", INFO)) is True  # So `ghost` takes it.
  cohort = [str(i) for i in range(0, 2 * COHORT, 2)]  # 23 patients, every other one.
  weights = {}
  for packed in (False, True):
    process, mechanism = _process(packed, ghost=ghost)
    output = process.next(process.initialize(), cohort)
    weights[packed] = process.get_model_weights(output.state).trainable
    mechanism.verify_recorded_event(output.state.aggregator)
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(weights[False], process.get_model_weights(process.initialize()).trainable))
  assert moved > 1e-3  # The round trained: the comparison below is not between two no-ops.
  for unpacked, packed in zip(weights[False], weights[True]):
    np.testing.assert_allclose(packed, unpacked, rtol=1e-4, atol=1e-6)


def test_the_packed_aggregator_adds_the_same_noise_and_records_g_of_z(tff_runtime):
  z, dim, n = 1.3, 20_000, 7.0
  spec = DPSpec(mode="central", num_clients=100, clients_per_round=7, noise_multiplier=z,
                clip_mode="fixed", clip=0.5)
  mechanism = mechanisms.for_spec(spec)
  from tff_dpmed.privacy import central_dp  # pylint: disable=g-import-not-at-top
  process = safe_updates.bounded(central_dp.build_packed_factory(mechanism)).create(
      tff.TensorType(np.float32, [dim]))
  # Two packs whose sums (norm 3, far above the clip) must pass unclipped.
  packs = [np.full(dim, 3 / math.sqrt(dim), np.float32)] * 2
  output = process.next(process.initialize(), packs)
  noise = np.asarray(output.result) - 2 * packs[0] / n
  sigma = z * 0.5 / n
  lo, hi = stats.chi2.ppf([1e-6 / 2, 1 - 1e-6 / 2], dim)
  rms = float(np.sqrt(np.mean(noise**2)))
  assert sigma * math.sqrt(lo / dim) < rms < sigma * math.sqrt(hi / dim)
  assert abs(float(np.mean(noise))) < 6 * sigma / math.sqrt(dim)
  mechanism.verify_recorded_event(output.state)


def test_each_row_is_clipped_on_its_own_and_non_finite_rows_are_zeroed():
  rows = [np.array([[3.0, 4.0], [0.03, 0.04], [np.nan, 1.0], [3e30, 4e30]], np.float32),
          np.array([[0.0], [0.0], [1.0], [0.0]], np.float32)]
  a, b = [np.asarray(t)
          for t in safe_updates.safe_clip_rows([tf.constant(r) for r in rows], 1.0)]
  norms = np.sqrt((a**2).sum(1) + (b**2).sum(1))
  np.testing.assert_allclose(a[0], [0.6, 0.8], rtol=1e-6)   # Over: scaled to norm 1.
  np.testing.assert_allclose(a[1], [0.03, 0.04], rtol=1e-6)  # Under: unchanged.
  assert np.all(a[2] == 0) and np.all(b[2] == 0)           # Non-finite: zeros.
  np.testing.assert_allclose(a[3], [0.6, 0.8], rtol=1e-6)   # Huge but finite: no overflow.
  assert np.all(norms <= 1.0 + 1e-6)


def test_pack_ids_cover_every_client_once_in_even_packs():
  packs = client_data.pack_ids(range(10, 140), 64)
  members = [p.split(client_data.PACK_SEPARATOR) for p in packs]
  assert [len(m) for m in members] == [44, 43, 43]
  assert sorted(int(i) for m in members for i in m) == list(range(10, 140))
  assert client_data.pack_ids([], 64) == []


@pytest.mark.parametrize("in_files", [False, True])
def test_a_pack_dataset_holds_its_members_examples(in_files, tmp_path):
  images, labels, partitions = _arrays()
  partitions = partitions[::-1]  # Client i holds example PATIENTS - 1 - i.
  data = client_data.make_packed_client_data(images, labels, partitions, INFO,
                                             folder=str(tmp_path) if in_files else None)
  assert len(list(tmp_path.iterdir())) == (2 * PATIENTS if in_files else 0)
  element = data.serializable_dataset_fn("7,2,31").get_single_element()
  examples = [PATIENTS - 1 - i for i in (7, 2, 31)]
  np.testing.assert_allclose(element["x"].numpy(), images[examples] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(element["y"].numpy(), labels[examples])
  assert element["x"].dtype == tf.float32 and element["y"].dtype == tf.int32
  with pytest.raises(UsageError, match="one example per client"):
    client_data.make_packed_client_data(images, labels, [np.arange(2), np.arange(2, 5)], INFO)


def _config(**changes) -> RunConfig:
  base = dict(partition="per_example", num_clients=4708, clients_per_round=256,
              dp_mode="central", clip_mode="fixed", clip=1.0, noise_multiplier=1.0)
  return RunConfig.from_json({**base, **changes})


def test_packing_applies_only_where_the_release_is_the_same():
  assert _config().packs_clients
  assert not _config(client_packing="off").packs_clients
  for changes, reason in [(dict(partition="iid", num_clients=10, clients_per_round=10),
                           "per_example"),
                          (dict(clip_mode="adaptive"), "clip_mode=fixed"),
                          (dict(dp_mode="local"), "dp_mode=central"),
                          (dict(client_epochs=2), "client_epochs=1"),
                          (dict(debug_metrics=True), "debug_metrics")]:
    assert not _config(**changes).packs_clients
    with pytest.raises(UsageError, match=reason):
      _config(client_packing="on", **changes)
