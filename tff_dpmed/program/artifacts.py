"""What a run leaves behind besides metrics: config, final weights, the SavedModel."""

import io
import json
import os
import zipfile
import zlib

import numpy as np

from tff_dpmed import files
from tff_dpmed import models
from tff_dpmed.data.types import DatasetInfo
from tff_dpmed.errors import UsageError
from tff_dpmed.serving import export as export_lib

FINAL_WEIGHTS = "final_weights.npz"


def save_final_weights(run_dir: str, keras_model) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, *keras_model.get_weights())
  files.write_atomic(os.path.join(run_dir, FINAL_WEIGHTS), buffer.getvalue())


# Where the run executed and its local paths to keys and ledgers are not the model's business.
_NOT_EXPORTED = ("worker_tls_ca", "worker_tls_cert", "worker_tls_key", "budget_ledger")


def exported_config(config: dict) -> dict:
  """The training config as exported: a DP model's seed would reveal its cohorts and noise."""
  hidden = _NOT_EXPORTED + (() if config.get("dp_mode", "none") == "none" else ("seed",))
  return {k: v for k, v in config.items() if k not in hidden}


def load_final_weights(run_dir: str) -> list:
  """The arrays save_final_weights wrote; UsageError if the file is damaged."""
  path = os.path.join(run_dir, FINAL_WEIGHTS)
  try:
    with np.load(path, allow_pickle=False) as f:
      # Every array is read here, so a truncated member fails now, not later.
      return [f[f"arr_{i}"] for i in range(len(f.files))]
  except FileNotFoundError:
    raise UsageError(f"{path} does not exist: pass the folder of a run that "
                     "completed") from None
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile,
          zlib.error) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise UsageError(f"cannot read {path} ({reason}): the file is truncated or "
                     "corrupt; resume or rerun the training run to write it "
                     "again") from None


def export_final_model(run_dir: str, keras_model, info: DatasetInfo, summary: dict) -> str:
  """Exports a new SavedModel version in TF Serving's layout; returns its path."""
  config = exported_config(summary["config"])
  metadata = {"model_name": config["model"], "dataset": info.to_json(),
              "privacy": summary["privacy"], "training_config": config,
              "test_accuracy": summary["test_accuracy"], "test_auc": summary["test_auc"]}
  base = os.path.join(run_dir, "saved_model")
  # export_saved_model also (re)writes <base>/models.config for TF Serving.
  return export_lib.export_saved_model(keras_model, info, base, config["model"], metadata)


def load_trained_model(run_dir: str):
  """(keras_model, info, metadata) of a finished run, for re-export."""
  summary_path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(summary_path) or not os.path.exists(os.path.join(run_dir, FINAL_WEIGHTS)):
    raise UsageError(f"{run_dir} has no finished run (summary.json and {FINAL_WEIGHTS}): "
                     "pass the folder of a run that completed")
  with open(summary_path) as f:
    summary = json.load(f)
  try:
    missing = [k for k in ("privacy", "test_accuracy", "test_auc") if k not in summary]
    if missing:
      raise KeyError(", ".join(missing))
    info = DatasetInfo.from_json(summary["dataset"])
    model_name = summary["config"]["model"]
  except (KeyError, TypeError, ValueError) as e:
    raise UsageError(f"{summary_path} lacks what export needs ({type(e).__name__}:"
                     f" {e}): was the run written by this version of "
                     "tff_dpmed.train?") from None
  # Read (and checked) before the model is built: a damaged file must not be
  # reported as weights that no longer fit the model.
  weights = load_final_weights(run_dir)
  keras_model = models.build_model(model_name, info)
  keras_model.set_weights(weights)
  metadata = {"model_name": summary["config"]["model"], "dataset": info.to_json(),
              "privacy": summary["privacy"], "training_config": exported_config(summary["config"]),
              "test_accuracy": summary["test_accuracy"], "test_auc": summary["test_auc"]}
  return keras_model, info, metadata
