"""A DP run of a scattering model: the head trains on features, the export takes images."""

import numpy as np
import tensorflow as tf

from tests.e2e.test_train import _run, _stray_workers, _summary, _train_cmd
from tff_dpmed import models
from tff_dpmed.data import medmnist
from tff_dpmed.program import artifacts


def test_scatter_cnn_trains_on_features_and_exports_an_image_model(data_dir, tmp_path):
  run_dir = tmp_path / "run"
  proc = _run(_train_cmd(data_dir, tmp_path, "run", "--model=scatter_cnn", "--rounds=2",
                         "--dp_mode=central", "--noise_multiplier=1.1", "--sampling=fixed",
                         "--seed=0"))
  assert _stray_workers() == []
  assert "note: scatter_cnn: features (7, 7, 81) of 546 train images computed in" in proc.stderr
  summary = _summary(run_dir)
  assert 0 <= summary["test_auc"] <= 1 and summary["privacy"]["epsilon"] > 0

  # The trained (head) weights, in the full model, are what the export serves.
  splits = medmnist.load_medmnist("breastmnist", data_dir=str(data_dir), download=False)
  model = models.build_model("scatter_cnn", splits.info)
  model.set_weights(artifacts.load_final_weights(str(run_dir)))
  images = splits.test_images[:8]
  want = models.probabilities(splits.info, model(images.astype(np.float32) / 255.0)).numpy()
  served = tf.saved_model.load(str(run_dir / "saved_model" / "scatter_cnn" / "1"))
  got = served.signatures["serving_default"](images=tf.constant(images))["probabilities"]
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
