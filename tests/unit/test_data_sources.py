"""TFDS (mocked, offline) and image-folder sources, and the spec registry."""

import os
import socket
import time
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

from tests import data_fixtures
from tff_dpmed.data import image_folder
from tff_dpmed.data import medmnist
from tff_dpmed.data import registry
from tff_dpmed.data import tfds_source
from tff_dpmed.errors import UsageError


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
  # TFDS must never reach GCS or the network, nor the real caches.
  monkeypatch.setattr(tfds.core.utils.gcs_utils, "_is_gcs_disabled", True)
  monkeypatch.delenv(medmnist.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(UsageError) as e:
    fn(*args, **kwargs)
  assert "\n" not in str(e.value)
  return str(e.value)


def _mock_tfds(tmp_path, name, split_names, num_examples):
  """Mocks TFDS `name` with metadata declaring `split_names` (as a prepared dataset has)."""
  meta_dir = str(tmp_path / "tfds_meta")
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder(name)
    builder.info.set_splits(splits_lib.SplitDict([
        splits_lib.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0,
                             filename_template=None) for s in split_names]))
    target = os.path.join(meta_dir, builder.info.full_name)
    os.makedirs(target, exist_ok=True)
    builder.info.write_to_directory(target)
  return tfds.testing.mock_data(num_examples=num_examples, data_dir=meta_dir,
                                policy=tfds.testing.MockPolicy.USE_FILES)


# --- TFDS ------------------------------------------------------------------------------------

def test_tfds_mnist_without_validation_split(tmp_path):
  with _mock_tfds(tmp_path, "mnist", ("train", "test"), num_examples=40):
    splits = registry.load_dataset("tfds:mnist", image_size=28, seed=3)
    again = registry.load_dataset("tfds:mnist", image_size=28, seed=3)
  info = splits.info
  assert info.name == "tfds:mnist" and info.task == "multi-class"
  assert info.class_names == tuple(str(i) for i in range(10))
  assert info.image_shape == (28, 28, 1)
  # 10% of train is held out as val, deterministically.
  assert (len(splits.train_images), len(splits.val_images), len(splits.test_images)) == (
      36, 4, 40)
  np.testing.assert_array_equal(splits.val_images, again.val_images)
  for x, y in ((splits.train_images, splits.train_labels),
               (splits.test_images, splits.test_labels)):
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28, 1)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    assert y.min() >= 0 and y.max() < 10


def test_tfds_resizes_rgb_and_uses_validation_split(tmp_path):
  with _mock_tfds(tmp_path, "patch_camelyon", ("train", "validation", "test"),
                  num_examples=12):
    splits = tfds_source.load_tfds("patch_camelyon", image_size=32)
  assert splits.info.task == "binary-class" and splits.info.image_shape == (32, 32, 3)
  assert splits.train_images.shape == (12, 32, 32, 3)
  assert splits.train_images.dtype == np.uint8
  assert len(splits.val_images) == 12 and len(splits.test_images) == 12
  assert splits.train_images.std() > 10  # Resized pixels, not zeros.


def test_tfds_errors(tmp_path):
  assert "unknown TFDS dataset 'no_such_dataset'" in _one_line_error(
      registry.load_dataset, "tfds:no_such_dataset")
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
    message = _one_line_error(tfds_source.load_tfds, "imdb_reviews", 28)
  assert "not an image" in message
  assert "does not exist" in _one_line_error(tfds_source.load_tfds, "mnist", 28,
                                             data_dir=str(tmp_path / "missing"))
  assert "not prepared" in _one_line_error(tfds_source.load_tfds, "mnist", 28,
                                           data_dir=str(tmp_path), download=False)
  assert "positive integer" in _one_line_error(tfds_source.load_tfds, "mnist", 0)


def _offline(*args, **kwargs):
  raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")


