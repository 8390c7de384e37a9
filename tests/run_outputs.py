"""Reading a run folder while its trainer may still be writing it (shared by test modules)."""

import csv
import os


def read_rows(run_dir) -> list:
  """metrics.csv rows; a row cut short mid-write (while polling) is left out."""
  path = os.path.join(run_dir, "metrics.csv")
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return [r for r in csv.DictReader(f)
            if (r.get("round") or "").isdigit() and None not in r.values()]


def checkpoint_rounds(run_dir) -> list:
  """The rounds of the program-state checkpoints in the run folder, oldest first."""
  root = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n[len("round_"):]) for n in os.listdir(root)
                if n.startswith("round_") and n[len("round_"):].isdigit())
