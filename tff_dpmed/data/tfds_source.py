"""Image classification datasets from TensorFlow Datasets (spec `tfds:NAME`).

Any TFDS dataset whose supervised keys are an `Image` and a `ClassLabel`
works (mnist, cifar10, patch_camelyon, ...). Images are resized to the
requested square size when they differ from it (bilinear with antialiasing;
non-square images are stretched) and returned as uint8.

Splits: TFDS 'test' is the test split and 'validation' the val split. A
dataset without 'validation' gets a deterministic (by seed) 10% of 'train' as
val; one without 'test' likewise gets another 10% of 'train' as test. Both are
logged, never silent.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

from tff_dpmed.data import guards
from tff_dpmed.data.types import DatasetInfo, ImageSplits
from tff_dpmed.errors import UsageError

HELD_OUT_FRACTION = 0.1
_READ_BATCH = 512
_CATALOG = "https://www.tensorflow.org/datasets/catalog/overview"
# Retries per URL. TFDS's default (10, with exponential backoff) spent ~215 s
# failing when offline; 2 still rides out a transient error.
DOWNLOAD_RETRIES = 2


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def _builder(tfds, name: str, data_dir: Optional[str]):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise UsageError(f"unknown TFDS dataset '{name}': use a name from {_CATALOG}, "
                     "e.g. tfds:mnist") from None
  except (ValueError, KeyError) as e:  # Unknown version or config ("mnist:9.9.9").
    raise UsageError(f"cannot open TFDS dataset '{name}' ({_first_line(e)}): check the "
                     f"name, version and config against {_CATALOG}") from e


def _feature_keys(tfds, name: str, info) -> tuple[str, str]:
  """The (image, label) feature names; UsageError for a non-image-classification dataset."""
  keys = info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise UsageError(f"TFDS dataset '{name}' has no (image, label) supervised keys: use an "
                     "image classification dataset such as tfds:mnist")
  image_key, label_key = keys
  image, label = info.features[image_key], info.features[label_key]
  if not isinstance(image, tfds.features.Image):
    raise UsageError(f"TFDS dataset '{name}' has '{image_key}' of type "
                     f"{type(image).__name__} as input, not an image: use an image "
                     "classification dataset such as tfds:mnist")
  if not isinstance(label, tfds.features.ClassLabel):
    raise UsageError(f"TFDS dataset '{name}' has '{label_key}' of type "
                     f"{type(label).__name__} as target, not a class label: use a "
                     "single-label classification dataset such as tfds:mnist")
  if label.num_classes < 2:
    raise UsageError(f"TFDS dataset '{name}' has {label.num_classes} class(es): use a "
                     "dataset with at least 2 classes")
  channels = image.shape[-1]
  if channels not in (1, 3):
    raise UsageError(f"TFDS dataset '{name}' has images with {channels} channels: use a "
                     "grey (1) or RGB (3) image dataset")
  return image_key, label_key


def _read_split(builder, split: str, image_size: int, channels: int):
  """A whole split as uint8 `(N, S, S, C)` images and int64 `(N,)` labels."""

  def resize(image, label):
    # Per image, before batching, so datasets of varying image sizes work.
    if tuple(image.shape[:2].as_list()) != (image_size, image_size):
      image = tf.image.resize(image, (image_size, image_size), method="bilinear",
                              antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image = tf.ensure_shape(image, (image_size, image_size, channels))
    return image, tf.cast(label, tf.int64)

  ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images, labels = [], []
  for x, y in ds.batch(_READ_BATCH).as_numpy_iterator():
    images.append(x)
    labels.append(y)
  if not images:
    raise UsageError(f"TFDS split '{split}' of '{builder.name}' is empty: use another "
                     "dataset or re-prepare it")
  return np.concatenate(images), np.concatenate(labels)


@contextlib.contextmanager
def _bounded_retries():
  """Lowers TFDS's per-URL retry count (a module global) while downloading."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  old = getattr(downloader, "MAX_RETRIES", None)
  if not isinstance(old, int):  # Another TFDS version: leave it alone.
    yield
    return
  downloader.MAX_RETRIES = min(old, DOWNLOAD_RETRIES)
  try:
    yield
  finally:
    downloader.MAX_RETRIES = old


def _first_missing(root: str, target: str) -> Optional[str]:
  """The topmost folder on the path root -> target that does not exist yet (or None)."""
  path = os.path.abspath(root)
  rel = os.path.relpath(os.path.abspath(target), path)
  parts = [] if rel == "." else rel.split(os.sep)
  if not os.path.lexists(path):
    return path
  for part in parts:
    path = os.path.join(path, part)
    if not os.path.lexists(path):
      return path
  return None


