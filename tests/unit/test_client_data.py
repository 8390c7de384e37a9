"""Federated client datasets over shared arrays."""

import collections
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import data_fixtures
from tff_dpmed.data import client_data
from tff_dpmed.data import medmnist
from tff_dpmed.data import partition
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError


@pytest.fixture(scope="module")
def pneumonia():
  return medmnist.load_medmnist("pneumoniamnist", data_dir=data_fixtures.real_data_dir(),
                                download=False)


def _small(n=50, multi_label=False, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n)  # Identifies the example in a batch.
  task = "multi-label" if multi_label else "multi-class"
  info = DatasetInfo(name="fake", task=task,
                     class_names=tuple(f"c{i}" for i in range(num_classes)),
                     image_shape=(8, 8, 1))
  if multi_label:
    labels = rng.integers(0, 2, (n, num_classes)).astype(np.int64)
  else:
    labels = (np.arange(n) % num_classes).astype(np.int64)
  return images, labels, info


def _batches(cd, client_id):
  return [{k: v.numpy() for k, v in b.items()} for b in cd.create_tf_dataset_for_client(client_id)]


def test_preprocess_images_is_divide_by_255():
  x = np.array([[0, 51, 255]], np.uint8)
  out = client_data.preprocess_images(x)
  assert out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), [[0.0, 0.2, 1.0]], rtol=1e-6)
  with pytest.raises(UsageError, match="uint8"):
    client_data.preprocess_images(np.zeros(3, np.float32))