def _tfds_target(monkeypatch, tmp_path, where):
  """(data_dir argument, folder that must stay as it was, whether it existed)."""
  if where == "given":
    folder = tmp_path / "tfds"
    folder.mkdir()
    (folder / "other_dataset").mkdir()  # The user's other data must survive.
    return str(folder), folder
  folder = tmp_path / "default_tfds"  # TFDS's default folder, not there yet.
  monkeypatch.setenv("TFDS_DATA_DIR", str(folder))
  return None, folder


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["given", "default"])
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_offline_download_fails_fast_and_leaves_nothing(monkeypatch, tmp_path, where,
                                                             name):
  monkeypatch.setattr(socket, "getaddrinfo", _offline)  # No DNS: as offline as it gets.
  data_dir, folder = _tfds_target(monkeypatch, tmp_path, where)
  before = _tree(folder) if folder.exists() else None
  start = time.monotonic()
  message = _one_line_error(tfds_source.load_tfds, name, 28, data_dir=data_dir)
  assert time.monotonic() - start < 30  # Was ~215 s of retries.
  assert message.startswith(f"could not download/prepare TFDS dataset '{name}' into ")
  assert f"prepare it with `tfds build {name}`" in message
  if before is None:
    assert not folder.exists()
  else:
    assert _tree(folder) == before  # No downloads/*.tmp, no half-prepared dataset.


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["given", "default"])
def test_tfds_interrupted_download_leaves_nothing(monkeypatch, tmp_path, where):
  def interrupted(self, *, download_dir=None, **kwargs):
    # What TFDS has written when Ctrl-C arrives: a partial download and data.
    downloads = download_dir or os.path.join(self.data_dir_root, "downloads")
    os.makedirs(os.path.join(downloads, "x.tmp.123"), exist_ok=True)
    os.makedirs(self.data_dir + ".incomplete123", exist_ok=True)
    raise KeyboardInterrupt

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", interrupted)
  data_dir, folder = _tfds_target(monkeypatch, tmp_path, where)
  before = _tree(folder) if folder.exists() else None
  with pytest.raises(KeyboardInterrupt):
    tfds_source.load_tfds("mnist", 28, data_dir=data_dir)
  if before is None:
    assert not folder.exists()
  else:
    assert _tree(folder) == before


def test_tfds_prepared_dataset_needs_no_network(monkeypatch, tmp_path):
  def no_download(self, **kwargs):
    raise AssertionError("download_and_prepare called for a prepared dataset")

  with _mock_tfds(tmp_path, "mnist", ("train", "test"), num_examples=20):
    monkeypatch.setattr(socket, "getaddrinfo", _offline)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    splits = tfds_source.load_tfds("mnist", 28)
  assert len(splits.test_images) == 20


@pytest.mark.parametrize("size", [10**6, 2**40])
def test_tfds_huge_image_size(size):
  message = _one_line_error(tfds_source.load_tfds, "mnist", size)
  assert f"image size {size} is larger than the supported maximum" in message


# --- image folder ----------------------------------------------------------------------------

def _class_folder(root, name, n, mode="L", size=(20, 16), ext="png"):
  folder = root / name
  folder.mkdir(parents=True)
  for i in range(n):
    data_fixtures.write_image(str(folder / f"img{i:02d}.{ext}"), size=size, mode=mode,
                              seed=zlib.crc32(f"{name}/{i}".encode()))


def test_folder_grey_split_80_10_10(tmp_path):
  root = tmp_path / "xrays"
  _class_folder(root, "normal", 10)
  _class_folder(root, "pneumonia", 20, ext="jpg")
  splits = registry.load_dataset(f"folder:{root}", image_size=12, seed=0)
  assert splits.info.name == "folder:xrays"
  assert splits.info.class_names == ("normal", "pneumonia")
  assert splits.info.task == "binary-class" and splits.info.image_shape == (12, 12, 1)
  assert (len(splits.train_labels), len(splits.val_labels), len(splits.test_labels)) == (
      24, 3, 3)
  # Stratified: both classes in every split.
  for y in (splits.train_labels, splits.val_labels, splits.test_labels):
    assert set(y.tolist()) == {0, 1}
  assert np.bincount(splits.train_labels).tolist() == [8, 16]
  assert splits.train_images.dtype == np.uint8 and splits.train_images.std() > 10
  same = registry.load_dataset(f"folder:{root}", image_size=12, seed=0)
  other = registry.load_dataset(f"folder:{root}", image_size=12, seed=1)
  np.testing.assert_array_equal(splits.val_images, same.val_images)
  assert not np.array_equal(splits.val_images, other.val_images)


