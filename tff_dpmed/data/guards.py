"""Checks every data source runs before it touches a file or allocates memory.

Hostile or broken inputs must end in a one-line `UsageError`, never in a hang
(a FIFO opened for reading blocks until a writer appears), a traceback
(ELOOP from a symlink loop) or a MemoryError (a header declaring a terabyte
array). These helpers are TF-free.
"""

import errno
import os
import stat

import numpy as np

from tff_dpmed.errors import UsageError

# Largest square side an image source accepts. MedMNIST stops at 224 px; this
# leaves room for any realistic medical input while keeping one image < 50 MB.
MAX_IMAGE_SIZE = 4096

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def stat_path(path: str, fix: str) -> os.stat_result:
  """`os.stat(path)` (following links); a link loop or broken link is a UsageError."""
  try:
    return os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UsageError(f"{path} is a symbolic link loop (it never reaches a real file or "
                       f"folder): {fix}") from None
    if e.errno == errno.ENOENT and os.path.islink(path):
      raise UsageError(f"{path} is a broken symbolic link (its target "
                       f"{os.readlink(path)} does not exist): {fix}") from None
    if e.errno == errno.ENOENT:
      raise UsageError(f"{path} does not exist: {fix}") from None
    raise UsageError(f"cannot access {path} ({e.strerror or e}): {fix}") from None


def require_regular_file(path: str, fix: str) -> os.stat_result:
  """Stats `path` and refuses anything but a regular file, before anyone opens it.

  Opening a FIFO for reading blocks forever without a writer, and a device
  such as /dev/zero never ends; both must be refused by type, not by reading.
  """
  st = stat_path(path, fix)
  if not stat.S_ISREG(st.st_mode):
    kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
    raise UsageError(f"{path} is {kind}, not a regular file: {fix}")
  return st


def require_folder(path: str, fix: str) -> os.stat_result:
  """Stats `path` and refuses anything but a folder (link loops included)."""
  st = stat_path(path, fix)
  if not stat.S_ISDIR(st.st_mode):
    kind = next((k for test, k in _KINDS if test(st.st_mode)), "a file")
    raise UsageError(f"{path} is {kind}, not a folder: {fix}")
  return st


def memory_limit_bytes() -> int:
  """The most memory one dataset may declare: this machine's physical memory."""
  try:
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):  # Not POSIX: a conservative 16 GiB.
    return 16 << 30


def gib(n_bytes: int) -> str:
  """A byte count for messages: '3.2 GiB', or exact bytes when small."""
  if n_bytes < 1 << 20:
    return f"{n_bytes} bytes"
  return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 1 << 30 else f"{n_bytes / 2**20:.3g} MiB"


def check_memory(n_bytes: int, what: str, fix: str) -> None:
  """Refuses to allocate `n_bytes` for `what` when it exceeds `memory_limit_bytes()`."""
  limit = memory_limit_bytes()
  if n_bytes > limit:
    raise UsageError(f"{what} needs {gib(n_bytes)}, more than this machine's memory "
                     f"({gib(limit)}): {fix}")


def check_image_size(image_size) -> int:
  """A positive integer no larger than MAX_IMAGE_SIZE, as an int."""
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
      or image_size < 1:
    raise UsageError(f"image size must be a positive integer, got {image_size!r}: pass "
                     "e.g. --image_size=28")
  if image_size > MAX_IMAGE_SIZE:
    raise UsageError(f"image size {image_size} is larger than the supported maximum of "
                     f"{MAX_IMAGE_SIZE} pixels: pass a smaller --image_size, e.g. 224")
  return int(image_size)


def check_seed(seed) -> int:
  """A non-negative integer seed for NumPy's generators, as an int."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UsageError(f"seed must be a non-negative integer, got {seed!r}: pass e.g. "
                     "--seed=0")
  return int(seed)