def test_element_spec_and_values():
  images, labels, info = _small(n=10)
  parts = [np.array([0, 1, 2, 3, 4, 5, 6]), np.array([7, 8, 9])]
  cd = client_data.make_federated_train_data(images, labels, parts, info, batch_size=4,
                                             epochs=1, seed=1)
  assert cd.client_ids == ["0", "1"]
  spec = cd.element_type_structure
  assert isinstance(spec, collections.OrderedDict) and list(spec) == ["x", "y"]
  assert spec["x"] == tf.TensorSpec((None, 8, 8, 1), tf.float32)
  assert spec["y"] == tf.TensorSpec((None,), tf.int32)
  batches = _batches(cd, "1")
  assert [len(b["y"]) for b in batches] == [3]
  # Each client sees exactly its own examples, normalised, with matching labels.
  order = np.array(sorted(range(3), key=lambda i: batches[0]["x"][i].tobytes()))
  want = sorted(range(7, 10), key=lambda i: (images[i] / 255.0).astype(np.float32).tobytes())
  np.testing.assert_allclose(batches[0]["x"][order], images[want] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(batches[0]["y"][order], labels[want])


def _ids(batches):
  """Example ids from pixel (0, 0), which `_small` sets to the example's index."""
  return [int(round(p * 255)) for b in batches for p in b["x"][:, 0, 0, 0]]


def test_batches_epochs_and_shuffle_cover_each_epoch():
  images, labels, info = _small(n=30)
  parts = [np.arange(10), np.arange(10, 30)]
  cd = client_data.make_federated_train_data(images, labels, parts, info, batch_size=4,
                                             epochs=3, seed=0)
  batches = _batches(cd, "0")
  # repeat -> batch: ceil(10 * 3 / 4) = 8 batches; only the last one is short.
  assert [len(b["y"]) for b in batches] == [4] * 7 + [2]
  ids = _ids(batches)
  for epoch in range(3):  # Every epoch is a permutation of the client's examples ...
    assert sorted(ids[epoch * 10:(epoch + 1) * 10]) == list(range(10))
  assert ids[:10] != ids[10:20] and ids[:10] != list(range(10))  # ... freshly shuffled.
  assert np.array_equal(np.concatenate([b["y"] for b in batches]), labels[ids])
  assert sorted(_ids(_batches(cd, "1"))) == sorted(list(range(10, 30)) * 3)


def test_shuffle_buffer_limits_the_shuffle():
  images, labels, info = _small(n=100)
  cd = client_data.make_federated_train_data(images, labels, [np.arange(100)], info,
                                             batch_size=10, epochs=1, seed=0,
                                             shuffle_buffer=1)
  assert _ids(_batches(cd, "0")) == list(range(100))  # A buffer of 1 keeps the order.


def test_determinism_and_seed_dependence():
  images, labels, info = _small(n=200)
  parts = partition.partition_iid(200, 4, seed=0)

  def order(seed, client="2"):
    cd = client_data.make_federated_train_data(images, labels, parts, info, batch_size=7,
                                               epochs=2, seed=seed)
    return np.concatenate([b["x"].reshape(len(b["x"]), -1) for b in _batches(cd, client)])

  np.testing.assert_array_equal(order(5), order(5))
  assert not np.array_equal(order(5), order(6))
  # Same examples, different order for a different seed.
  np.testing.assert_array_equal(np.sort(order(5), axis=0), np.sort(order(6), axis=0))


def test_multilabel_elements():
  images, labels, info = _small(n=12, multi_label=True, num_classes=5)
  cd = client_data.make_federated_train_data(images, labels, [np.arange(12)], info,
                                             batch_size=5, epochs=1, seed=0)
  assert cd.element_type_structure["y"] == tf.TensorSpec((None, 5), tf.float32)
  batches = _batches(cd, "0")
  y = np.concatenate([b["y"] for b in batches])
  assert y.shape == (12, 5) and set(np.unique(y)) <= {0.0, 1.0}
  assert y.sum() == labels.sum()


def test_ten_thousand_clients_share_one_copy(pneumonia):
  images, labels = pneumonia.train_images, pneumonia.train_labels
  rng = np.random.default_rng(0)
  # More clients than examples, so clients overlap: each is 3 random indices.
  parts = [rng.choice(len(images), 3, replace=False) for _ in range(10_000)]
  # Warm-up, so TF's one-off lazy imports and caches are not measured below.
  client_data.make_federated_train_data(images, labels, parts[:10], pneumonia.info,
                                        batch_size=2, epochs=1, seed=0)
  tracemalloc.start()
  try:
    cd = client_data.make_federated_train_data(images, labels, parts, pneumonia.info,
                                               batch_size=2, epochs=1, seed=0)
    retained, _ = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Copies per client would retain 30,000 images (23 MB, 6x the train set). What
  # is retained is ids and offsets (~0.7 MB), plus, depending on the buffer's
  # alignment, TF's one copy of the train images when NumPy makes it (3.7 MB).
  per_client_copies = sum(len(p) for p in parts) * images[0].nbytes
  assert retained < images.nbytes + 1.5e6 < per_client_copies / 4
  assert len(cd.client_ids) == 10_000 and cd.client_ids[-1] == "9999"
  # The dataset function closes (through its reader of a client's examples) over
  # one tensor of all images, not per-client data.
  def captured(fn, depth=2):
    for cell in fn.__closure__ or ():
      yield cell.cell_contents
      if depth > 1 and callable(cell.cell_contents) and hasattr(cell.cell_contents,
                                                                "__closure__"):
        yield from captured(cell.cell_contents, depth - 1)
  closure = {c for c in captured(cd.serializable_dataset_fn)
             if isinstance(c, client_data._SharedArrays)}
  assert len(closure) == 1
  tensors = closure.pop().tensors
  assert tensors["images"].shape == images.shape
  assert tensors["flat"].shape == (30_000,) and tensors["offsets"].shape == (10_001,)
  batches = _batches(cd, "9999")
  got = np.concatenate([b["x"] for b in batches])
  want = images[parts[9999]].astype(np.float32) / 255.0
  np.testing.assert_array_equal(np.sort(got.ravel()), np.sort(want.ravel()))


def test_dataset_computation_runs_on_worker(tff_runtime):
  del tff_runtime  # Executing a TFF computation needs the runtime.
  # An op-level shuffle seed combines with TF's global seed in eager mode but
  # not in TFF's fresh graph; earlier tests (seeded Keras models) may have set
  # one, so clear it to compare the two paths on equal terms.
  tf.random.set_seed(None)
  images, labels, info = _small(n=20)
  parts = [np.arange(0, 8), np.arange(8, 20)]
  cd = client_data.make_federated_train_data(images, labels, parts, info, batch_size=5,
                                             epochs=1, seed=3)
  comp = cd.dataset_computation
  assert str(comp.type_signature.parameter) == "str"
  assert isinstance(comp.type_signature.result, tff.types.SequenceType)
  result = list(comp("1"))
  eager = _batches(cd, "1")
  assert [len(b["y"]) for b in result] == [len(b["y"]) for b in eager] == [5, 5, 2]
  for got, want in zip(result, eager):
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["y"], want["y"])


def test_float32_features_are_used_as_they_are():
  # A model's fixed feature stage (scatter_*) replaces the images; any shape.
  _, labels, info = _small(n=10)
  features = np.random.default_rng(0).normal(size=(10, 3, 3, 81)).astype(np.float32)
  features[:, 0, 0, 0] = np.arange(10)  # Identifies the example in a batch.
  cd = client_data.make_federated_train_data(features, labels, [np.arange(10)], info,
                                             batch_size=4, seed=0)
  assert cd.element_type_structure["x"] == tf.TensorSpec((None, 3, 3, 81), tf.float32)
  batches = _batches(cd, "0")
  ids = np.concatenate([b["x"][:, 0, 0, 0] for b in batches]).astype(int)
  np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), features[ids])
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), labels[ids])
  assert sorted(ids) == list(range(10))