def test_folder_with_split_dirs_and_rgb(tmp_path):
  root = tmp_path / "derm"
  for split, n in (("train", 4), ("val", 2), ("test", 2)):
    _class_folder(root / split, "benign", n, mode="RGB")
    _class_folder(root / split, "malignant", n, mode="L")
    if split == "train":
      _class_folder(root / split, "other", n, mode="RGBA")
  splits = image_folder.load_image_folder(str(root), image_size=16)
  assert splits.info.class_names == ("benign", "malignant", "other")
  assert splits.info.task == "multi-class" and splits.info.image_shape == (16, 16, 3)
  assert splits.train_images.shape == (12, 16, 16, 3)
  assert splits.val_labels.tolist() == [0, 0, 1, 1]
  grey = splits.val_images[2]  # Grey image replicated to 3 channels.
  assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])


def test_folder_16bit_grey_is_scaled(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path / "ct"
  for name, value in (("a", 65535), ("b", 257 * 100)):
    for split in ("train", "val", "test"):
      (root / split / name).mkdir(parents=True)
      Image.fromarray(np.full((8, 8), value, np.uint16)).save(root / split / name / "x.png")
  splits = image_folder.load_image_folder(str(root), image_size=8)
  assert splits.info.image_shape == (8, 8, 1)
  assert splits.train_images[splits.train_labels == 0].max() == 255
  assert splits.train_images[splits.train_labels == 1].max() == 100


def test_folder_errors(tmp_path):
  def error(root, **kwargs):
    return _one_line_error(image_folder.load_image_folder, str(root), kwargs.get("size", 8))

  assert "does not exist" in error(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "no class sub-folders" in error(empty)
  loose = tmp_path / "loose"
  loose.mkdir()
  data_fixtures.write_image(str(loose / "a.png"))
  assert "holds images directly" in error(loose)
  single = tmp_path / "single"
  _class_folder(single, "only", 10)
  assert "only one class" in error(single)
  no_images = tmp_path / "no_images"
  _class_folder(no_images, "a", 10)
  (no_images / "b").mkdir()
  assert "has no images" in error(no_images)
  stray = tmp_path / "stray"
  _class_folder(stray, "a", 10)
  _class_folder(stray, "b", 10)
  (stray / "b" / "notes.txt").write_text("x")
  assert "notes.txt is not a PNG or JPEG" in error(stray)
  broken = tmp_path / "broken"
  _class_folder(broken, "a", 10)
  _class_folder(broken, "b", 10)
  (broken / "b" / "img03.png").write_bytes(b"not a png")
  message = error(broken)
  assert "cannot read image" in message and "img03.png" in message
  truncated = tmp_path / "truncated"
  _class_folder(truncated, "a", 10, size=(64, 64))
  _class_folder(truncated, "b", 10, size=(64, 64))
  path = truncated / "a" / "img05.png"
  path.write_bytes(path.read_bytes()[:200])
  message = error(truncated)
  assert "img05.png" in message and "replace or remove" in message
  tiny = tmp_path / "tiny"
  _class_folder(tiny, "a", 2)
  _class_folder(tiny, "b", 2)
  assert "too few images" in error(tiny)
  partial = tmp_path / "partial"
  _class_folder(partial / "train", "a", 2)
  _class_folder(partial / "val", "a", 2)
  assert "missing test" in error(partial)
  extra = tmp_path / "extra"
  for split in ("train", "val", "test"):
    _class_folder(extra / split, "a", 1)
    _class_folder(extra / split, "b", 1)
  _class_folder(extra / "test", "c", 1)
  assert "c that train/ lacks" in error(extra)
  assert "positive integer" in error(extra, size=0)


def _tree(root) -> list:
  """Every path under root (links not followed), to show a failed load wrote nothing."""
  return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)


def _folder_error(root, image_size=8, **kwargs) -> str:
  before = _tree(root)
  message = _one_line_error(image_folder.load_image_folder, str(root), image_size, **kwargs)
  assert _tree(root) == before
  return message


def _two_classes(root, n=10):
  _class_folder(root, "a", n)
  _class_folder(root, "b", n)


@pytest.mark.parametrize("links", [
    {"a/x.png": "x.png"},                          # image, loop of length 1
    {"a/x.png": "y.png", "a/y.png": "x.png"},      # image, length 2
    {"c": "c"},                                    # class folder, length 1
    {"c": "d", "d": "c"},                          # class folders, length 2
    {"b/z.jpg": "../a/z.jpg", "a/z.jpg": "../b/z.jpg"},  # across class folders
])
def test_folder_symlink_loops(tmp_path, links):
  root = tmp_path / "loops"
  _two_classes(root)
  for name, target in links.items():
    os.symlink(target, root / name)
  message = _folder_error(root)
  assert "is a symbolic link loop" in message and "remove the link" in message


def test_folder_root_and_split_folder_loops(tmp_path):
  os.symlink(tmp_path / "root", tmp_path / "root")
  message = _one_line_error(image_folder.load_image_folder, str(tmp_path / "root"), 8)
  assert "root is a symbolic link loop" in message
  split = tmp_path / "split"
  for s in ("val", "test"):
    _two_classes(split / s, n=1)
  os.symlink("train", split / "train")
  assert "train is a symbolic link loop" in _folder_error(split)


def test_folder_broken_image_link(tmp_path):
  root = tmp_path / "broken_link"
  _two_classes(root)
  os.symlink(tmp_path / "gone.png", root / "a" / "z.png")
  assert "is a broken symbolic link" in _folder_error(root)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_folder_fifo_image_is_refused_not_opened(tmp_path, layout):
  root = tmp_path / layout
  if layout == "flat":
    _two_classes(root)
    os.mkfifo(root / "b" / "img99.png")
  else:
    for s in ("train", "val", "test"):
      _two_classes(root / s, n=1)
    os.mkfifo(root / "test" / "a" / "pipe.jpg")
  message = _folder_error(root)
  assert "is a named pipe (FIFO), not a regular file" in message


@pytest.mark.parametrize("size", [10**6, 2**31, 2**62])
def test_folder_huge_image_size(tmp_path, size):
  root = tmp_path / "huge"
  _two_classes(root)
  message = _folder_error(root, image_size=size)
  assert f"image size {size} is larger than the supported maximum of 4096" in message


def test_folder_larger_than_memory(monkeypatch, tmp_path):
  root = tmp_path / "mem"
  _two_classes(root)
  monkeypatch.setattr(image_folder.guards, "memory_limit_bytes", lambda: 10_000)
  message = _folder_error(root, image_size=64)
  assert "20 images of 64x64 pixels needs" in message and "--image_size" in message


@pytest.mark.parametrize("seed", [-1, 2.5, "0", None])
def test_folder_bad_seed(tmp_path, seed):
  root = tmp_path / "seed"
  _two_classes(root)
  assert "seed must be a non-negative integer" in _folder_error(root, seed=seed)


# --- registry --------------------------------------------------------------------------------

def test_registry_dispatch_and_errors(tmp_path):
  data_dir = data_fixtures.real_data_dir()
  splits = registry.load_dataset("BreastMNIST", data_dir=data_dir, download=False)
  assert splits.info.name == "breastmnist" and len(splits.train_labels) == 546
  message = _one_line_error(registry.load_dataset, "pneumonia", data_dir=data_dir)
  assert message.startswith("unknown dataset 'pneumonia': use one of pathmnist, chestmnist")
  assert "tfds:NAME or folder:PATH" in message
  assert "3-D" in _one_line_error(registry.load_dataset, "nodulemnist3d")
  assert "folder:/path" in _one_line_error(registry.load_dataset, "folder:")
  assert "no dataset" in _one_line_error(registry.load_dataset, "  ")
  assert "28, 64, 128, 224" in _one_line_error(registry.load_dataset, "breastmnist",
                                               image_size=32, data_dir=data_dir)
