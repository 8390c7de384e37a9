"""Tuned recipes, run through the trainer's CLI and tabulated: what the recipe studies share.

A recipe is one documented training configuration at one privacy level (a
target epsilon that the trainer calibrates its noise to, or z = 0: the same
recipe without noise). Each runs `runs` times, unseeded (a seeded DP run is
not private: its batches and noise are predictable), one run at a time (two
cores), as `python -m tff_dpmed.train`; a finished run is kept and a killed
one resumes from its checkpoint, so a study resumes where it stopped. The
test AUC reported is each run's best-val round: the trainer reads the test
split once per run.
"""

import csv
import dataclasses
import io
import math
import os
import re
import statistics
import subprocess
import sys
from typing import Callable, Optional

from tff_dpmed import files
from experiments import runner

# The trainer's error when it cannot calibrate (e.g. local DP at a small epsilon);
# other errors, e.g. "the TFF worker at ... is not reachable", are failures.
_UNREACHABLE_TARGET = re.compile(r"^error: target epsilon \S+ is not reachable")


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str
  dataset: str
  partition: str
  mode: str                        # The trainer's --dp_mode.
  target_epsilon: Optional[float]  # None: the same recipe with z = 0 (not private).
  flags: tuple                     # Everything else the recipe sets.

  def command(self, data_dir: Optional[str], runs_dir: str, run: int) -> list:
    noise = (f"--target_epsilon={self.target_epsilon:g}",) if self.target_epsilon is not None \
        else ("--noise_multiplier=0",)
    partition = (f"--partition={self.partition}",) + (
        ("--dirichlet_alpha=0.5",) if self.partition == "dirichlet" else ())
    return [sys.executable, "-m", "tff_dpmed.train", f"--dataset={self.dataset}",
            *partition, f"--dp_mode={self.mode}", *noise, *self.flags,
            f"--output_dir={runs_dir}", f"--experiment_name={self.name}_r{run}",
            "--progress=false", *((f"--data_dir={data_dir}",) if data_dir else ())]


# The trainer stopped by SIGINT or SIGTERM (after its checkpoint, or before it began).
_STOPPED_CODES = (130, 143, -2, -15)


class Stopped(Exception):
  """A run was stopped by a signal; rerunning the study resumes it from its checkpoint."""


class Unreachable(Exception):
  """The trainer refused the recipe's target epsilon (its one-line error says why)."""


def _error_line(log_path: str) -> str:
  with open(log_path, encoding="utf-8", errors="replace") as f:
    errors = [l.strip() for l in f if l.startswith("error: ")]
  return errors[-1] if errors else ""


def run_dir_of(recipe: Recipe, run: int, output_dir: str) -> str:
  """Where run `run` of `recipe` lives in a study's `output_dir`."""
  return os.path.join(output_dir, "runs", f"{recipe.name}_r{run}")


def _check_reachable(log_path: str) -> None:
  """Raises Unreachable if the run's log ends in the trainer's 'not reachable' error."""
  error = _error_line(log_path) if os.path.exists(log_path) else ""
  if _UNREACHABLE_TARGET.match(error):
    raise Unreachable(error[len("error: "):])


def finished_run(recipe: Recipe, run: int, output_dir: str) -> Optional[dict]:
  """The summary of a finished run, None if it has not finished; Unreachable if refused."""
  run_dir = run_dir_of(recipe, run, output_dir)
  summary = runner.read_summary(run_dir)
  if summary is None:
    _check_reachable(run_dir + ".log")
  return summary


