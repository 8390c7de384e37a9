"""Example-level DP (DP-SGD in each hospital): the documented recipes, run and tabulated.

  python -m experiments.dp_sgd_recipes [--runs=3] [--only=pneumonia_iid_eps3,...]
      [--data_dir=...] [--output_dir=experiments/results/dp_sgd]

Each recipe was tuned once on the val split (README "Example-level DP");
here every recipe runs `--runs` times, unseeded (a seeded DP-SGD run is not
private: its batches and noise are predictable), and the table gives the mean
and spread of the test AUC of each run's best-val round: the test split is
read once per run, by the trainer. Runs are the trainer's CLI, one at a time
(the machine has two cores); a finished run is kept and a killed one resumes
from its checkpoint, so the study itself resumes where it stopped.
"""

import csv
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import tqdm

from tff_dpmed import files
from experiments import runner

_RUNS = flags.DEFINE_integer("runs", 3, "Independent runs per recipe.")
_ONLY = flags.DEFINE_list("only", [], "Run only these recipes (default: all).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MedMNIST folder (default: the trainer's).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", os.path.join("experiments", "results", "dp_sgd"),
                                  "Where the runs, results.md and results.csv go.")

# What every recipe shares: 10 hospitals, all in every round (example-level
# accounting counts every round for every hospital anyway), one local epoch.
_COMMON = ("--num_clients=10", "--clients_per_round=10", "--sampling=all", "--client_epochs=1",
           "--server_learning_rate=1.0", "--server_momentum=0", "--rounds_per_eval=2")
_DP = ("--dp_mode=example", "--clip_mode=fixed")


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  dataset: str
  partition: str
  target_epsilon: Optional[float]  # None: the same recipe without noise (not private).
  flags: tuple

  def command(self, data_dir: Optional[str], output_dir: str, run: int) -> list:
    # The non-private run is the same DP-SGD recipe (Poisson batches, clipping)
    # without noise, so the rows differ in the noise only.
    privacy = _DP + ((f"--target_epsilon={self.target_epsilon:g}",)
                     if self.target_epsilon is not None else ("--noise_multiplier=0",))
    partition = (f"--partition={self.partition}",) + (
        ("--dirichlet_alpha=0.5",) if self.partition == "dirichlet" else ())
    return [sys.executable, "-m", "tff_dpmed.train", f"--dataset={self.dataset}",
            *partition, *_COMMON, *privacy, *self.flags, f"--output_dir={output_dir}",
            f"--experiment_name={self.name}_r{run}", "--progress=false",
            *((f"--data_dir={data_dir}",) if data_dir else ())]


def _scatter(batch: int, lr: float, rounds: int, clip: float = 1.0) -> tuple:
  return ("--model=scatter_linear", f"--client_batch_size={batch}",
          f"--client_learning_rate={lr:g}", f"--rounds={rounds}", f"--clip={clip:g}")


def _fixed_rate(batch: int, lr: float, rounds: int) -> tuple:
  return _scatter(batch, lr, rounds) + ("--local_batching=fixed_rate",)


def _three(name: str, dataset: str, partition: str, flags: tuple) -> tuple:
  """A recipe at eps 3 and eps 1, and the same recipe with z = 0 (not private)."""
  return tuple(Recipe(f"{name}_{suffix}", dataset, partition, target, flags)
               for suffix, target in (("eps3", 3.0), ("eps1", 1.0), ("nodp", None)))


# Tuned on val (see README).
RECIPES = (
    *_three("pneumonia_iid", "pneumoniamnist", "iid", _scatter(128, 4.0, 20)),
    # Non-IID: one sampling rate for all hospitals and a size-weighted mean,
    # B=256 (the best of seven tried on val at eps 1)...
    *_three("pneumonia_dirichlet_b256", "pneumoniamnist", "dirichlet",
            _fixed_rate(256, 4.0, 20)),
    # ...and the IID recipe, B=128, as first tried (it missed at eps 1).
    *_three("pneumonia_dirichlet", "pneumoniamnist", "dirichlet", _fixed_rate(128, 4.0, 20)),
    # The same split with a fixed expected batch of 32 in every hospital (the
    # best of three tried): its 72-image hospital sets everyone's noise.
    *_three("pneumonia_dirichlet_fixed_size", "pneumoniamnist", "dirichlet",
            _scatter(32, 2.0, 10)),
    *_three("breast_iid", "breastmnist", "iid", _scatter(32, 2.0, 30)),
)