def _download_and_prepare(builder, name: str) -> None:
  """Downloads and prepares `builder`; on any failure (or Ctrl-C) leaves nothing behind.

  Downloads go to a private temporary folder inside the data folder, removed
  afterwards in every case (TFDS would keep `.tmp` files in its shared
  `downloads/` folder after a failure). Folders the preparation created for
  the dataset are removed if it fails. Retries are bounded (DOWNLOAD_RETRIES),
  so being offline fails within seconds.
  """
  root, target = os.fspath(builder.data_dir_root), os.fspath(builder.data_dir)
  created = _first_missing(root, target)
  parent = os.path.dirname(target)
  siblings = set(os.listdir(parent)) if os.path.isdir(parent) else set()
  ok = False
  try:
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tff_dpmed-download-", dir=root)
  except OSError as e:
    raise UsageError(f"cannot write into TFDS data directory {root} ({e.strerror or e}): "
                     "make it writable or pass another --data_dir") from None
  try:
    with _bounded_retries():
      builder.download_and_prepare(download_dir=tmp)
    ok = True
  except Exception as e:  # pylint: disable=broad-except
    # Network, manual-download and disk errors come as many types; all mean
    # the user must provide the data.
    raise UsageError(
        f"could not download/prepare TFDS dataset '{name}' into {builder.data_dir} "
        f"({type(e).__name__}: {_first_line(e)}): check the network, or prepare it "
        f"with `tfds build {name}` and pass its --data_dir") from e
  finally:  # Also on Ctrl-C.
    shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
      if created is not None:
        shutil.rmtree(created, ignore_errors=True)
      elif os.path.isdir(parent):  # e.g. '3.0.1.incomplete<id>' next to other versions.
        version = os.path.basename(target)
        for entry in set(os.listdir(parent)) - siblings:
          if entry.startswith(version):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def load_tfds(name: str, image_size: int, data_dir: Optional[str] = None,
              download: bool = True, seed: int = 0) -> ImageSplits:
  """Loads TFDS dataset `name` as uint8 square images of `image_size` pixels.

  Args:
    name: TFDS name, optionally with config/version ("mnist", "cifar10:3.0.2").
    image_size: output height and width in pixels.
    data_dir: TFDS data folder (must exist if given); None uses TFDS's default
      (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    download: download and prepare the dataset if it is not prepared yet.
    seed: seed of the held-out val/test carve-out (see module docstring).

  Raises:
    UsageError: unknown or unsuitable dataset, failed download, bad arguments.
  """
  name = name.strip()
  if not name:
    raise UsageError("empty TFDS dataset name: use e.g. tfds:mnist")
  image_size = guards.check_image_size(image_size)
  seed = guards.check_seed(seed)
  if data_dir is not None:
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(data_dir):
      raise UsageError(f"TFDS data directory {data_dir} does not exist: create it or pass "
                       "an existing --data_dir")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Imported here: it takes seconds and only tfds: specs need it.

  builder = _builder(tfds, name, data_dir)
  # Checked before downloading: a text dataset should not cost a download first.
  image_key, label_key = _feature_keys(tfds, name, builder.info)
  if not builder.is_prepared():  # Prepared data is read as is: no network at all.
    if not download:
      raise UsageError(f"TFDS dataset '{name}' is not prepared in {builder.data_dir}: "
                       f"enable downloading (--download), or prepare it with `tfds build "
                       f"{name}`")
    _download_and_prepare(builder, name)
  info = builder.info  # Now with the split sizes of the prepared data.
  channels = int(info.features[image_key].shape[-1])
  label_feature = info.features[label_key]
  splits = set(info.splits.keys())
  if "train" not in splits:
    raise UsageError(f"TFDS dataset '{name}' has no 'train' split (it has "
                     f"{', '.join(sorted(splits)) or 'none'}): use a dataset with one")

  train_x, train_y = _read_split(builder, "train", image_size, channels)
  held_out = {}
  if "validation" in splits:
    held_out["val"] = _read_split(builder, "validation", image_size, channels)
  if "test" in splits:
    held_out["test"] = _read_split(builder, "test", image_size, channels)
  missing = [s for s in ("val", "test") if s not in held_out]
  if missing:
    n = len(train_x)
    n_out = int(round(HELD_OUT_FRACTION * n))
    if n - n_out * len(missing) < 1 or n_out < 1:
      raise UsageError(f"TFDS dataset '{name}' has only {n} training examples, too few to "
                       f"hold out {' and '.join(missing)}: use a larger dataset")
    order = np.random.default_rng(seed).permutation(n)
    for i, split in enumerate(missing):
      pick = np.sort(order[i * n_out:(i + 1) * n_out])
      held_out[split] = (train_x[pick], train_y[pick])
      logging.info("TFDS %s has no %s split: using %d of its %d train examples (seed %d)",
                   name, "validation" if split == "val" else split, n_out, n, seed)
    keep = np.sort(order[len(missing) * n_out:])
    train_x, train_y = train_x[keep], train_y[keep]

  num_classes = label_feature.num_classes
  class_names = tuple(label_feature.names) if label_feature.names else tuple(
      str(i) for i in range(num_classes))
  info_out = DatasetInfo(name=f"tfds:{name}",
                         task="binary-class" if num_classes == 2 else "multi-class",
                         class_names=class_names,
                         image_shape=(image_size, image_size, channels))
  for split, y in (("train", train_y), ("val", held_out["val"][1]),
                   ("test", held_out["test"][1])):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise UsageError(f"TFDS dataset '{name}' split {split} has labels outside [0, "
                       f"{num_classes}): re-prepare the dataset")
  return ImageSplits(info=info_out, train_images=train_x, train_labels=train_y,
                     val_images=held_out["val"][0], val_labels=held_out["val"][1],
                     test_images=held_out["test"][0], test_labels=held_out["test"][1])
