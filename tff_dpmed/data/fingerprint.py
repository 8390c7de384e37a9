"""Content fingerprints of training data (TF-free), to refuse resuming on changed data.

A fingerprint is the SHA-256 of the train images and labels: for each array
its dtype, shape and raw C-order bytes, framed so that no two different
inputs (e.g. a pixel moved into the labels, or the same bytes reshaped) hash
alike. It depends only on the array contents, not on the memory layout, the
source (MedMNIST, TFDS, folder) or the machine's byte order.
"""

import hashlib

import numpy as np

_VERSION = b"tff_dpmed.train_fingerprint.v1"
_CHUNK_ROWS_BYTES = 64 << 20  # Hash big arrays in slices: no full copy of the data.


def _update(digest, name: str, array) -> None:
  a = np.asarray(array)
  if a.dtype.hasobject:
    raise TypeError(f"cannot fingerprint {name} of dtype {a.dtype}: pass numeric arrays")
  dtype = a.dtype.newbyteorder("<")  # Same values, same hash, on any machine.
  header = f"{name}|{dtype.str}|{a.shape}".encode()
  digest.update(len(header).to_bytes(8, "little") + header)
  digest.update(int(a.nbytes).to_bytes(8, "little"))
  if a.ndim == 0 or a.size == 0:
    digest.update(np.ascontiguousarray(a, dtype=dtype).tobytes())
    return
  row_bytes = max(1, a.nbytes // len(a))
  step = max(1, _CHUNK_ROWS_BYTES // row_bytes)
  for start in range(0, len(a), step):
    digest.update(np.ascontiguousarray(a[start:start + step], dtype=dtype).data)


def arrays_fingerprint(**arrays) -> str:
  """Hex SHA-256 over named arrays (sorted by name): dtype, shape and bytes of each."""
  digest = hashlib.sha256(_VERSION)
  for name in sorted(arrays):
    _update(digest, name, arrays[name])
  return digest.hexdigest()


def train_fingerprint(splits) -> str:
  """Hex SHA-256 of an `ImageSplits`' train images and labels (see module docstring).

  Changes when any pixel, label, shape or dtype of the training split
  changes; val/test and the dataset info do not enter it.
  """
  return arrays_fingerprint(train_images=splits.train_images,
                            train_labels=splits.train_labels)
