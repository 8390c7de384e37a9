"""Per-round metrics: metrics.csv (one row per round) and TensorBoard curves."""

import csv
import math
import os
from typing import Optional

import tensorflow as tf

COLUMNS = ("round", "clients", "train_loss", "train_accuracy", "val_accuracy", "val_auc",
           "clip_norm", "round_seconds", "epsilon", "delta")


class MetricsLog:
  """Appends one flushed row per round; on resume, first drops rows after the checkpoint.

  Dropping rows past the resumed round is what keeps metrics.csv free of
  duplicate rounds when a killed run is restarted from an older checkpoint.
  """

  def __init__(self, run_dir: str, resume_round: int = 0):
    self.path = os.path.join(run_dir, "metrics.csv")
    kept = [row for row in _read_rows(self.path) if int(row["round"]) <= resume_round]
    tmp = self.path + ".tmp"
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      writer.writeheader()
      writer.writerows(kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", newline="")
    self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
    self._summary = tf.summary.create_file_writer(os.path.join(run_dir, "tensorboard"))

  def write(self, row: dict) -> None:
    self._writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    self._file.flush()
    os.fsync(self._file.fileno())
    with self._summary.as_default(step=int(row["round"])):
      for key, value in row.items():
        if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
          tf.summary.scalar(key, value)
    self._summary.flush()

  def close(self) -> None:
    self._file.close()
    self._summary.close()


def _fmt(value) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      # A row cut short by a crash mid-write is dropped with the rest past the checkpoint.
      if row.get("round", "").isdigit() and None not in row.values():
        rows.append(row)
  return rows


def read_metrics(run_dir: str) -> list[dict]:
  return _read_rows(os.path.join(run_dir, "metrics.csv"))