def _run(recipe: Recipe, run: int, data_dir: Optional[str], output_dir: str) -> dict:
  runs_dir = os.path.join(output_dir, "runs")
  run_dir = os.path.join(runs_dir, f"{recipe.name}_r{run}")
  summary = runner.read_summary(run_dir)
  if summary is None:
    os.makedirs(runs_dir, exist_ok=True)
    with open(run_dir + ".log", "w", encoding="utf-8") as log:
      proc = subprocess.run(recipe.command(data_dir, runs_dir, run), stdout=log,
                            stderr=subprocess.STDOUT, check=False)
    summary = runner.read_summary(run_dir)
    if proc.returncode != 0 or summary is None:
      raise RuntimeError(f"{recipe.name} run {run} failed (exit {proc.returncode}): see "
                         f"{run_dir}.log")
  return summary


def _mean_sd(values: list) -> str:
  if not values:
    return "–"
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _row(recipe: Recipe, summaries: list) -> dict:
  privacy = summaries[0]["privacy"]
  config = summaries[0]["config"]
  eps = [s["privacy"]["epsilon"] for s in summaries if s["privacy"]["epsilon"] is not None]
  return {
      "recipe": recipe.name, "dataset": recipe.dataset, "partition": recipe.partition,
      "privacy_unit": privacy.get("privacy_unit") or "–",
      "epsilon": f"{max(eps):.3f}" if eps else "inf (no noise)",
      "delta": privacy["delta"] if privacy["delta"] is not None else "–",
      "noise_multiplier": (f"{privacy['noise_multiplier']:.4g}"
                           if privacy.get("noise_multiplier") is not None else "–"),
      "model": config["model"], "batch": config["client_batch_size"],
      "client_lr": config["client_learning_rate"], "clip": config["clip"],
      "rounds": config["rounds"], "runs": len(summaries),
      "val_auc": _mean_sd([s["best_val_auc"] for s in summaries if s["best_val_auc"]]),
      "test_auc": _mean_sd([s["test_auc"] for s in summaries
                            if s["test_auc"] is not None and math.isfinite(s["test_auc"])]),
      "test_aucs": " ".join(f"{s['test_auc']:.3f}" for s in summaries),
      "wall_s_per_run": f"{statistics.mean(s['wall_seconds'] for s in summaries):.0f}",
  }


def _write(rows: list, output_dir: str, wall: float) -> None:
  if not rows:
    return
  columns = list(rows[0])
  with open(os.path.join(output_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  lines = ["# Example-level DP (DP-SGD in each hospital): recipes and results", "",
           f"`python -m experiments.dp_sgd_recipes --runs={_RUNS.value}`; this invocation "
           f"took {wall / 60:.1f} min of wall time on this machine (finished runs are reused).",
           "Test AUC is each run's best-val round, mean ± sd over unseeded runs; epsilon is "
           "per example (one patient's image) at the given delta, for the worst hospital.", "",
           "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
  files.write_atomic(os.path.join(output_dir, "results.md"),
                     ("\n".join(lines) + "\n").encode("utf-8"))


def main(argv) -> None:
  del argv
  start = time.time()
  recipes = [r for r in RECIPES if not _ONLY.value or r.name in _ONLY.value]
  unknown = set(_ONLY.value) - {r.name for r in RECIPES}
  if unknown:
    raise app.UsageError(f"--only: unknown recipes {', '.join(sorted(unknown))}; use "
                         f"{', '.join(r.name for r in RECIPES)}")
  output_dir = _OUTPUT_DIR.value
  os.makedirs(output_dir, exist_ok=True)
  rows = []
  jobs = [(r, i) for r in recipes for i in range(_RUNS.value)]
  done: dict = {}
  for recipe, run in tqdm.tqdm(jobs, desc="recipe runs", unit="run", dynamic_ncols=True):
    done.setdefault(recipe.name, []).append(_run(recipe, run, _DATA_DIR.value, output_dir))
    if len(done[recipe.name]) == _RUNS.value:
      rows.append(_row(recipe, done[recipe.name]))
      _write(rows, output_dir, time.time() - start)  # Partial results as they come.
  for row in rows:
    print(" ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
  app.run(main)
