"""Training-data fingerprints: stable for the same content, changed by any edit."""

import numpy as np
import pytest

from tests import data_fixtures
from tff_dpmed.data import fingerprint
from tff_dpmed.data import medmnist
from tff_dpmed.data.types import DatasetInfo, ImageSplits


def _splits(seed=0, n=20, **changes) -> ImageSplits:
  rng = np.random.default_rng(seed)
  arrays = dict(
      train_images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
      train_labels=(np.arange(n) % 3).astype(np.int64),
      val_images=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8),
      val_labels=np.zeros(4, np.int64),
      test_images=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8),
      test_labels=np.zeros(4, np.int64))
  arrays.update(changes)
  info = DatasetInfo(name="fake", task="multi-class", class_names=("a", "b", "c"),
                     image_shape=(8, 8, 1))
  return ImageSplits(info=info, **arrays)


def test_stable_for_equal_content():
  a = _splits().train_fingerprint()
  assert a == _splits().train_fingerprint()
  assert len(a) == 64 and int(a, 16) >= 0
  base = _splits()
  # Layout does not matter, only content: a Fortran-order or strided copy hashes alike.
  same = _splits(train_images=np.asfortranarray(base.train_images),
                 train_labels=base.train_labels.astype(">i8"))
  assert same.train_fingerprint() == a
  # Val/test and the dataset info are not part of the training data.
  assert _splits(val_labels=np.ones(4, np.int64)).train_fingerprint() == a
  assert _splits(test_images=np.zeros((4, 8, 8, 1), np.uint8)).train_fingerprint() == a


@pytest.mark.parametrize("where", [(0, 0, 0, 0), (19, 7, 7, 0), (10, 3, 5, 0)])
def test_one_pixel_changes_it(where):
  base = _splits()
  images = base.train_images.copy()
  images[where] ^= 1
  assert _splits(train_images=images).train_fingerprint() != base.train_fingerprint()


@pytest.mark.parametrize("index", [0, 7, 19])
def test_one_label_changes_it(index):
  base = _splits()
  labels = base.train_labels.copy()
  labels[index] = (labels[index] + 1) % 3
  assert _splits(train_labels=labels).train_fingerprint() != base.train_fingerprint()


def test_shape_dtype_and_order_change_it():
  base = _splits()
  x, y = base.train_images, base.train_labels
  fps = {base.train_fingerprint(),
         _splits(train_images=x.reshape(20, 8, 4, 2)).train_fingerprint(),  # same bytes
         _splits(train_labels=y.astype(np.int32)).train_fingerprint(),       # same values
         _splits(train_images=x[::-1], train_labels=y[::-1]).train_fingerprint(),
         _splits(train_images=x[:19], train_labels=y[:19]).train_fingerprint()}
  assert len(fps) == 5
  # Images and labels are framed separately: swapping bytes between them is seen.
  assert fingerprint.arrays_fingerprint(a=np.arange(4, dtype=np.uint8), b=np.zeros(0, np.uint8)) \
      != fingerprint.arrays_fingerprint(a=np.zeros(0, np.uint8), b=np.arange(4, dtype=np.uint8))


def test_real_file_is_stable_across_loads_and_matches_large_chunking(monkeypatch):
  load = lambda: medmnist.load_medmnist("breastmnist", data_dir=data_fixtures.real_data_dir(),
                                        download=False)
  first = load().train_fingerprint()
  assert load().train_fingerprint() == first
  monkeypatch.setattr(fingerprint, "_CHUNK_ROWS_BYTES", 1000)  # Many small slices.
  assert load().train_fingerprint() == first


def test_object_arrays_are_refused():
  with pytest.raises(TypeError):
    fingerprint.arrays_fingerprint(x=np.array([{}], dtype=object))
