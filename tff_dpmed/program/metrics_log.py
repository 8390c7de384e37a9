"""Per-round metrics: metrics.csv (one row per round) and TensorBoard curves."""

import csv
import io
import math
import os
import shutil

import tensorflow as tf

from tff_dpmed import files
from tff_dpmed.errors import UsageError

COLUMNS = ("round", "clients", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "val_auc", "clip_norm", "round_seconds", "epsilon", "delta", "client_epsilon")


class MetricsLog:
  """Appends one flushed row per round; on resume, first drops rows after the checkpoint.

  Dropping rows past the resumed round is what keeps metrics.csv free of
  duplicate rounds when a killed run is restarted from an older checkpoint.
  TensorBoard's event files cannot drop steps, so they are rebuilt from the
  kept rows: the two always show the same rounds.
  """

  def __init__(self, run_dir: str, resume_round: int = 0):
    self.path = os.path.join(run_dir, "metrics.csv")
    kept = [row for row in _read_rows(self.path) if int(row["round"]) <= resume_round]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(kept)
    files.write_atomic(self.path, text.getvalue().encode("utf-8"))
    self._file = open(self.path, "a", newline="")
    self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
    tensorboard = os.path.join(run_dir, "tensorboard")
    if os.path.isdir(tensorboard):
      shutil.rmtree(tensorboard)
    elif os.path.lexists(tensorboard):
      os.remove(tensorboard)
    self._summary = tf.summary.create_file_writer(tensorboard)
    for row in kept:
      self._scalars({k: _parse(v) for k, v in row.items()})

  def write(self, row: dict) -> None:
    self._writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    self._file.flush()
    os.fsync(self._file.fileno())
    self._scalars(row)

  def _scalars(self, row: dict) -> None:
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


def _parse(value: str):
  try:
    return float(value) if value else None
  except ValueError:
    return None


def _read_rows(path: str) -> list[dict]:
  if not os.path.lexists(path):
    return []
  rows = []
  try:
    with open(path, newline="", encoding="utf-8") as f:
      for row in csv.DictReader(f):
        # A row cut short by a crash mid-write is dropped with the rest past the checkpoint.
        if (row.get("round") or "").isdigit() and None not in row.values():
          rows.append(row)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise UsageError(f"{path} is unreadable ({type(e).__name__}): restore it, or pass "
                     "--restart to discard the run") from None
  return rows


def read_metrics(run_dir: str) -> list[dict]:
  return _read_rows(os.path.join(run_dir, "metrics.csv"))
