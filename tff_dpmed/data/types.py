"""In-memory form of an image classification dataset, whatever its source."""

import dataclasses

import numpy as np

from tff_dpmed.data import fingerprint as fingerprint_lib

TASKS = ("binary-class", "multi-class", "multi-label", "ordinal-regression")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and an exported SavedModel need to know about a dataset."""

  name: str
  task: str  # one of TASKS, MedMNIST's vocabulary.
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]  # (height, width, channels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def multi_label(self) -> bool:
    return self.task == "multi-label"

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "DatasetInfo":
    return cls(name=d["name"], task=d["task"],
               class_names=tuple(d["class_names"]),
               image_shape=tuple(d["image_shape"]))


@dataclasses.dataclass(frozen=True)
class ImageSplits:
  """Train/val/test arrays.

  Images are uint8 `(N, H, W, C)`. Labels are int64 `(N,)` class indices, or
  `(N, num_classes)` 0/1 for multi-label tasks. The val split is for model
  selection during training; test is only for the final report.
  """

  info: DatasetInfo
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray

  def train_fingerprint(self) -> str:
    """Hex SHA-256 of the train images and labels (bytes, shapes, dtypes).

    Stable across loads of the same data; changes with any pixel or label.
    The trainer stores it to refuse resuming a run on changed data.
    """
    return fingerprint_lib.train_fingerprint(self)
