"""Atomic, MD5-checked file download with a progress bar (stdlib urllib only)."""

import hashlib
import http.client
import os
import socket
import tempfile
from typing import Optional
import urllib.error
import urllib.request

import tqdm

from tff_dpmed.errors import UsageError

_CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 60.0


def md5_of_file(path: str) -> str:
  """Hex MD5 of a file, read in chunks so big files need little memory."""
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _network_error_text(e: BaseException) -> str:
  if isinstance(e, urllib.error.HTTPError):
    return f"server answered HTTP {e.code} {e.reason}"
  if isinstance(e, urllib.error.URLError):
    return str(e.reason)
  return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def download_file(url: str, dest: str, md5: Optional[str] = None, *,
                  timeout_s: float = DEFAULT_TIMEOUT_S, what: Optional[str] = None) -> None:
  """Downloads `url` to `dest` so that `dest` is either complete and checked, or absent.

  The bytes go to a hidden temporary file in `dest`'s folder (same file system,
  so the final `os.replace` is atomic) and are hashed while they stream. A
  partial or wrong file is never left at `dest`, and the temporary file is
  removed on every error, including Ctrl-C.

  Args:
    url: http(s) URL of the file.
    dest: final path; its folder must exist.
    md5: expected hex MD5, or None to only check the length the server announced.
    timeout_s: socket timeout for connecting and for each read.
    what: how to name the file in messages (defaults to its base name).

  Raises:
    UsageError: the server is unreachable, answered an error, sent a short or
      wrong file, or the folder is not writable. The message says how to
      provide the file by hand.
  """
  folder = os.path.dirname(os.path.abspath(dest))
  name = os.path.basename(dest)
  what = what or name
  manual = f"put {name} into {folder} or pass --data_dir"
  try:
    fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
  except OSError as e:
    raise UsageError(
        f"cannot write into {folder} ({e.strerror}): make it writable or pass another "
        "--data_dir") from e
  try:
    digest = hashlib.md5()
    received = 0
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        # disable=None: a bar on a terminal, nothing in CI logs.
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"downloading {what}", disable=None, leave=False) as bar:
          for chunk in iter(lambda: resp.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        out.flush()
        # The rename must not publish a file whose bytes are still in the page cache only.
        os.fsync(out.fileno())
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout,
            TimeoutError, ConnectionError) as e:
      raise UsageError(
          f"could not download {what} from {url} (offline?): {_network_error_text(e)}; "
          f"{manual}") from e
    except OSError as e:  # Not a network error (those are caught above): the disk.
      raise UsageError(
          f"could not write {what} into {folder} ({e.strerror or e}): free space or "
          "pass another --data_dir") from e
    if total is not None and received != total:
      raise UsageError(
          f"download of {what} from {url} stopped after {received} of {total} bytes: "
          f"retry, or {manual}")
    got = digest.hexdigest()
    if md5 is not None and got != md5.lower():
      raise UsageError(
          f"downloaded {what} from {url} has MD5 {got}, expected {md5}: the server or a "
          f"proxy sent a different file; retry, or {manual}")
    os.replace(tmp_path, dest)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
