"""Gradient canary examples of the example-level audit: drawn, inserted, accounted as examples."""

import dataclasses

import numpy as np
import pytest

from tff_dpmed.data import canary_examples
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.program import canary_audit
from tff_dpmed.program import trainer
from tff_dpmed.program.config import RunConfig
from tff_dpmed.program.run_dir import CANARY_EXAMPLES_SECRET

_BINARY = DatasetInfo("b", "binary-class", ("no", "yes"), (28, 28, 1))
_MULTI_LABEL_RGB = DatasetInfo("m", "multi-label", tuple("abcde"), (64, 64, 3))


def test_canaries_depend_only_on_the_secret_and_get_distinct_coordinates():
  a = canary_examples.draw(200, 7, secret=11)
  assert 70 < a.included.sum() < 130 and set(np.unique(a.client)) == set(range(7))
  b = canary_examples.draw(200, 7, secret=11)
  c = canary_examples.draw(200, 7, secret=12)
  assert np.array_equal(a.included, b.included) and np.array_equal(a.client, b.client)
  assert not np.array_equal(a.included, c.included)
  coordinates = a.coordinates(5000)
  assert len(set(coordinates)) == 200 and coordinates.max() < 5000
  assert np.array_equal(coordinates, b.coordinates(5000))
  with pytest.raises(ValueError, match="model parameters"):
    a.coordinates(100)


@pytest.mark.parametrize("info", [_BINARY, _MULTI_LABEL_RGB])
def test_included_canaries_are_appended_to_their_hospitals_and_no_others(info):
  canaries = canary_examples.draw(40, 3, secret=5)
  images = np.full((10, *info.image_shape), 7, np.uint8)
  labels = np.ones((10, 5) if info.multi_label else 10, np.int64)
  partitions = [np.arange(0, 4), np.arange(4, 7), np.arange(7, 10)]
  all_images, all_labels, coordinate = canary_examples.training_arrays(
      images, labels, canaries, info, num_parameters=1000)
  extended = canary_examples.extend_partitions(partitions, 10, canaries)
  inside = np.flatnonzero(canaries.included)
  assert all_images.shape == (10 + len(inside), *info.image_shape)
  assert all_labels.shape[0] == 10 + len(inside) and all_labels.dtype == labels.dtype
  assert np.all(coordinate[:10] == canary_examples.NOT_A_CANARY)
  np.testing.assert_array_equal(coordinate[10:], canaries.coordinates(1000)[inside])
  for k, part in enumerate(extended):
    assert np.array_equal(part[:len(partitions[k])], partitions[k])
    added = part[len(partitions[k]):] - 10  # Rank among the included canaries.
    assert np.all(canaries.client[inside[added]] == k)
  assert sorted(np.concatenate(extended)) == list(range(10 + len(inside)))


def test_a_canary_gradient_is_the_clip_norm_on_its_coordinate_alone():
  import tensorflow as tf
  from tff_dpmed.privacy import example_dp
  trainable = [tf.zeros([3, 2]), tf.zeros([4])]  # Flat coordinates 0-5, then 6-9.
  grads = [tf.ones([3, 3, 2]), tf.ones([3, 4])]  # Three examples.
  out = example_dp._with_canary_gradients(grads, trainable, tf.constant([-1, 1, 7], tf.int64),
                                          clip=0.5)
  flat = np.concatenate([np.reshape(g.numpy(), (3, -1)) for g in out], axis=1)
  np.testing.assert_array_equal(flat[0], np.ones(10))  # A real example: untouched.
  np.testing.assert_array_equal(flat[1], np.eye(10)[1] * 0.5)
  np.testing.assert_array_equal(flat[2], np.eye(10)[7] * 0.5)


def _config(data_dir, tmp_path, **flat):
  return RunConfig.from_json({
      "dataset": "breastmnist", "data_dir": str(data_dir), "dp_mode": "example",
      "noise_multiplier": 1.0, "num_clients": 5, "clients_per_round": 5, "sampling": "all",
      "clip_mode": "fixed", "client_batch_size": 16, "rounds": 2, "audit": "canary",
      "num_canaries": 60, "output_dir": str(tmp_path), "experiment_name": "r", **flat})


def test_canaries_count_in_the_hospital_sizes_and_a_resume_keeps_them(data_dir, tmp_path):
  cfg = _config(data_dir, tmp_path)
  run = trainer.prepare(cfg)
  canaries = run.example_canaries
  assert canaries is not None and canaries.count == 60
  sizes = run.mechanism.spec.client_sizes
  assert sum(sizes) == len(run.splits.train_labels) + canaries.included.sum()
  assert sizes == tuple(len(p) for p in run.partitions)
  # The secret goes to the run folder (owner-only); a resume draws the same canaries.
  (tmp_path / "r").mkdir()
  canary_audit.save_example_secret(cfg, canaries)
  secret_file = tmp_path / "r" / CANARY_EXAMPLES_SECRET
  assert secret_file.stat().st_mode & 0o077 == 0
  resumed = canary_audit.example_canaries(cfg, run.splits.train_labels)
  assert np.array_equal(resumed.included, canaries.included)
  secret_file.write_text(str(int(secret_file.read_text()) + 1))
  assert not np.array_equal(canary_audit.example_canaries(cfg, run.splits.train_labels).included,
                            canaries.included)
  restarted = dataclasses.replace(cfg, restart=True)  # --restart ignores the old secret.
  assert canary_audit.example_canaries(restarted, run.splits.train_labels) is not None
  secret_file.write_text("garbage")
  with pytest.raises(UsageError, match="pass --restart"):
    canary_audit.example_canaries(cfg, run.splits.train_labels)


def test_the_default_count_takes_at_most_a_tenth_and_too_many_is_refused(data_dir, tmp_path):
  run = trainer.prepare(_config(data_dir, tmp_path, num_canaries=None))
  assert run.example_canaries.count == len(run.splits.train_labels) // 10  # BreastMNIST: 54.
  with pytest.raises(UsageError, match="more than half"):
    trainer.prepare(_config(data_dir, tmp_path, num_canaries=400))


def test_canary_norm_is_refused_for_canary_examples(data_dir, tmp_path):
  with pytest.raises(UsageError, match="--canary_norm"):
    _config(data_dir, tmp_path, canary_norm=1.0)