def test_eval_dataset():
  images, labels, info = _small(n=11)
  ds = client_data.make_eval_dataset(images, labels, info, batch_size=4)
  batches = [{k: v.numpy() for k, v in b.items()} for b in ds]
  assert [len(b["y"]) for b in batches] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), labels)
  assert batches[0]["y"].dtype == np.int32 and batches[0]["x"].dtype == np.float32
  np.testing.assert_allclose(batches[2]["x"], images[8:] / 255.0, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"epochs": -1}, "epochs must be a positive integer"),
    ({"epochs": 1.5}, "epochs must be a positive integer"),
    ({"shuffle_buffer": 0}, "shuffle_buffer"),
    ({"partitions": []}, "no clients"),
    ({"partitions": [np.arange(3), np.zeros(0, np.int64)]}, "client 1 has no examples"),
    ({"partitions": [np.array([0, 10])]}, "partition indices span"),
    ({"partitions": [np.array([0.0, 1.0])]}, "dtype float64"),
    ({"labels": np.zeros(9, np.int64)}, "labels have shape"),
    ({"labels": np.full(10, 3, np.int64)}, r"labels span \[3, 3\]"),
    ({"labels": np.zeros(10, np.float32)}, "labels have dtype float32"),
    ({"images": np.zeros((10, 8, 8, 3), np.uint8)}, "dataset info"),
    ({"images": np.zeros((10, 8, 8, 1), np.float64)}, "uint8"),
    ({"images": np.zeros((10, 8, 8), np.float32)}, "float32 features"),
    ({"images": np.full((10, 2, 2, 5), np.nan, np.float32)}, "non-finite"),
])
def test_bad_arguments(kwargs, match):
  images, labels, info = _small(n=10)
  args = dict(images=images, labels=labels, partitions=[np.arange(10)], info=info,
              batch_size=2, epochs=1, seed=0)
  args.update(kwargs)
  with pytest.raises(UsageError, match=match) as e:
    client_data.make_federated_train_data(**args)
  assert "\n" not in str(e.value)


def test_too_large_for_dataset_computation_is_a_usage_error(monkeypatch):
  images, labels, info = _small(n=20)
  monkeypatch.setattr(client_data, "MAX_EMBEDDED_BYTES", images.nbytes // 2)
  cd = client_data.make_federated_train_data(images, labels, [np.arange(20)], info,
                                             batch_size=5)
  assert len(_batches(cd, "0")) == 4  # The eager path has no such limit.
  with pytest.raises(UsageError, match="too large to embed"):
    _ = cd.dataset_computation


def test_whole_client_data_from_files_holds_the_same_tensors(tmp_path):
  # DP-SGD's clients read their data from private files on the local worker.
  from tff_dpmed.data.types import DatasetInfo
  info = DatasetInfo(name="t", task="binary-class", class_names=("a", "b"),
                     image_shape=(4, 4, 1))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (9, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 2, 9)
  partitions = [np.array([0, 4, 8]), np.array([1, 2, 3, 5, 6, 7])]
  embedded = client_data.make_whole_client_data(images, labels, partitions, info)
  from_files = client_data.make_whole_client_data(images, labels, partitions, info,
                                                  folder=str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["0.x", "0.y", "1.x", "1.y"]
  for client in ("0", "1"):
    (want,) = embedded.create_tf_dataset_for_client(client)
    (got,) = from_files.create_tf_dataset_for_client(client)
    for name in ("x", "y", "client"):
      np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("multi_label", [False, True])
def test_batched_clients_from_files_yield_the_same_batches(tmp_path, multi_label,
                                                           tff_runtime):
  # The local worker reads every client's examples from private files; the
  # batches (order included, for a seed) must be those of the embedded data,
  # in Python and in the dataset computation TFF runs.
  del tff_runtime
  tf.random.set_seed(None)  # See test_dataset_computation_runs_on_worker.
  images, labels, info = _small(n=30, multi_label=multi_label)
  parts = [np.array([3, 1, 29, 7, 8]), np.arange(10, 22), np.array([0, 2])]
  args = dict(batch_size=4, epochs=2, seed=11)
  embedded = client_data.make_federated_train_data(images, labels, parts, info, **args)
  from_files = client_data.make_federated_train_data(images, labels, parts, info,
                                                     folder=str(tmp_path), **args)
  assert len(list(tmp_path.iterdir())) == 2 * len(parts)
  assert from_files.element_type_structure == embedded.element_type_structure
  for client in ("0", "1", "2"):
    want = _batches(embedded, client)
    for got in (_batches(from_files, client), list(from_files.dataset_computation(client))):
      assert [len(b["y"]) for b in got] == [len(b["y"]) for b in want]
      for g, w in zip(got, want):
        np.testing.assert_array_equal(g["x"], w["x"])
        np.testing.assert_array_equal(g["y"], w["y"])
