"""A folder of PNG/JPEG images with one sub-folder per class (spec `folder:PATH`).

Two layouts:

  PATH/<class>/<image>                     split 80/10/10 per class by seed
  PATH/{train,val,test}/<class>/<image>    the given splits

Class names are the sorted class folder names (of train/ in the second
layout; val/ and test/ may lack a class but not add one). Images are decoded
with Pillow and resized to a square (bilinear, antialiased; non-square images
are stretched). The dataset is grey if every image is grey, else RGB (grey
images are then replicated to 3 channels); alpha channels are dropped and
16-bit grey images are scaled to 8 bits.
"""

import os
import stat

import numpy as np
from PIL import Image

from tff_dpmed.data import guards
from tff_dpmed.data.types import DatasetInfo, ImageSplits
from tff_dpmed.errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_DIRS = ("train", "val", "test")
HELD_OUT_FRACTION = 0.1  # Each of val and test, per class.
_GREY_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L")
_UNSUPPORTED_MODES = ("I", "F")  # 32-bit: no range to map to 8 bits.
# Files that operating systems drop into folders; they are not data.
_IGNORED_FILES = ("thumbs.db", "desktop.ini")


_LINK_FIX = "remove the link or point it at a real file or folder"


def _entries(path: str) -> list[tuple[str, str, os.stat_result]]:
  """(name, path, stat) of the visible entries of a folder, sorted by name.

  Stats follow symbolic links (linked class folders and images work), and a
  link loop or broken link is a UsageError here, before anything is opened.
  """
  out = []
  for entry in sorted(os.scandir(path), key=lambda e: e.name):
    if entry.name.startswith(".") or entry.name.lower() in _IGNORED_FILES:
      continue
    out.append((entry.name, entry.path, guards.stat_path(entry.path, _LINK_FIX)))
  return out


def _subdirs(path: str) -> list[str]:
  return [name for name, _, st in _entries(path) if stat.S_ISDIR(st.st_mode)]


def _class_files(class_dir: str) -> list[str]:
  """The image files of one class folder, sorted; other files are an error."""
  files = []
  for name, path, st in _entries(class_dir):
    if stat.S_ISDIR(st.st_mode):
      raise UsageError(f"{path} is a folder inside class folder {class_dir}: put the "
                       "images of each class directly into its folder")
    if not name.lower().endswith(IMAGE_EXTENSIONS):
      raise UsageError(f"{path} is not a PNG or JPEG file: remove it or convert it "
                       f"(accepted: {', '.join(IMAGE_EXTENSIONS)})")
    # A FIFO named x.png would block Pillow's open() forever; a device never ends.
    guards.require_regular_file(path, "remove it or replace it with a PNG/JPEG file")
    files.append(path)
  if not files:
    raise UsageError(f"class folder {class_dir} has no images: add PNG/JPEG images or "
                     "remove the folder")
  return files


def _scan(root: str, what: str) -> dict[str, list[str]]:
  """class name -> image paths of one folder holding class sub-folders."""
  classes = _subdirs(root)
  if not classes:
    loose = any(stat.S_ISREG(st.st_mode) and name.lower().endswith(IMAGE_EXTENSIONS)
                for name, _, st in _entries(root))
    hint = " (it holds images directly)" if loose else ""
    raise UsageError(f"{what} {root} has no class sub-folders{hint}: put the images of "
                     "each class into their own sub-folder, e.g. normal/ and pneumonia/")
  return {c: _class_files(os.path.join(root, c)) for c in classes}


def _mode(path: str) -> str:
  try:
    with Image.open(path) as im:
      return im.mode
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    # PIL.UnidentifiedImageError is an OSError.
    raise UsageError(f"cannot read image {path} ({' '.join(str(e).split())}): replace or "
                     "remove the file") from e


