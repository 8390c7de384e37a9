"""Canary examples for the example-level audit (`privacy.one_run_audit`).

Gradient canaries, the white-box audit of Steinke, Nasr and Jagielski (2023,
Section 6): m canary examples, each put in the training data independently
with probability 1/2, in one hospital drawn uniformly at random. There a
canary is an example like any other: Poisson-sampled by DP-SGD, noised with
its batch, and counted in its hospital's size (so the accounting covers it).
Only its gradient is replaced: by a "Dirac" vector, the clip norm C on one
model coordinate of its own (`coordinates`), the largest update one example
may make. After training, the auditor reads each canary's coordinate of the
released model's change and guesses which canaries were in.

Input-space canaries were tried first and cannot see anything here: random
block patterns with random labels, and mislabelled training images, gave a
lower bound of 0 even without noise (the same DP-SGD recipe at z = 0), since
a clipped example moves a model by at most lr C / B per step and the data's
own pull on an out-of-distribution input varies far more than that.

The draw depends only on `secret`, so a resumed run trains on the same
canaries; the secret stays in the run folder and is never exported.
"""

import dataclasses
from typing import Sequence

import numpy as np

from tff_dpmed.data.types import DatasetInfo

# A canary's image and label are placeholders: its gradient is replaced.
NOT_A_CANARY = -1


@dataclasses.dataclass(frozen=True)
class CanaryExamples:
  included: np.ndarray  # (m,) bool: in the training data or not
  client: np.ndarray    # (m,) the hospital an included canary sits in
  secret: int

  @property
  def count(self) -> int:
    return len(self.included)

  def coordinates(self, num_parameters: int) -> np.ndarray:
    """Each canary's model coordinate (distinct), in the flattened trainable weights."""
    if num_parameters < self.count:
      raise ValueError(f"{self.count} canaries need as many model parameters, the model has "
                       f"{num_parameters}")
    rng = np.random.default_rng([self.secret, 1])
    return rng.choice(num_parameters, size=self.count, replace=False).astype(np.int64)


def draw(count: int, num_clients: int, secret: int) -> CanaryExamples:
  """`count` canaries over `num_clients` hospitals."""
  if count < 2 or num_clients < 1:
    raise ValueError(f"need at least 2 canaries and 1 client, got {count} and {num_clients}")
  rng = np.random.default_rng([secret, 0])
  included = rng.random(count) < 0.5
  client = rng.integers(0, num_clients, size=count)
  return CanaryExamples(included, client, int(secret))


def training_arrays(images: np.ndarray, labels: np.ndarray, canaries: CanaryExamples,
                    info: DatasetInfo, num_parameters: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The training images and labels with the included canaries appended (blank images,
  label 0), and each example's canary coordinate (NOT_A_CANARY for real examples)."""
  inside = np.flatnonzero(canaries.included)
  blank = np.zeros((len(inside), *info.image_shape), images.dtype)
  no_label = np.zeros((len(inside), *labels.shape[1:]), labels.dtype)
  coordinate = np.full(len(images) + len(inside), NOT_A_CANARY, np.int64)
  coordinate[len(images):] = canaries.coordinates(num_parameters)[inside]
  return (np.concatenate([images, blank]), np.concatenate([labels, no_label]), coordinate)


def extend_partitions(partitions: Sequence[np.ndarray], num_examples: int,
                      canaries: CanaryExamples) -> list:
  """`partitions` with each included canary's index (after `num_examples`) in its hospital."""
  if len(partitions) <= int(canaries.client.max()):
    raise ValueError(f"canaries drawn for {int(canaries.client.max()) + 1}+ clients, "
                     f"partitions has {len(partitions)}")
  index = num_examples + np.arange(int(canaries.included.sum()))
  hospital = canaries.client[canaries.included]
  return [np.concatenate([np.asarray(p), index[hospital == k].astype(np.asarray(p).dtype)])
          for k, p in enumerate(partitions)]
