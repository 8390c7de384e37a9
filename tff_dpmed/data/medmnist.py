"""The 2-D MedMNIST v3 datasets: metadata, download, and strict .npz loading.

Metadata (task, label names, channels, split sizes, per-size MD5s) is copied
from MedMNIST 3.0.2's `medmnist/info.py`; the files are the Zenodo record
10519652. A file is `<name>.npz` for 28 px and `<name>_<size>.npz` for
64/128/224 px, with the keys `{train,val,test}_{images,labels}`.

Existing files are checked structurally (keys, dtypes, shapes, label range)
rather than by MD5, which takes seconds for the 224 px files; pass
`verify_md5=True` to also check it. Downloads are always MD5-checked.

Why this module is over 400 lines: the metadata table of every 2-D dataset
and the pre-load checks of each .npy header (declared size against the zip
member, zip-bomb ratio, memory) belong with the one loader they guard.
"""

import dataclasses
import math
import os
from typing import Optional
import zipfile
import zlib

import numpy as np

from tff_dpmed.data import download as download_lib
from tff_dpmed.data import guards
from tff_dpmed.data.types import DatasetInfo, ImageSplits
from tff_dpmed.errors import UsageError

IMAGE_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
DATA_DIR_ENV = "TFF_DPMED_DATA_DIR"
URL_ENV = "TFF_DPMED_MEDMNIST_URL"
DEFAULT_BASE_URL = "https://zenodo.org/records/10519652/files"

_ORGAN_LABELS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left",
                 "kidney-right", "liver", "lung-left", "lung-right", "pancreas", "spleen")


@dataclasses.dataclass(frozen=True)
class MedMNISTSpec:
  """One MedMNIST dataset as `medmnist/info.py` describes it."""

  name: str
  task: str  # MedMNIST's vocabulary, see types.TASKS.
  class_names: tuple[str, ...]
  n_channels: int
  n_samples: dict  # split -> number of examples (the same at every size).
  md5: dict  # image size -> hex MD5 of the official file.
  license: str = "CC BY 4.0"


def _spec(name, task, class_names, n_channels, n_samples, md5s, license="CC BY 4.0"):
  return MedMNISTSpec(name=name, task=task, class_names=tuple(class_names),
                      n_channels=n_channels,
                      n_samples=dict(zip(SPLITS, n_samples)),
                      md5=dict(zip(IMAGE_SIZES, md5s)), license=license)


# Only the 2-D datasets; the 3-D ones (organmnist3d, ...) are volumes.
MEDMNIST_DATASETS: dict[str, MedMNISTSpec] = {s.name: s for s in (
    _spec("pathmnist", "multi-class",
          ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
           "normal colon mucosa", "cancer-associated stroma",
           "colorectal adenocarcinoma epithelium"),
          3, (89996, 10004, 7180),
          ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
           "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec")),
    # MedMNIST calls this task "multi-label, binary-class".
    _spec("chestmnist", "multi-label",
          ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
           "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
           "fibrosis", "pleural", "hernia"),
          1, (78468, 11219, 22433),
          ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
           "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa")),
    _spec("dermamnist", "multi-class",
          ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
           "benign keratosis-like lesions", "dermatofibroma", "melanoma",
           "melanocytic nevi", "vascular lesions"),
          3, (7007, 1003, 2005),
          ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
           "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
          license="CC BY-NC 4.0"),
    _spec("octmnist", "multi-class",
          ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
          1, (97477, 10832, 1000),
          ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
           "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3")),
    _spec("pneumoniamnist", "binary-class", ("normal", "pneumonia"),
          1, (4708, 524, 624),
          ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
           "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1")),
    # Ordinal grades 0-4; models treat them as 5 classes (softmax).
    _spec("retinamnist", "ordinal-regression", ("0", "1", "2", "3", "4"),
          3, (1080, 120, 400),
          ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
           "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348")),
    _spec("breastmnist", "binary-class", ("malignant", "normal, benign"),
          1, (546, 78, 156),
          ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
           "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b")),
    _spec("bloodmnist", "multi-class",
          ("basophil", "eosinophil", "erythroblast",
           "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
           "lymphocyte", "monocyte", "neutrophil", "platelet"),
          3, (11959, 1712, 3421),
          ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
           "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601")),
    _spec("tissuemnist", "multi-class",
          ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
           "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
           "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
          1, (165466, 23640, 47280),
          ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
           "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c")),
    _spec("organamnist", "multi-class", _ORGAN_LABELS,
          1, (34561, 6491, 17778),
          ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
           "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170")),
    _spec("organcmnist", "multi-class", _ORGAN_LABELS,
          1, (12975, 2392, 8216),
          ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
           "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1")),
    _spec("organsmnist", "multi-class", _ORGAN_LABELS,
          1, (13932, 2452, 8827),
          ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
           "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1")),
)}
MEDMNIST_NAMES = tuple(MEDMNIST_DATASETS)
# Named in errors so "not supported" is not mistaken for a typo.
MEDMNIST_3D_NAMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                     "vesselmnist3d", "synapsemnist3d")


