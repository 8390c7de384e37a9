"""One entry point for every data source: `load_dataset(spec, ...)`.

A spec is a MedMNIST name ("pneumoniamnist"), `tfds:NAME` ("tfds:mnist") or
`folder:PATH` ("folder:/data/xrays").
"""

from typing import Optional

from tff_dpmed.data import image_folder
from tff_dpmed.data import medmnist
from tff_dpmed.data.types import ImageSplits
from tff_dpmed.errors import UsageError

TFDS_PREFIX = "tfds:"
FOLDER_PREFIX = "folder:"


def describe_specs() -> str:
  """The accepted specs, for error and help texts."""
  return f"{', '.join(medmnist.MEDMNIST_NAMES)}, {TFDS_PREFIX}NAME or {FOLDER_PREFIX}PATH"


def load_dataset(spec: str, image_size: int = 28, data_dir: Optional[str] = None,
                 download: bool = True, seed: int = 0) -> ImageSplits:
  """Loads the dataset `spec` names, as uint8 NHWC images of `image_size` pixels.

  Args:
    spec: a 2-D MedMNIST name, `tfds:NAME` or `folder:PATH`.
    image_size: 28/64/128/224 for MedMNIST; any positive size for the others.
    data_dir: MedMNIST: folder of .npz files (see `medmnist.resolve_data_dir`).
      TFDS: its data folder (None = TFDS's default). Unused for folders.
    download: fetch missing MedMNIST files / unprepared TFDS datasets.
    seed: seed of derived splits (TFDS without val/test, folders without
      train/val/test); MedMNIST has official splits and ignores it.

  Raises:
    UsageError: unknown spec or any problem loading it.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise UsageError(f"no dataset given ({spec!r}): pass one of {describe_specs()}")
  spec = spec.strip()
  lower = spec.lower()
  if lower.startswith(TFDS_PREFIX):
    from tff_dpmed.data import tfds_source  # pylint: disable=g-import-not-at-top
    # Lazy: importing tensorflow_datasets takes seconds.
    return tfds_source.load_tfds(spec[len(TFDS_PREFIX):], image_size=image_size,
                                 data_dir=data_dir, download=download, seed=seed)
  if lower.startswith(FOLDER_PREFIX):
    path = spec[len(FOLDER_PREFIX):]
    if not path.strip():
      raise UsageError("folder: needs a path: pass folder:/path/to/images")
    return image_folder.load_image_folder(path, image_size=image_size, seed=seed)
  if lower in medmnist.MEDMNIST_DATASETS:
    return medmnist.load_medmnist(lower, image_size=image_size, data_dir=data_dir,
                                  download=download)
  if lower in medmnist.MEDMNIST_3D_NAMES:
    medmnist.get_spec(lower)  # Raises the 3-D specific message.
  raise UsageError(f"unknown dataset '{spec}': use one of {describe_specs()}")
