"""Helpers for data tests: the real MedMNIST folder, small fake files, a local HTTP server."""

import contextlib
import functools
import http.server
import os
import socket
import threading
from typing import Iterator, Optional

import numpy as np

SHARED_DATA_DIR = "/work/shared/data/medmnist"
# Read at import: tests clear the variable (monkeypatch) to isolate the loaders.
_DATA_DIR_AT_IMPORT = os.environ.get("TFF_DPMED_DATA_DIR")
# Official sizes of the two real files the tests use.
REAL_SPLIT_SIZES = {"pneumoniamnist": (4708, 524, 624), "breastmnist": (546, 78, 156)}


def real_data_dir() -> str:
  """The folder holding the real pneumoniamnist.npz and breastmnist.npz.

  `TFF_DPMED_DATA_DIR` if set, else the shared folder. A missing folder fails
  the test (rather than skipping it), so a broken setup is never mistaken for
  passing tests.
  """
  path = _DATA_DIR_AT_IMPORT or SHARED_DATA_DIR
  for name in REAL_SPLIT_SIZES:
    if not os.path.isfile(os.path.join(path, f"{name}.npz")):
      raise AssertionError(f"{name}.npz not found in {path}: set TFF_DPMED_DATA_DIR to the "
                           "folder of real MedMNIST files")
  return path


def fake_medmnist_arrays(*, sizes=(12, 4, 4), image_size: int = 28, channels: int = 1,
                         num_classes: int = 2, multi_label: bool = False,
                         grey_rank3: bool = True, seed: int = 0) -> dict:
  """Arrays in the official layout: uint8 images, uint8 `(N, 1)` or `(N, K)` labels.

  Every class appears in every split of at least `num_classes` examples.
  """
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in zip(("train", "val", "test"), sizes):
    shape = (n, image_size, image_size) if channels == 1 and grey_rank3 else (
        n, image_size, image_size, channels)
    arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
    if multi_label:
      arrays[f"{split}_labels"] = rng.integers(0, 2, (n, num_classes), dtype=np.uint8)
    else:
      arrays[f"{split}_labels"] = (np.arange(n) % num_classes).astype(np.uint8)[:, None]
  return arrays


def write_npz(path: str, arrays: dict) -> str:
  """Writes `arrays` as a compressed .npz at exactly `path` (no .npz appended)."""
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)
  return path


def write_fake_medmnist(folder: str, name: str = "breastmnist", *, image_size: int = 28,
                        overrides: Optional[dict] = None, drop: tuple = (),
                        **kwargs) -> str:
  """Writes a fake `<name>[_<size>].npz` into `folder`; returns its path.

  `overrides` replaces arrays; `drop` removes keys (to make invalid files).
  """
  arrays = fake_medmnist_arrays(image_size=image_size, **kwargs)
  arrays.update(overrides or {})
  for key in drop:
    del arrays[key]
  fname = f"{name}.npz" if image_size == 28 else f"{name}_{image_size}.npz"
  return write_npz(os.path.join(folder, fname), arrays)


def write_image(path: str, size=(20, 16), mode: str = "L", seed: int = 0) -> str:
  """Writes a random image with Pillow (format from the extension)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  w, h = size
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  data = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
  Image.fromarray(data[..., 0] if channels == 1 else data, mode=mode).save(path)
  return path


def closed_port() -> int:
  """A 127.0.0.1 port nothing listens on (bound, then released)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):  # Keep pytest output clean.
    pass


@contextlib.contextmanager
def http_server(directory: str, handler_cls=_QuietHandler) -> Iterator[str]:
  """Serves `directory` on an ephemeral 127.0.0.1 port; yields the base URL."""
  handler = functools.partial(handler_cls, directory=directory)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def npy_bytes_with_header(shape, dtype: str = "|u1", data: bytes = b"\0" * 16) -> bytes:
  """A .npy member whose header declares `shape` x `dtype` but that holds only `data`."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.lib.format.write_array_header_2_0(
      buf, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
  return buf.getvalue() + data


def write_npz_members(path: str, members: dict, compression: int = None) -> str:
  """Writes an .npz from raw member bytes ({'train_images': b'...'}) plus fake arrays.

  Keys missing from `members` get valid arrays from `fake_medmnist_arrays()`,
  so only the forged members are wrong.
  """
  import io  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  compression = zipfile.ZIP_STORED if compression is None else compression
  with zipfile.ZipFile(path, "w", compression=compression) as zf:
    for key, value in fake_medmnist_arrays().items():
      if key not in members:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, value, allow_pickle=False)
        zf.writestr(f"{key}.npy", buf.getvalue())
    for key, raw in members.items():
      zf.writestr(f"{key}.npy", raw)
  return path


def forge_zip_member_size(path: str, member: str, size: int) -> None:
  """Rewrites the (un)compressed-size fields of `member` in both zip headers to `size`.

  Makes an archive whose size fields agree with a forged .npy header, so
  only the check against the real file length can catch it.
  """
  import struct  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(member)
    central = zf.start_dir
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    struct.pack_into("<II", data, info.header_offset + 18, size, size)
    pos = central
    while data[pos:pos + 4] == b"PK\x01\x02":
      n, m, k = struct.unpack_from("<HHH", data, pos + 28)
      if data[pos + 46:pos + 46 + n].decode() == member:
        struct.pack_into("<II", data, pos + 20, size, size)
      pos += 46 + n + m + k
    f.seek(0)
    f.write(data)
