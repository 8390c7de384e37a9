"""The membership-inference audit on small centrally trained Keras models (no TFF runs).

A model that memorised 64 examples must be caught (attack AUC well above 0.5);
on examples the model never saw, members and non-members are exchangeable, so
the attacks must do no better than chance. Either bound fails if the audit
mixes up members and non-members, preprocesses them differently, or scores
the trained attacker on its own training data.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tff_dpmed import models
from tff_dpmed.data.preprocess import preprocess_images
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.program import audit

BINARY = DatasetInfo("fake", "binary-class", ("neg", "pos"), (28, 28, 1))
MULTI = DatasetInfo("fake-ml", "multi-label", ("a", "b", "c", "d"), (28, 28, 1))


def _data(info, n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8)
  if info.multi_label:
    labels = rng.integers(0, 2, (n, info.num_classes)).astype(np.int64)
  else:
    labels = (np.arange(n) % info.num_classes).astype(np.int64)
  return images, labels


def _fit(info, images, labels, epochs=60):
  """The project's small CNN, trained centrally until it memorises its data."""
  model = models.build_model("cnn", info, seed=0)
  model.compile(tf.keras.optimizers.Adam(1e-3), models.loss_for(info))
  model.fit(preprocess_images(images), labels.astype(np.float32 if info.multi_label else np.int64),
            epochs=epochs, batch_size=16, verbose=0)
  return model


@pytest.fixture(scope="module")
def memorised():
  members = _data(BINARY, 64, seed=1)
  return _fit(BINARY, *members), members


def test_memorising_model_is_caught(memorised):
  model, (x_in, y_in) = memorised
  x_out, y_out = _data(BINARY, 64, seed=2)
  result = audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out, seed=0)
  assert result["attack_auc"] > 0.7
  assert result["attacker_advantage"] > 0.3
  assert result["num_members"] == result["num_nonmembers"] == 64
  assert result["mean_loss_members"] < result["mean_loss_nonmembers"]
  assert set(result["attacks"]) == set(audit.DEFAULT_ATTACKS)
  # The headline figures are the maxima over the attacks run.
  assert result["attack_auc"] == max(a["auc"] for a in result["attacks"].values())
  assert result["attacker_advantage"] == max(
      a["attacker_advantage"] for a in result["attacks"].values())
  assert result["attacks"][result["best_attack"]]["auc"] == result["attack_auc"]
  json.dumps(result)  # JSON-ready.


def test_model_that_never_saw_the_members_is_at_chance(memorised):
  model, _ = memorised
  # Neither set was trained on: "members" and "non-members" are exchangeable.
  x_a, y_a = _data(BINARY, 512, seed=3)
  x_b, y_b = _data(BINARY, 512, seed=4)
  result = audit.membership_inference_audit(model, BINARY, x_a, y_a, x_b, y_b, seed=0)
  assert result["attack_auc"] < 0.6
  assert all(a["auc"] > 0.4 for a in result["attacks"].values())


def test_sets_are_balanced_capped_and_seeded(memorised):
  model, (x_in, y_in) = memorised
  x_out, y_out = _data(BINARY, 40, seed=5)
  a = audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out, seed=7)
  assert a["num_members"] == a["num_nonmembers"] == 40  # the smaller set
  b = audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out, seed=7)
  assert a == b
  c = audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out,
                                       max_examples=20, seed=7)
  assert c["num_members"] == c["num_nonmembers"] == 20
  # The audit leaves NumPy's global random state as it found it.
  np.random.seed(123)
  expected = np.random.rand()
  np.random.seed(123)
  audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out, seed=7)
  assert np.random.rand() == expected


def _constant_model(info):
  """Predicts class 1 for every image: it learnt the class balance and nothing else."""
  inputs = tf.keras.Input(shape=info.image_shape)
  logits = tf.keras.layers.Dense(
      info.num_classes, kernel_initializer="zeros",
      bias_initializer=tf.keras.initializers.Constant([0.0, 2.0]))(
          tf.keras.layers.Flatten()(inputs))
  return tf.keras.Model(inputs, logits)


