"""Does the canary audit see DP? Its empirical epsilon across theoretical epsilons.

  python -m experiments.canary_table [--runs=3] [--target_epsilons=1,3,8]
      [--data_dir=...] [--output_dir=experiments/results/canary] [--report_only]

The main job (central DP-FedAvg, adaptive clipping, 100 hospitals, 20 per
round, PneumoniaMNIST) with `--audit=canary`, its noise calibrated to each
target epsilon, and once more with z = 0 (the same clipping, no noise): the
reference point where the audit must see the leak. Every level runs `--runs`
times, unseeded. The table gives, per level, the theoretical epsilon, the
empirical epsilon (mean ± sd over runs, and each run's estimate with its 95%
interval), the number of runs whose interval lies above the theoretical
epsilon (violations: there must be none) and the test AUC. canary_audit.png
plots the estimates against the bound. README "Reading the canary audit"
says how to read them: "no violation found" is not a proof of privacy.

Rerunning the command reuses finished runs and resumes a stopped one.
"""

import math
import os
import shlex
import statistics
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import tqdm

from experiments import plots
from experiments import recipes
from experiments.recipes import Recipe

FLAGS = flags.FLAGS

# The main job as `python -m tff_dpmed.train` runs it, plus the audit.
MAIN_JOB_AUDIT = ("--audit=canary",)


def _define_flags() -> None:
  """Defined only when run as a program, so importing the module defines no flags."""
  flags.DEFINE_integer("runs", 3, "Independent (unseeded) runs per level.")
  flags.DEFINE_list("target_epsilons", ["1", "3", "8"], "Target epsilons (client level).")
  flags.DEFINE_string("data_dir", None, "MedMNIST folder (default: the trainer's).")
  flags.DEFINE_string("output_dir", os.path.join("experiments", "results", "canary"),
                      "Where the runs, the table and the figure go.")
  flags.DEFINE_bool("report_only", False, "Train nothing: rebuild the table and figure "
                    "from finished runs.")


def recipe_for(target: Optional[float]) -> Recipe:
  level = f"eps{target:g}" if target is not None else "nodp"
  return Recipe(f"main_canary_{level}", "pneumoniamnist", "iid", "central", target,
                MAIN_JOB_AUDIT)


def _number(value) -> float:
  """A JSON number, or the string "inf" the audit writes for an unbounded value."""
  return float(value) if value is not None else math.nan


def audit_points(summaries: list) -> list:
  """(theoretical, estimate, ci, violation) of each run, from its summary.json."""
  points = []
  for s in summaries:
    a = s["audit"]
    theory = a["theoretical_epsilon"]
    points.append({"theoretical": _number(theory) if theory is not None else math.inf,
                   "estimate": _number(a["epsilon_estimate"]),
                   "ci": [_number(v) for v in a["epsilon_ci"]],
                   "violation": bool(a["violation"]), "canaries": a["num_canaries"]})
  return points


def audit_row(recipe: Recipe, summaries: list) -> dict:
  """The recipe's row (recipes.row) with the audit's columns."""
  points = audit_points(summaries)
  estimates = [p["estimate"] for p in points]
  finite = [e for e in estimates if math.isfinite(e)]
  row = recipes.row(recipe, summaries)
  row.update({
      "canaries": points[0]["canaries"],
      "empirical_epsilon": (f"{statistics.mean(finite):.3g} ± "
                            f"{statistics.stdev(finite) if len(finite) > 1 else 0:.2g}"
                            if len(finite) == len(estimates) else "inf"),
      "per_run_estimate_95ci": "; ".join(
          f"{p['estimate']:.3g} [{p['ci'][0]:.3g}, {p['ci'][1]:.3g}]" for p in points),
      "violations": f"{sum(p['violation'] for p in points)} of {len(points)}",
  })
  return row


def grows_with_epsilon(levels: list) -> Optional[bool]:
  """Whether the mean estimate rises with the theoretical epsilon, None if under two levels.

  `levels`: (theoretical epsilon, [estimates]) of the DP levels.
  """
  means = [(t, statistics.mean(e)) for t, e in sorted(levels) if e]
  if len(means) < 2:
    return None
  return all(a[1] < b[1] for a, b in zip(means, means[1:]))


def main(argv) -> None:
  del argv
  start = time.time()
  try:
    targets = sorted({float(t) for t in FLAGS.target_epsilons})
  except ValueError:
    raise app.UsageError("--target_epsilons: give numbers > 0, e.g. 1,3,8") from None
  if not targets or targets[0] <= 0:
    raise app.UsageError("--target_epsilons: give numbers > 0, e.g. 1,3,8")
  output_dir = FLAGS.output_dir
  os.makedirs(output_dir, exist_ok=True)
  command = shlex.join(["python", "-m", "experiments.canary_table", *sys.argv[1:]])
  table, points, reference, dp_levels = [], [], [], []
  levels = [*targets, None]
  progress = tqdm.tqdm(total=len(levels) * FLAGS.runs, desc="canary audit runs", unit="run",
                       dynamic_ncols=True)
  for target in levels:
    recipe = recipe_for(target)
    summaries = []
    for run in range(FLAGS.runs):
      summary = (recipes.finished_run(recipe, run, output_dir) if FLAGS.report_only else
                 recipes.run_recipe(recipe, run, FLAGS.data_dir, output_dir))
      if summary is None:
        break
      summaries.append(summary)
      progress.update()
    if not summaries:
      table.append(recipes.not_run_row(recipe))
      continue
    table.append(audit_row(recipe, summaries))
    level_points = audit_points(summaries)
    if target is None:
      reference += [p["estimate"] for p in level_points]
    else:
      points += level_points
      dp_levels.append((max(p["theoretical"] for p in level_points),
                        [p["estimate"] for p in level_points]))
    grows = grows_with_epsilon(dp_levels)
    violations = sum(p["violation"] for p in points)
    recipes.write_table(table, output_dir, [
        "# The canary audit across theoretical epsilon (client level)", "",
        f"`{command}`: {(time.time() - start) / 60:.1f} min of wall time for this invocation "
        "on this machine (2 cores; finished runs are reused).",
        "The main job (central DP-FedAvg, adaptive clipping, 100 hospitals, 20 per round, "
        "60 rounds, PneumoniaMNIST) with `--audit=canary` (50 canary clients), its noise "
        f"calibrated to each target; `nodp` is the same with z = 0. {FLAGS.runs} unseeded "
        "run(s) per level. Empirical epsilon: mean ± sd over runs, and each run's estimate "
        "with its 95% bootstrap interval; a violation is an interval entirely above the "
        "theoretical epsilon.", "",
        f"Empirical epsilon grows with the theoretical one: "
        f"{'–' if grows is None else 'yes' if grows else 'NO'}; violations: {violations} of "
        f"{len(points)} DP runs. No violation found is not a proof of privacy (README, "
        "'Reading the canary audit')."])
  plots.plot_canary_audit(points, reference, os.path.join(output_dir, "canary_audit.png"),
                          title="Canary audit (Andrew et al. 2024) of the main job, "
                                "PneumoniaMNIST")
  progress.close()
  print(f"canary table: {len(table)} levels in {(time.time() - start) / 60:.1f} min; "
        f"{os.path.join(output_dir, 'results.md')}")


if __name__ == "__main__":
  _define_flags()
  app.run(recipes.stop_as_one_line(main))