def get_spec(name: str) -> MedMNISTSpec:
  """The metadata of a 2-D MedMNIST dataset; UsageError for any other name."""
  key = name.strip().lower()
  if key in MEDMNIST_DATASETS:
    return MEDMNIST_DATASETS[key]
  if key in MEDMNIST_3D_NAMES:
    raise UsageError(f"'{name}' is a 3-D MedMNIST dataset, which tff_dpmed does not "
                     f"support: use a 2-D one ({', '.join(MEDMNIST_NAMES)})")
  raise UsageError(f"unknown MedMNIST dataset '{name}': use one of {', '.join(MEDMNIST_NAMES)}")


def file_name(name: str, image_size: int = 28) -> str:
  """`<name>.npz` at 28 px, else `<name>_<size>.npz`, as on Zenodo."""
  spec = get_spec(name)
  _check_image_size(image_size)
  return f"{spec.name}.npz" if image_size == 28 else f"{spec.name}_{image_size}.npz"


def file_url(name: str, image_size: int = 28) -> str:
  """The download URL; `TFF_DPMED_MEDMNIST_URL` replaces the Zenodo folder (mirrors, tests)."""
  base = os.environ.get(URL_ENV, "").strip()
  fname = file_name(name, image_size)
  if base:
    return f"{base.rstrip('/')}/{fname}"
  # Without ?download=1 Zenodo may answer with an HTML preview page.
  return f"{DEFAULT_BASE_URL}/{fname}?download=1"


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/tff_dpmed/medmnist`, by default `~/.cache/tff_dpmed/medmnist`."""
  cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "tff_dpmed", "medmnist")


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """The folder MedMNIST files are read from and downloaded to (absolute path).

  In order: `data_dir` if given, else the environment variable
  `TFF_DPMED_DATA_DIR`, else `default_cache_dir()`. A folder the user named
  (argument or environment) must exist; the default cache folder need not, as
  it is created when a file is downloaded into it.

  Raises:
    UsageError: a named folder does not exist or is not a folder.
  """
  if data_dir is not None and str(data_dir).strip():
    path, where = str(data_dir), "--data_dir"
  elif os.environ.get(DATA_DIR_ENV, "").strip():
    path, where = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
  else:
    return os.path.abspath(default_cache_dir())
  path = os.path.abspath(os.path.expanduser(path.strip()))
  if not os.path.exists(path):
    raise UsageError(f"data directory {path} (from {where}) does not exist: create it "
                     f"or point {where} at the folder holding the dataset files")
  if not os.path.isdir(path):
    raise UsageError(f"data directory {path} (from {where}) is a file, not a folder: "
                     f"point {where} at the folder holding the dataset files")
  return path


def _check_image_size(image_size) -> None:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
      or image_size not in IMAGE_SIZES:
    raise UsageError(f"MedMNIST has no image size {image_size!r}: use one of "
                     f"{', '.join(map(str, IMAGE_SIZES))}")


def load_medmnist(name: str, image_size: int = 28, data_dir: Optional[str] = None,
                  download: bool = True, verify_md5: bool = False) -> ImageSplits:
  """Loads a 2-D MedMNIST dataset, downloading the official file if it is missing.

  Args:
    name: dataset name, e.g. "pneumoniamnist" (case-insensitive).
    image_size: 28, 64, 128 or 224.
    data_dir: folder of .npz files; see `resolve_data_dir` for the default.
    download: fetch a missing file (MD5-checked); if False a missing file is an error.
    verify_md5: also check the MD5 of a file that is already there (slow for big files).

  Returns:
    ImageSplits with uint8 NHWC images and int64 labels, `(N,)` or, for
    chestmnist, `(N, 14)` 0/1.

  Raises:
    UsageError: unknown name or size, missing/corrupt/invalid file, failed download.
  """
  spec = get_spec(name)
  fname = file_name(spec.name, image_size)
  folder = resolve_data_dir(data_dir)
  path = os.path.join(folder, fname)
  if not os.path.lexists(path):  # lexists: a broken link or link loop is reported below.
    if not download:
      raise UsageError(f"{fname} not found in {folder}: put the official file there, or "
                       "enable downloading (--download)")
    os.makedirs(folder, exist_ok=True)  # Only the default cache folder can be missing here.
    download_lib.download_file(file_url(spec.name, image_size), path,
                               md5=spec.md5[image_size], what=fname)
  # Before any open(): a FIFO would block forever, a folder or device is never an .npz.
  guards.require_regular_file(path, f"replace it with the official {fname}, or delete it "
                              "to download it again")
  if verify_md5:
    got = download_lib.md5_of_file(path)
    if got != spec.md5[image_size]:
      raise UsageError(f"{path} has MD5 {got}, expected {spec.md5[image_size]}: it is not "
                       "the official file; delete it to download it again")
  return load_npz(path, spec, image_size)


def load_npz(path: str, spec: MedMNISTSpec, image_size: int) -> ImageSplits:
  """Reads and validates one MedMNIST-format .npz file (see `load_medmnist`)."""
  redo = "delete it to download it again, or replace it with the official file"
  keys = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
  arrays, names = _read_npz(path, keys)
  for key in keys:
    if key not in arrays:
      raise UsageError(f"{path} has no array '{key}' (it has "
                       f"{', '.join(sorted(names)) or 'none'}): it is not a MedMNIST "
                       f"file; {redo}")
  images = _images_to_uint8(path, arrays, spec, image_size, redo)
  out = {}
  for split in SPLITS:
    out[f"{split}_images"] = images[split]
    out[f"{split}_labels"] = _check_labels(path, split, arrays[f"{split}_labels"], spec,
                                           len(images[split]), redo)
  info = DatasetInfo(name=spec.name, task=spec.task, class_names=spec.class_names,
                     image_shape=(image_size, image_size, spec.n_channels))
  return ImageSplits(info=info, **out)


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # A member, or an empty archive.
# Deflate cannot expand more than ~1032:1; more means a lying size field (zip bomb).
_MAX_DEFLATE_RATIO = 1100
_MAX_HEADER_BYTES = 10000  # NumPy's own default limit for .npy headers.


def _npy_header(f, key: str, path: str, fix: str):
  """(shape, dtype, header length) of a .npy stream, read without loading any data."""
  fmt = np.lib.format
  try:
    version = fmt.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = fmt.read_array_header_1_0(f, max_header_size=_MAX_HEADER_BYTES)
    elif version == (2, 0):
      shape, _, dtype = fmt.read_array_header_2_0(f, max_header_size=_MAX_HEADER_BYTES)
    else:  # 3.0 (utf-8 field names) has no public reader; NumPy reads it like 2.0.
      shape, _, dtype = fmt._read_array_header(  # pylint: disable=protected-access
          f, version, max_header_size=_MAX_HEADER_BYTES)
  except (ValueError, TypeError, SyntaxError, EOFError) as e:
    detail = " ".join(str(e).split()) or type(e).__name__
    raise UsageError(f"{path} is truncated or corrupt (array '{key}' has an unreadable "
                     f".npy header: {detail}): {fix}") from None
  return tuple(shape), dtype, f.tell()


def _read_npz(path: str, keys) -> tuple[dict, list]:
  """The arrays `keys` of an .npz file (those present) and the names of all its arrays.

  Every header is checked before any array is allocated: the declared
  shape x dtype must match the bytes the archive holds for it, those bytes
  must fit in the file (and within deflate's maximum ratio), and the arrays
  together must fit in memory. So a forged header is a one-line UsageError,
  not a MemoryError. Pickled (object) arrays are refused, never loaded.
  """
  fix = "delete it and download it again (or copy the official file there)"
  archive_bytes = os.path.getsize(path)
  if archive_bytes == 0:
    raise UsageError(f"{path} is empty (0 bytes), e.g. from an interrupted copy: {fix}")
  with open(path, "rb") as f:
    head = f.read(len(_NPY_MAGIC))
  if head.startswith(_NPY_MAGIC):
    raise UsageError(f"{path} is a single .npy array, not an .npz archive: {fix}")
  if not head.startswith(_ZIP_MAGICS):
    raise UsageError(f"{path} is truncated or corrupt (not a zip archive; it starts with "
                     f"{head[:4]!r}): {fix}")
  try:
    with zipfile.ZipFile(path) as zf:
      members = {i.filename[:-len(".npy")]: i for i in zf.infolist()
                 if i.filename.endswith(".npy")}
      wanted = [k for k in keys if k in members]
      declared = 0
      for key in wanted:
        info = members[key]
        with zf.open(info) as f:
          shape, dtype, header_bytes = _npy_header(f, key, path, fix)
        if dtype.hasobject:
          raise UsageError(f"{path}: array '{key}' holds pickled Python objects ({dtype}), "
                           "which tff_dpmed never loads: it is not a MedMNIST file; "
                           f"{fix}")
        nbytes = math.prod(shape) * dtype.itemsize
        stored = info.file_size - header_bytes
        if nbytes != stored:
          raise UsageError(
              f"{path} is truncated or corrupt (array '{key}' declares shape {shape} of "
              f"{dtype}, {guards.gib(nbytes)}, but the archive holds "
              f"{guards.gib(max(stored, 0))} for it): {fix}")
        if info.header_offset + info.compress_size > archive_bytes:
          raise UsageError(
              f"{path} is truncated or corrupt (array '{key}' claims "
              f"{guards.gib(info.compress_size)} of compressed data, more than the whole "
              f"{guards.gib(archive_bytes)} file): {fix}")
        if (info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size) \
            or (info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + (1 << 16)):
          raise UsageError(
              f"{path} is truncated or corrupt (array '{key}' claims to expand "
              f"{guards.gib(info.compress_size)} of compressed data into "
              f"{guards.gib(nbytes)}, more than zip compression can): {fix}")
        declared += nbytes
      guards.check_memory(declared, f"{path} (its arrays)",
                          "use a smaller image size or dataset, or a machine with more "
                          "memory")
      arrays = {}
      for key in wanted:
        with zf.open(members[key]) as f:
          arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
      return arrays, list(members)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, EOFError,
          OSError, KeyError, NotImplementedError, RuntimeError) as e:
    # Truncated downloads land here (BadZipFile, EOFError), as do unsupported
    # compression (NotImplementedError) and encrypted archives (RuntimeError).
    detail = " ".join(str(e).split()) or type(e).__name__
    raise UsageError(f"{path} is truncated or corrupt ({detail}): {fix}") from e
  except MemoryError:  # Headers passed the checks, but memory ran out meanwhile.
    raise UsageError(f"not enough free memory to load {path}: close other programs or use "
                     "a smaller image size or dataset") from None


def _images_to_uint8(path, arrays, spec, image_size, redo) -> dict:
  """Checks the three image arrays and returns them as uint8 NHWC."""
  raw = {s: arrays[f"{s}_images"] for s in SPLITS}
  for split, x in raw.items():
    key = f"{split}_images"
    if x.dtype.kind not in "uf":
      raise UsageError(f"{path}: '{key}' has dtype {x.dtype}, expected uint8 (or float "
                       f"in [0, 1] or [0, 255]); {redo}")
    if x.dtype.kind == "u" and x.dtype != np.uint8:
      raise UsageError(f"{path}: '{key}' has dtype {x.dtype}, expected uint8 (or float "
                       f"in [0, 1] or [0, 255]); {redo}")
    if x.ndim not in (3, 4):
      raise UsageError(f"{path}: '{key}' has shape {x.shape}, expected (N, H, W) or "
                       f"(N, H, W, C); {redo}")
    channels = 1 if x.ndim == 3 else x.shape[3]
    if channels != spec.n_channels:
      kind = {1: "grey (1 channel)", 3: "RGB (3 channels)"}[spec.n_channels]
      raise UsageError(f"{path}: '{key}' has {channels} channel(s) (shape {x.shape}) but "
                       f"{spec.name} is {kind}; {redo}")
    if x.shape[1:3] != (image_size, image_size):
      raise UsageError(
          f"{path}: '{key}' holds {x.shape[1]}x{x.shape[2]} images, expected "
          f"{image_size}x{image_size} for image size {image_size}: replace it with the "
          f"official {image_size} px file (delete it to download it again)")
    if x.shape[0] == 0:
      raise UsageError(f"{path}: '{key}' holds no images; {redo}")
  # Float files are scaled as a whole so all splits get the same mapping.
  floats = [x for x in raw.values() if x.dtype.kind == "f"]
  scale = 1.0
  if floats:
    for split, x in raw.items():
      if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise UsageError(f"{path}: '{split}_images' has NaN or infinite pixels; {redo}")
    lo = min(float(x.min()) for x in floats)
    hi = max(float(x.max()) for x in floats)
    if lo < 0.0 or hi > 255.0:
      raise UsageError(f"{path}: float pixels span [{lo:g}, {hi:g}], expected [0, 1] or "
                       f"[0, 255]; {redo}")
    scale = 255.0 if hi <= 1.0 else 1.0  # All-dark [0, 255] images would be misread.
  out = {}
  for split, x in raw.items():
    if x.dtype.kind == "f":
      x = np.rint(x.astype(np.float32) * scale).astype(np.uint8)
    if x.ndim == 3:
      x = x[..., np.newaxis]
    out[split] = np.ascontiguousarray(x)
  return out


def _check_labels(path, split, y, spec, n_images, redo) -> np.ndarray:
  """Checks one label array; returns int64 `(N,)`, or `(N, K)` 0/1 for multi-label."""
  key = f"{split}_labels"
  num_classes = len(spec.class_names)
  if y.dtype.kind not in "iub":
    raise UsageError(f"{path}: '{key}' has dtype {y.dtype}, expected integers; {redo}")
  if y.shape[:1] != (n_images,):
    raise UsageError(f"{path}: '{key}' has {y.shape[0] if y.ndim else 0} labels for "
                     f"{n_images} images in '{split}_images'; {redo}")
  y = y.astype(np.int64)
  if spec.task == "multi-label":
    if y.ndim != 2 or y.shape[1] != num_classes:
      raise UsageError(f"{path}: '{key}' has shape {y.shape}, expected ({n_images}, "
                       f"{num_classes}) 0/1 labels for {spec.name}; {redo}")
    if not np.isin(y, (0, 1)).all():
      bad = y[~np.isin(y, (0, 1))][0]
      raise UsageError(f"{path}: '{key}' holds the value {bad}, expected 0/1 "
                       f"multi-label flags; {redo}")
    return y
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise UsageError(f"{path}: '{key}' has shape {y.shape}, expected ({n_images},) or "
                     f"({n_images}, 1) class indices; {redo}")
  bad = (y < 0) | (y >= num_classes)
  if bad.any():
    raise UsageError(f"{path}: '{key}' holds the label {y[bad][0]}, outside [0, "
                     f"{num_classes}) for {spec.name}'s {num_classes} classes; {redo}")
  return y