def test_class_balance_shift_alone_is_not_taken_for_membership():
  # Train is 75% class 1 and test 50% (PneumoniaMNIST: 74% vs 62%): unstratified,
  # the majority class's lower loss alone gives AUC 0.625 to a model that saw nothing.
  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 256, (400, 28, 28, 1), dtype=np.uint8)
  y_train = (np.arange(400) % 4 != 0).astype(np.int64)
  x_test = rng.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
  y_test = (np.arange(200) % 2).astype(np.int64)
  model = _constant_model(BINARY)
  naive = audit.membership_inference_audit(model, BINARY, x_train, y_train, x_test, y_test,
                                           stratify=False)
  assert naive["attacks"]["THRESHOLD_ATTACK"]["auc"] == pytest.approx(0.625, abs=0.03)
  fair = audit.membership_inference_audit(model, BINARY, x_train, y_train, x_test, y_test)
  assert fair["stratified"] and fair["attack_auc"] < 0.55
  assert fair["num_members"] == fair["num_nonmembers"] == 200  # 100 of each class
  capped = audit.membership_inference_audit(model, BINARY, x_train, y_train, x_test, y_test,
                                            max_examples=31)
  assert capped["num_members"] == 31


def test_chosen_attacks_and_bad_input(memorised):
  model, (x_in, y_in) = memorised
  x_out, y_out = _data(BINARY, 64, seed=2)
  only = audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out,
                                          attack_types=["THRESHOLD_ATTACK"])
  assert list(only["attacks"]) == ["THRESHOLD_ATTACK"]
  with pytest.raises(UsageError, match="unknown membership-inference attack"):
    audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out, y_out,
                                     attack_types=["NOPE"])
  with pytest.raises(UsageError, match="at least"):
    audit.membership_inference_audit(model, BINARY, x_in, y_in, x_out[:5], y_out[:5])


def test_per_example_loss_is_the_training_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 2)) * 5
  labels = np.arange(8) % 2
  keras_loss = tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="none")(labels, logits).numpy()
  np.testing.assert_allclose(audit.per_example_loss(BINARY, logits, labels), keras_loss,
                             rtol=1e-5)
  logits = rng.normal(size=(8, 4)) * 5
  labels = rng.integers(0, 2, (8, 4))
  keras_bce = tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction="none")(
      labels.astype(np.float32), logits).numpy()  # Mean over labels.
  np.testing.assert_allclose(audit.per_example_loss(MULTI, logits, labels), 4 * keras_bce,
                             rtol=1e-5)


def test_multi_label_memorisation_is_caught():
  x_in, y_in = _data(MULTI, 64, seed=11)
  x_out, y_out = _data(MULTI, 64, seed=12)
  model = _fit(MULTI, x_in, y_in)
  result = audit.membership_inference_audit(model, MULTI, x_in, y_in, x_out, y_out)
  assert result["attack_auc"] > 0.7
  # The entropy attack assumes one softmax and is skipped for multi-label tasks.
  assert set(result["attacks"]) == {"THRESHOLD_ATTACK", "LOGISTIC_REGRESSION"}


def test_audit_run_reads_a_run_folder_and_writes_audit_json(memorised, tmp_path):
  from tff_dpmed.data.types import ImageSplits
  from tff_dpmed.program import artifacts
  from tff_dpmed.files import write_json_atomic
  from tff_dpmed.program.config import RunConfig
  model, (x_in, y_in) = memorised
  x_out, y_out = _data(BINARY, 64, seed=2)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  privacy = {"dp_mode": "none", "epsilon": None, "delta": None}
  config = RunConfig.from_json({"dataset": "fake", "dp_mode": "none"})
  write_json_atomic(str(run_dir / "summary.json"), {
      "config": config.to_json(), "dataset": BINARY.to_json(),
      "privacy": privacy, "test_accuracy": 0.5, "test_auc": 0.5})
  artifacts.save_final_weights(str(run_dir), model)
  splits = ImageSplits(BINARY, x_in, y_in, x_out[:20], y_out[:20], x_out, y_out)

  result = audit.audit_run(str(run_dir), splits)
  assert result["attack_auc"] > 0.7 and result["privacy"] == privacy
  assert result["nonmembers"] == "test split" and result["num_nonmembers"] == 64
  on_val = audit.audit_run(str(run_dir), splits, nonmember_split="val", write=False)
  assert on_val["nonmembers"] == "val split" and on_val["num_nonmembers"] == 20  # all of val
  with pytest.raises(UsageError, match="nonmember_split"):
    audit.audit_run(str(run_dir), splits, nonmember_split="train")
  assert audit.load_audit(str(run_dir))["attack_auc"] == result["attack_auc"]
  assert "attack AUC" in audit.format_result(result)
  assert audit.load_audit(str(tmp_path)) is None
  wrong = ImageSplits(MULTI, *_data(MULTI, 16, 0), *_data(MULTI, 16, 1), *_data(MULTI, 16, 2))
  with pytest.raises(UsageError, match="not what the run was trained on"):
    audit.audit_run(str(run_dir), wrong, write=False)
  assert os.path.exists(run_dir / "audit.json")