def _decode(path: str, image_size: int, channels: int) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im.load()  # Truncated files fail here, not at open().
      if im.mode in _UNSUPPORTED_MODES:
        raise UsageError(f"image {path} has 32-bit mode '{im.mode}': save it as 8- or "
                         "16-bit PNG or as JPEG")
      if im.mode.startswith("I;16"):
        im = Image.fromarray(np.rint(np.asarray(im, dtype=np.float32) / 257.0)
                             .astype(np.uint8), mode="L")
      im = im.convert("L" if channels == 1 else "RGB")
      if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
      arr = np.asarray(im, dtype=np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UsageError(f"cannot decode image {path} ({' '.join(str(e).split())}): replace "
                     "or remove the file") from e
  return arr.reshape(image_size, image_size, channels)


def _stratified_split(classes: dict[str, list[str]], seed: int) -> dict[str, dict]:
  """80/10/10 per class (so every class reaches train), deterministic by seed."""
  rng = np.random.default_rng(seed)
  out = {s: {} for s in SPLIT_DIRS}
  for name, files in classes.items():
    order = rng.permutation(len(files))
    n_out = int(round(HELD_OUT_FRACTION * len(files)))
    n_out = min(n_out, (len(files) - 1) // 2)  # Keep at least one for train.
    picks = {"val": order[:n_out], "test": order[n_out:2 * n_out],
             "train": order[2 * n_out:]}
    for split, idx in picks.items():
      out[split][name] = [files[i] for i in sorted(idx)]
  return out


def load_image_folder(path: str, image_size: int, seed: int = 0) -> ImageSplits:
  """Loads an image folder (see module docstring) as uint8 NHWC images.

  Raises:
    UsageError: missing or empty folder, fewer than 2 classes, files that are
      not readable PNG/JPEG images, inconsistent split folders, too few images.
  """
  image_size = guards.check_image_size(image_size)
  seed = guards.check_seed(seed)
  root = os.path.abspath(os.path.expanduser(str(path)))
  guards.require_folder(root, "pass folder:PATH with an existing folder of images")
  top = _subdirs(root)
  split_dirs = [d for d in top if d in SPLIT_DIRS]
  if split_dirs:
    missing = [d for d in SPLIT_DIRS if d not in top]
    others = [d for d in top if d not in SPLIT_DIRS]
    if missing or others:
      raise UsageError(
          f"image folder {root} mixes split folders ({', '.join(split_dirs)}) with "
          f"{'missing ' + ', '.join(missing) if missing else 'other folders ' + ', '.join(others)}"
          ": give exactly train/, val/ and test/, or only class folders")
    per_split = {s: _scan(os.path.join(root, s), f"{s} folder") for s in SPLIT_DIRS}
    class_names = tuple(per_split["train"])
    for split in ("val", "test"):
      extra = sorted(set(per_split[split]) - set(class_names))
      if extra:
        raise UsageError(f"{split}/ of {root} has class folders {', '.join(extra)} that "
                         "train/ lacks: add them to train/ or remove them")
  else:
    classes = _scan(root, "image folder")
    class_names = tuple(classes)
    per_split = None
  if len(class_names) < 2:
    raise UsageError(f"image folder {root} has only one class ({class_names[0]}): a "
                     "classifier needs at least 2 class sub-folders")
  if per_split is None:
    per_split = _stratified_split(classes, seed)
    for split in ("val", "test"):
      if not any(per_split[split].values()):
        total = sum(len(f) for f in classes.values())
        raise UsageError(f"image folder {root} has too few images ({total}) for an 80/10/10 "
                         "split: add images (about 10 per class or more) or give "
                         "train/, val/ and test/ folders")

  files = {s: [(f, class_names.index(c)) for c, fs in per_split[s].items() for f in fs]
           for s in SPLIT_DIRS}
  every = [f for s in SPLIT_DIRS for f, _ in files[s]]
  # Before decoding anything: N x size x size x 3 uint8 must fit in memory.
  guards.check_memory(len(every) * image_size * image_size * 3,
                      f"{len(every)} images of {image_size}x{image_size} pixels",
                      "pass a smaller --image_size")
  channels = 1 if all(_mode(f) in _GREY_MODES for f in every) else 3
  arrays = {}
  for split in SPLIT_DIRS:
    entries = files[split]
    images = np.empty((len(entries), image_size, image_size, channels), np.uint8)
    for i, (f, _) in enumerate(entries):
      images[i] = _decode(f, image_size, channels)
    arrays[f"{split}_images"] = images
    arrays[f"{split}_labels"] = np.array([y for _, y in entries], dtype=np.int64)
  info = DatasetInfo(name=f"folder:{os.path.basename(root)}",
                     task="binary-class" if len(class_names) == 2 else "multi-class",
                     class_names=class_names,
                     image_shape=(image_size, image_size, channels))
  return ImageSplits(info=info, **arrays)
