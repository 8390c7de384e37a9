"""MedMNIST: metadata, real files, validation of bad files, download."""

import hashlib
import http.server
import os
import shutil
import threading
import zipfile

import numpy as np
import pytest

from tests import data_fixtures
from tff_dpmed.data import medmnist
from tff_dpmed.errors import UsageError


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
  # No test may read the developer's data dir or write into the real cache.
  monkeypatch.delenv(medmnist.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(medmnist.URL_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def _usage_error(fn, *args, **kwargs) -> str:
  """Runs fn, expects a UsageError, checks it is one line, returns its message."""
  with pytest.raises(UsageError) as e:
    fn(*args, **kwargs)
  message = str(e.value)
  assert "\n" not in message and message.strip() == message and message
  return message


# --- metadata -------------------------------------------------------------------------

def test_table_has_every_2d_dataset_with_consistent_metadata():
  assert set(medmnist.MEDMNIST_NAMES) == {
      "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist",
      "retinamnist", "breastmnist", "bloodmnist", "tissuemnist", "organamnist",
      "organcmnist", "organsmnist"}
  for spec in medmnist.MEDMNIST_DATASETS.values():
    assert spec.task in ("binary-class", "multi-class", "multi-label", "ordinal-regression")
    assert spec.n_channels in (1, 3)
    assert set(spec.md5) == set(medmnist.IMAGE_SIZES)
    assert all(len(h) == 32 and int(h, 16) >= 0 for h in spec.md5.values())
    assert len(set(spec.md5.values())) == 4
    assert (spec.task == "binary-class") == (len(spec.class_names) == 2)
  assert medmnist.get_spec("chestmnist").task == "multi-label"
  assert len(medmnist.get_spec("chestmnist").class_names) == 14
  assert medmnist.get_spec("pathmnist").n_channels == 3
  assert medmnist.get_spec("retinamnist").task == "ordinal-regression"
  all_md5 = [h for s in medmnist.MEDMNIST_DATASETS.values() for h in s.md5.values()]
  assert len(set(all_md5)) == len(all_md5)


def test_md5_of_shared_files_matches_table():
  folder = data_fixtures.real_data_dir()
  for name in data_fixtures.REAL_SPLIT_SIZES:
    got = medmnist.download_lib.md5_of_file(os.path.join(folder, f"{name}.npz"))
    assert got == medmnist.get_spec(name).md5[28]


def test_file_names_and_urls(monkeypatch):
  assert medmnist.file_name("bloodmnist") == "bloodmnist.npz"
  assert medmnist.file_name("BloodMNIST", 64) == "bloodmnist_64.npz"
  assert medmnist.file_url("bloodmnist", 224) == (
      "https://zenodo.org/records/10519652/files/bloodmnist_224.npz?download=1")
  monkeypatch.setenv(medmnist.URL_ENV, "http://mirror.example/medmnist/")
  assert medmnist.file_url("bloodmnist") == "http://mirror.example/medmnist/bloodmnist.npz"
  assert "28, 64, 128, 224" in _usage_error(medmnist.file_name, "bloodmnist", 32)
  assert "pathmnist" in _usage_error(medmnist.get_spec, "bloodmnst")
  assert "3-D" in _usage_error(medmnist.get_spec, "organmnist3d")


# --- data dir resolution ----------------------------------------------------------------

def test_resolve_data_dir_order(monkeypatch, tmp_path):
  explicit, env = tmp_path / "explicit", tmp_path / "env"
  explicit.mkdir()
  env.mkdir()
  assert medmnist.resolve_data_dir(None) == str(tmp_path / "xdg_cache/tff_dpmed/medmnist")
  monkeypatch.setenv(medmnist.DATA_DIR_ENV, str(env))
  assert medmnist.resolve_data_dir(None) == str(env)
  assert medmnist.resolve_data_dir(str(explicit)) == str(explicit)
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.delenv(medmnist.DATA_DIR_ENV)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert medmnist.resolve_data_dir() == str(tmp_path / "home/.cache/tff_dpmed/medmnist")


def test_resolve_data_dir_rejects_missing_folders(monkeypatch, tmp_path):
  message = _usage_error(medmnist.resolve_data_dir, str(tmp_path / "nope"))
  assert str(tmp_path / "nope") in message and "--data_dir" in message
  monkeypatch.setenv(medmnist.DATA_DIR_ENV, str(tmp_path / "nope_env"))
  assert "TFF_DPMED_DATA_DIR" in _usage_error(medmnist.resolve_data_dir, None)
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  assert "not a folder" in _usage_error(medmnist.resolve_data_dir, str(a_file))
  # A missing explicit folder is an error even when downloading is allowed.
  _usage_error(medmnist.load_medmnist, "breastmnist", data_dir=str(tmp_path / "nope"))


# --- real files -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(data_fixtures.REAL_SPLIT_SIZES))
def test_load_real_file(name):
  splits = medmnist.load_medmnist(name, data_dir=data_fixtures.real_data_dir(),
                                  download=False)
  assert splits.info.name == name
  assert splits.info.task == "binary-class"
  assert splits.info.image_shape == (28, 28, 1)
  assert splits.info.class_names == medmnist.get_spec(name).class_names
  sizes = []
  for split in ("train", "val", "test"):
    x = getattr(splits, f"{split}_images")
    y = getattr(splits, f"{split}_labels")
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (28, 28, 1)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    assert set(np.unique(y)) == {0, 1}
    assert x.max() > 200 and x.min() < 50  # Real pixels, not a constant array.
    sizes.append(len(x))
  assert tuple(sizes) == data_fixtures.REAL_SPLIT_SIZES[name]
  assert tuple(sizes) == tuple(medmnist.get_spec(name).n_samples.values())


def test_load_real_file_with_md5_check(tmp_path):
  splits = medmnist.load_medmnist("breastmnist", data_dir=data_fixtures.real_data_dir(),
                                  download=False, verify_md5=True)
  assert len(splits.train_images) == 546
  # A valid file that is not the official one fails only the MD5 check.
  data_fixtures.write_fake_medmnist(str(tmp_path), "breastmnist")
  medmnist.load_medmnist("breastmnist", data_dir=str(tmp_path), download=False)
  assert "MD5" in _usage_error(medmnist.load_medmnist, "breastmnist",
                               data_dir=str(tmp_path), verify_md5=True)


def test_env_data_dir_is_used(monkeypatch):
  monkeypatch.setenv(medmnist.DATA_DIR_ENV, data_fixtures.real_data_dir())
  assert len(medmnist.load_medmnist("breastmnist", download=False).test_labels) == 156


# --- fake files of every kind -------------------------------------------------------------

def test_rgb_multiclass_file_at_64px(tmp_path):
  data_fixtures.write_fake_medmnist(str(tmp_path), "bloodmnist", image_size=64, channels=3,
                                    num_classes=8)
  splits = medmnist.load_medmnist("bloodmnist", image_size=64, data_dir=str(tmp_path),
                                  download=False)
  assert splits.train_images.shape == (12, 64, 64, 3)
  assert splits.info.image_shape == (64, 64, 3) and splits.info.num_classes == 8
  assert splits.train_labels.tolist() == [i % 8 for i in range(12)]


def test_multilabel_file(tmp_path):
  path = data_fixtures.write_fake_medmnist(str(tmp_path), "chestmnist", num_classes=14,
                                           multi_label=True)
  splits = medmnist.load_medmnist("chestmnist", data_dir=str(tmp_path), download=False)
  assert splits.info.multi_label
  assert splits.train_labels.shape == (12, 14) and splits.train_labels.dtype == np.int64
  with np.load(path) as raw:
    np.testing.assert_array_equal(splits.val_labels, raw["val_labels"])


def test_grey_nhwc_and_float_images_are_accepted(tmp_path):
  arrays = data_fixtures.fake_medmnist_arrays(grey_rank3=False)
  as_float01 = {k: (v.astype(np.float32) / 255.0 if k.endswith("images") else v)
                for k, v in arrays.items()}
  data_fixtures.write_npz(str(tmp_path / "breastmnist.npz"), as_float01)
  splits = medmnist.load_medmnist("breastmnist", data_dir=str(tmp_path), download=False)
  np.testing.assert_array_equal(splits.train_images, arrays["train_images"])
  as_float255 = {k: (v.astype(np.float64) if k.endswith("images") else v)
                 for k, v in arrays.items()}
  data_fixtures.write_npz(str(tmp_path / "breastmnist.npz"), as_float255)
  splits = medmnist.load_medmnist("breastmnist", data_dir=str(tmp_path), download=False)
  np.testing.assert_array_equal(splits.test_images, arrays["test_images"])


# --- invalid files ----------------------------------------------------------------------------

def _write_and_load(tmp_path, name="breastmnist", image_size=28, **kwargs) -> str:
  data_fixtures.write_fake_medmnist(str(tmp_path), name, image_size=image_size, **kwargs)
  return _usage_error(medmnist.load_medmnist, name, image_size=image_size,
                      data_dir=str(tmp_path), download=False)


def test_missing_file_without_download(tmp_path):
  message = _usage_error(medmnist.load_medmnist, "breastmnist", data_dir=str(tmp_path),
                         download=False)
  assert "breastmnist.npz not found" in message and str(tmp_path) in message


def test_missing_key(tmp_path):
  assert "'val_labels'" in _write_and_load(tmp_path, drop=("val_labels",))


def test_wrong_image_dtype(tmp_path):
  bad = np.zeros((12, 28, 28), np.int16)
  assert "int16" in _write_and_load(tmp_path, overrides={"train_images": bad})


def test_wide_unsigned_images_are_rejected(tmp_path):
  bad = np.zeros((4, 28, 28), np.uint16)
  assert "uint16" in _write_and_load(tmp_path, overrides={"val_images": bad})


def test_nan_pixels(tmp_path):
  bad = np.full((4, 28, 28), 0.5, np.float32)
  bad[1, 2, 3] = np.nan
  message = _write_and_load(tmp_path, overrides={"test_images": bad})
  assert "NaN" in message and "'test_images'" in message


def test_inf_pixels(tmp_path):
  bad = np.full((4, 28, 28), 0.5, np.float32)
  bad[0, 0, 0] = np.inf
  assert "infinite" in _write_and_load(tmp_path, overrides={"val_images": bad})


def test_float_pixels_out_of_range(tmp_path):
  bad = np.full((4, 28, 28), 300.0, np.float32)
  assert "[0, 255]" in _write_and_load(tmp_path, overrides={"val_images": bad})


def test_float_labels(tmp_path):
  bad = np.zeros((12, 1), np.float32)
  assert "float32" in _write_and_load(tmp_path, overrides={"train_labels": bad})


def test_count_mismatch(tmp_path):
  bad = np.zeros((11, 1), np.uint8)
  message = _write_and_load(tmp_path, overrides={"train_labels": bad})
  assert "11 labels for 12 images" in message


def test_wrong_rank(tmp_path):
  bad = np.zeros((12, 28 * 28), np.uint8)
  assert "(12, 784)" in _write_and_load(tmp_path, overrides={"train_images": bad})


def test_rgb_images_for_grey_dataset(tmp_path):
  bad = np.zeros((4, 28, 28, 3), np.uint8)
  assert "3 channel(s)" in _write_and_load(tmp_path, overrides={"val_images": bad})


def test_grey_images_for_rgb_dataset(tmp_path):
  message = _write_and_load(tmp_path, "pathmnist", channels=3, num_classes=9,
                            overrides={"test_images": np.zeros((4, 28, 28), np.uint8)})
  assert "RGB" in message


def test_label_out_of_range(tmp_path):
  bad = np.array([[0], [1], [2], [1]], np.uint8)
  message = _write_and_load(tmp_path, overrides={"test_labels": bad})
  assert "label 2" in message and "[0, 2)" in message


def test_negative_label(tmp_path):
  bad = np.array([0, 1, -1, 1], np.int64)
  assert "label -1" in _write_and_load(tmp_path, overrides={"val_labels": bad})


def test_multilabel_wrong_width_and_values(tmp_path):
  message = _write_and_load(tmp_path, "chestmnist", num_classes=13, multi_label=True)
  assert "(12, 14)" in message
  bad = np.full((4, 14), 2, np.uint8)
  message = _write_and_load(tmp_path, "chestmnist", num_classes=14, multi_label=True,
                            overrides={"val_labels": bad})
  assert "0/1" in message


def test_wrong_image_size(tmp_path):
  # A 28 px file saved under the 64 px name.
  data_fixtures.write_npz(str(tmp_path / "breastmnist_64.npz"),
                          data_fixtures.fake_medmnist_arrays(image_size=28))
  message = _usage_error(medmnist.load_medmnist, "breastmnist", image_size=64,
                         data_dir=str(tmp_path), download=False)
  assert "28x28" in message and "64x64" in message


def test_empty_split(tmp_path):
  message = _write_and_load(
      tmp_path, overrides={"test_images": np.zeros((0, 28, 28), np.uint8),
                           "test_labels": np.zeros((0, 1), np.uint8)})
  assert "no images" in message


def test_truncated_real_file(tmp_path):
  real = os.path.join(data_fixtures.real_data_dir(), "pneumoniamnist.npz")
  with open(real, "rb") as f:
    head = f.read(1000)
  (tmp_path / "pneumoniamnist.npz").write_bytes(head)
  message = _usage_error(medmnist.load_medmnist, "pneumoniamnist", data_dir=str(tmp_path),
                         download=False)
  assert "truncated or corrupt" in message and "pneumoniamnist.npz" in message
  assert "delete it" in message


def test_not_an_npz(tmp_path):
  (tmp_path / "breastmnist.npz").write_bytes(b"<html>rate limited</html>")
  assert "corrupt" in _usage_error(medmnist.load_medmnist, "breastmnist",
                                   data_dir=str(tmp_path), download=False)
  np.save(tmp_path / "single.npy", np.zeros(3))
  os.replace(tmp_path / "single.npy", tmp_path / "breastmnist.npz")
  assert ".npy" in _usage_error(medmnist.load_medmnist, "breastmnist",
                                data_dir=str(tmp_path), download=False)


def test_pickled_object_array(tmp_path):
  arrays = data_fixtures.fake_medmnist_arrays()
  arrays["train_labels"] = np.array([{"a": 1}] * 12, dtype=object)
  np.savez(tmp_path / "breastmnist.npz", **arrays)
  assert "pickled Python objects" in _usage_error(medmnist.load_medmnist, "breastmnist",
                                                  data_dir=str(tmp_path), download=False)


# --- hostile files (issue 17): refused by type and size, before any read or allocation ----

def _load_error_writes_nothing(folder, name="breastmnist", **kwargs) -> str:
  """The UsageError of loading `name` from `folder`; the folder must be left as it was."""
  before = sorted(os.listdir(folder))
  kwargs.setdefault("download", False)
  message = _usage_error(medmnist.load_medmnist, name, data_dir=str(folder), **kwargs)
  assert sorted(os.listdir(folder)) == before
  return message


@pytest.mark.parametrize("shape,dtype", [
    ((10**12,), "|u1"),            # 931 GiB of uint8
    ((2**40, 28, 28), "|u1"),      # 784 TiB
    ((10**6, 10**6), "<f8"),       # 7 TiB of float64
    ((2**20, 2**20, 28), "|u1"),
])
@pytest.mark.parametrize("member", ["train_images", "test_labels"])
def test_huge_declared_array_is_refused_before_allocation(tmp_path, shape, dtype, member):
  data_fixtures.write_npz_members(
      str(tmp_path / "breastmnist.npz"),
      {member: data_fixtures.npy_bytes_with_header(shape, dtype)})
  message = _load_error_writes_nothing(tmp_path)
  assert f"array '{member}' declares shape {shape}" in message
  assert "truncated or corrupt" in message and "delete it" in message


def test_huge_header_in_deflated_archive(tmp_path):
  data_fixtures.write_npz_members(
      str(tmp_path / "breastmnist.npz"),
      {"val_images": data_fixtures.npy_bytes_with_header((10**13,))},
      compression=zipfile.ZIP_DEFLATED)
  assert "declares shape (10000000000000,)" in _load_error_writes_nothing(tmp_path)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_header_and_zip_sizes_forged_to_agree(tmp_path, compression):
  # The zip size fields match the forged header, so only the real length can tell.
  path = str(tmp_path / "breastmnist.npz")
  raw = data_fixtures.npy_bytes_with_header((4000, 1000, 1000))
  data_fixtures.write_npz_members(path, {"train_images": raw}, compression=compression)
  header_bytes = len(raw) - 16
  data_fixtures.forge_zip_member_size(path, "train_images.npy", 4 * 10**9 + header_bytes)
  message = _load_error_writes_nothing(tmp_path)
  assert "array 'train_images' claims 3.73 GiB of compressed data, more than the whole" in message


def test_zip_bomb_ratio_is_refused(tmp_path):
  # Deflated member whose size fields claim ~4 GB from a few bytes: beyond deflate's ratio.
  path = str(tmp_path / "breastmnist.npz")
  raw = data_fixtures.npy_bytes_with_header((4000, 1000, 1000))
  data_fixtures.write_npz_members(path, {"train_images": raw},
                                  compression=zipfile.ZIP_DEFLATED)
  with zipfile.ZipFile(path) as zf:
    compressed = zf.getinfo("train_images.npy").compress_size
  import struct  # pylint: disable=g-import-not-at-top
  with open(path, "r+b") as f:  # Only the uncompressed size: the data still fits the file.
    data = bytearray(f.read())
    with zipfile.ZipFile(path) as zf:
      info, central = zf.getinfo("train_images.npy"), zf.start_dir
    struct.pack_into("<I", data, info.header_offset + 22, 4 * 10**9 + len(raw) - 16)
    pos = central
    while data[pos:pos + 4] == b"PK\x01\x02":
      n, m, k = struct.unpack_from("<HHH", data, pos + 28)
      if data[pos + 46:pos + 46 + n] == b"train_images.npy":
        struct.pack_into("<I", data, pos + 24, 4 * 10**9 + len(raw) - 16)
      pos += 46 + n + m + k
    f.seek(0)
    f.write(data)
  message = _load_error_writes_nothing(tmp_path)
  assert f"claims to expand {compressed} bytes of compressed data into 3.73 GiB" in message


def test_arrays_larger_than_memory_are_refused(monkeypatch, tmp_path):
  data_fixtures.write_fake_medmnist(str(tmp_path), "breastmnist")
  monkeypatch.setattr(medmnist.guards, "memory_limit_bytes", lambda: 4096)
  message = _load_error_writes_nothing(tmp_path)
  assert "more than this machine's memory (4096 bytes)" in message


def test_zero_byte_file(tmp_path):
  (tmp_path / "breastmnist.npz").write_bytes(b"")
  assert "is empty (0 bytes)" in _load_error_writes_nothing(tmp_path)
  # Downloading does not overwrite it either: the user must look at it.
  assert "is empty (0 bytes)" in _load_error_writes_nothing(tmp_path, download=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("options", [dict(), dict(download=True), dict(verify_md5=True)])
def test_fifo_instead_of_npz_is_refused_not_opened(tmp_path, options):
  os.mkfifo(tmp_path / "breastmnist.npz")
  message = _load_error_writes_nothing(tmp_path, **options)
  assert "breastmnist.npz is a named pipe (FIFO), not a regular file" in message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("options", [dict(), dict(verify_md5=True)])
def test_device_instead_of_npz(tmp_path, options):
  os.symlink("/dev/zero", tmp_path / "breastmnist.npz")  # Never ends: md5 would spin.
  message = _load_error_writes_nothing(tmp_path, **options)
  assert "is a character device, not a regular file" in message


@pytest.mark.parametrize("options", [dict(), dict(verify_md5=True), dict(download=True)])
def test_folder_named_like_the_npz(tmp_path, options):
  (tmp_path / "breastmnist.npz").mkdir()
  message = _load_error_writes_nothing(tmp_path, **options)
  assert "breastmnist.npz is a folder, not a regular file" in message


@pytest.mark.parametrize("links", [
    {"breastmnist.npz": "breastmnist.npz"},                        # loop of length 1
    {"breastmnist.npz": "other.npz", "other.npz": "breastmnist.npz"},  # length 2
])
@pytest.mark.parametrize("download", [False, True])
def test_symlink_loop_instead_of_npz(tmp_path, links, download):
  for name, target in links.items():
    os.symlink(target, tmp_path / name)
  message = _load_error_writes_nothing(tmp_path, download=download)
  assert "breastmnist.npz is a symbolic link loop" in message
  assert all(os.path.islink(tmp_path / name) for name in links)  # Not replaced by a download.


def test_broken_symlink_instead_of_npz(tmp_path):
  os.symlink(tmp_path / "gone.npz", tmp_path / "breastmnist.npz")
  message = _load_error_writes_nothing(tmp_path)
  assert "is a broken symbolic link" in message and "gone.npz" in message


# --- download ---------------------------------------------------------------------------------

def _no_partial_files(folder) -> bool:
  return not [f for f in os.listdir(folder) if f.endswith(".part")]


def test_download_real_file_from_local_server(monkeypatch, tmp_path):
  served, target = tmp_path / "served", tmp_path / "target"
  served.mkdir()
  target.mkdir()
  shutil.copy(os.path.join(data_fixtures.real_data_dir(), "breastmnist.npz"), served)
  with data_fixtures.http_server(str(served)) as url:
    monkeypatch.setenv(medmnist.URL_ENV, url)
    splits = medmnist.load_medmnist("breastmnist", data_dir=str(target))
  assert len(splits.train_images) == 546
  assert os.listdir(target) == ["breastmnist.npz"]
  assert medmnist.download_lib.md5_of_file(str(target / "breastmnist.npz")) == (
      medmnist.get_spec("breastmnist").md5[28])


def test_download_into_default_cache_creates_it(monkeypatch, tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  path = data_fixtures.write_fake_medmnist(str(served), "dermamnist", channels=3,
                                           num_classes=7)
  with open(path, "rb") as f:
    md5 = hashlib.md5(f.read()).hexdigest()
  monkeypatch.setitem(medmnist.get_spec("dermamnist").md5, 28, md5)
  with data_fixtures.http_server(str(served)) as url:
    monkeypatch.setenv(medmnist.URL_ENV, url)
    splits = medmnist.load_medmnist("dermamnist")
  cache = tmp_path / "xdg_cache/tff_dpmed/medmnist"
  assert os.listdir(cache) == ["dermamnist.npz"]
  assert splits.info.image_shape == (28, 28, 3)


def test_download_md5_mismatch_leaves_nothing(monkeypatch, tmp_path):
  served, target = tmp_path / "served", tmp_path / "target"
  served.mkdir()
  target.mkdir()
  data_fixtures.write_fake_medmnist(str(served), "breastmnist")  # Not the official bytes.
  with data_fixtures.http_server(str(served)) as url:
    monkeypatch.setenv(medmnist.URL_ENV, url)
    message = _usage_error(medmnist.load_medmnist, "breastmnist", data_dir=str(target))
  assert "MD5" in message and "750601b1f35ba3300ea97c75c52ff8f6" in message
  assert os.listdir(target) == []


def test_download_http_404(monkeypatch, tmp_path):
  served, target = tmp_path / "served", tmp_path / "target"
  served.mkdir()
  target.mkdir()
  with data_fixtures.http_server(str(served)) as url:
    monkeypatch.setenv(medmnist.URL_ENV, url)
    message = _usage_error(medmnist.load_medmnist, "breastmnist", data_dir=str(target))
  assert "HTTP 404" in message and "put breastmnist.npz into" in message
  assert os.listdir(target) == []


def test_download_unreachable_server(monkeypatch, tmp_path):
  port = data_fixtures.closed_port()
  monkeypatch.setenv(medmnist.URL_ENV, f"http://127.0.0.1:{port}/files")
  message = _usage_error(medmnist.load_medmnist, "breastmnist", data_dir=str(tmp_path))
  assert message.startswith("could not download breastmnist.npz from "
                            f"http://127.0.0.1:{port}/files/breastmnist.npz (offline?)")
  assert f"put breastmnist.npz into {tmp_path} or pass --data_dir" in message
  assert os.listdir(tmp_path) == []


class _StallingHandler(http.server.SimpleHTTPRequestHandler):
  """Sends half the file, then waits for the test before sending the rest."""

  body = b""
  half_sent = threading.Event()
  release = threading.Event()
  cut_short = False

  def do_GET(self):  # pylint: disable=invalid-name
    cls = type(self)
    self.send_response(200)
    self.send_header("Content-Length", str(len(cls.body)))
    self.end_headers()
    half = len(cls.body) // 2
    self.wfile.write(cls.body[:half])
    self.wfile.flush()
    cls.half_sent.set()
    if not cls.release.wait(timeout=30) or cls.cut_short:
      return  # Connection closes with the body incomplete.
    self.wfile.write(cls.body[half:])

  def log_message(self, *args):
    pass


def _stalling_server(tmp_path, cut_short):
  real = os.path.join(data_fixtures.real_data_dir(), "breastmnist.npz")
  with open(real, "rb") as f:
    body = f.read()
  handler = type("Handler", (_StallingHandler,),
                 {"body": body, "half_sent": threading.Event(),
                  "release": threading.Event(), "cut_short": cut_short})
  return handler, data_fixtures.http_server(str(tmp_path), handler_cls=handler)


def test_download_is_atomic(monkeypatch, tmp_path):
  target = tmp_path / "target"
  target.mkdir()
  handler, server = _stalling_server(tmp_path, cut_short=False)
  result = {}
  with server as url:
    monkeypatch.setenv(medmnist.URL_ENV, url)
    loader = threading.Thread(target=lambda: result.update(
        splits=medmnist.load_medmnist("breastmnist", data_dir=str(target))))
    loader.start()
    assert handler.half_sent.wait(timeout=30)
    # Mid-download: only a hidden partial file, never a half file under the real name.
    assert not (target / "breastmnist.npz").exists()
    assert not _no_partial_files(target)
    handler.release.set()
    loader.join(timeout=60)
  assert len(result["splits"].val_images) == 78
  assert os.listdir(target) == ["breastmnist.npz"]


def test_interrupted_download_leaves_nothing(monkeypatch, tmp_path):
  target = tmp_path / "target"
  target.mkdir()
  handler, server = _stalling_server(tmp_path, cut_short=True)
  handler.release.set()
  with server as url:
    monkeypatch.setenv(medmnist.URL_ENV, url)
    message = _usage_error(medmnist.load_medmnist, "breastmnist", data_dir=str(target))
  assert "breastmnist.npz" in message
  assert os.listdir(target) == []