def run_recipe(recipe: Recipe, run: int, data_dir: Optional[str], output_dir: str) -> dict:
  """Run `run` of `recipe` (or the summary of its finished run).

  Raises Unreachable when the trainer exits 2 because no noise reaches the
  target; any other failure is a RuntimeError naming the run's log.
  """
  run_dir = run_dir_of(recipe, run, output_dir)
  summary = runner.read_summary(run_dir)
  if summary is not None:
    return summary
  os.makedirs(os.path.dirname(run_dir), exist_ok=True)
  log_path = run_dir + ".log"
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.run(recipe.command(data_dir, os.path.dirname(run_dir), run), stdout=log,
                          stderr=subprocess.STDOUT, check=False)
  summary = runner.read_summary(run_dir)
  if proc.returncode == 0 and summary is not None:
    return summary
  if proc.returncode in _STOPPED_CODES:
    raise Stopped(f"{recipe.name} run {run} was stopped (exit {proc.returncode}): rerun the "
                  "same command to resume it (from its checkpoint, if it saved one)")
  if proc.returncode == 2:
    _check_reachable(log_path)
  raise RuntimeError(f"{recipe.name} run {run} failed (exit {proc.returncode}): see {log_path}")


def stop_as_one_line(main: Callable[[list], None]) -> Callable[[list], None]:
  """`main` for absl's app.run: a stopped run ends the study with one line, not a traceback."""
  def main_stopping_as_one_line(argv: list) -> None:
    try:
      main(argv)
    except Stopped as e:
      sys.exit(f"stopped: {e}")
  return main_stopping_as_one_line


def mean_sd(values: list) -> str:
  if not values:
    return "–"
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def test_aucs(summaries: list) -> list:
  return [s["test_auc"] for s in summaries
          if s["test_auc"] is not None and math.isfinite(s["test_auc"])]


def row(recipe: Recipe, summaries: list) -> dict:
  """One table row: the recipe's settings and its runs' epsilon, val and test AUC."""
  privacy = summaries[0]["privacy"]
  config = summaries[0]["config"]
  eps = [s["privacy"]["epsilon"] for s in summaries if s["privacy"]["epsilon"] is not None]
  return {
      "recipe": recipe.name, "dataset": recipe.dataset, "partition": recipe.partition,
      "mode": recipe.mode, "privacy_unit": privacy.get("privacy_unit") or "–",
      "target_epsilon": f"{recipe.target_epsilon:g}" if recipe.target_epsilon else "–",
      "epsilon": f"{max(eps):.3f}" if eps else "inf (no noise)",
      "delta": privacy["delta"] if privacy["delta"] is not None else "–",
      "noise_multiplier": (f"{privacy['noise_multiplier']:.4g}"
                           if privacy.get("noise_multiplier") is not None else "–"),
      "model": config["model"], "batch": config["client_batch_size"],
      "client_lr": config["client_learning_rate"], "clip": config["clip"],
      "rounds": config["rounds"], "runs": len(summaries),
      "val_auc": mean_sd([s["best_val_auc"] for s in summaries if s["best_val_auc"]]),
      "test_auc": mean_sd(test_aucs(summaries)),
      "test_aucs": " ".join(f"{s['test_auc']:.3f}" for s in summaries),
      "wall_s_per_run": f"{statistics.mean(s['wall_seconds'] for s in summaries):.0f}",
  }


def unreachable_row(recipe: Recipe, reason: str) -> dict:
  return {"recipe": recipe.name, "dataset": recipe.dataset, "partition": recipe.partition,
          "mode": recipe.mode, "target_epsilon": f"{recipe.target_epsilon:g}",
          "epsilon": "unreachable", "test_auc": f"– ({reason})"}


def not_run_row(recipe: Recipe) -> dict:
  return {"recipe": recipe.name, "dataset": recipe.dataset, "partition": recipe.partition,
          "mode": recipe.mode,
          "target_epsilon": f"{recipe.target_epsilon:g}" if recipe.target_epsilon else "–",
          "epsilon": "not run yet", "test_auc": "–"}


def write_table(rows: list, output_dir: str, header: list) -> None:
  """results.csv and results.md (after `header`'s lines) in `output_dir`, atomically."""
  if not rows:
    return
  columns = list(dict.fromkeys(c for r in rows for c in r))
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=columns, restval="")
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(os.path.join(output_dir, "results.csv"), table.getvalue().encode("utf-8"))
  lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
  files.write_atomic(os.path.join(output_dir, "results.md"),
                     ("\n".join(lines) + "\n").encode("utf-8"))
