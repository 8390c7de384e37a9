"""Do the canary audits see DP? Their empirical epsilon across theoretical epsilons.

  python -m experiments.canary_table [--runs=3] [--target_epsilons=1,3,8]
      [--only=client,example] [--data_dir=...]
      [--output_dir=experiments/results/canary] [--report_only]

Two audited recipes on PneumoniaMNIST, each with its noise calibrated to every
target epsilon and once more with z = 0 (the same clipping, no noise: the
reference where the audit must see the leak):

- client: the main job (central DP-FedAvg, adaptive clipping, 100 hospitals,
  20 per round, 60 rounds) with `--audit=canary`: 50 canary clients and the
  one-shot estimate (Andrew et al. 2024), with its 95% interval;
- example: example-level DP-SGD in 10 hospitals (the frontier's
  pneumonia_iid_example recipe) with 300 gradient canary examples and the
  one-run lower bound at 95% (Steinke et al. 2023).

Every level runs `--runs` times, unseeded. The table gives the theoretical
epsilon, the empirical one (mean ± sd over runs, and each run's value with
its interval) and the number of violations (an interval entirely above the
theoretical epsilon: there must be none). canary_audit.png plots them.
README "Reading the canary audit" says how to read them: "no violation
found" is not a proof of privacy. Rerunning the command reuses finished runs
and resumes a stopped one.
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

# Audited recipe: (trainer --dp_mode, flags, label). The example row is the
# frontier's pneumonia_iid_example recipe.
AUDITED = {
    "client": ("central", ("--audit=canary",),
               "client level: main job, 50 canary clients (one-shot estimate)"),
    "example": ("example", (
        "--num_clients=10", "--clients_per_round=10", "--sampling=all", "--rounds_per_eval=2",
        "--server_learning_rate=1.0", "--server_momentum=0", "--clip_mode=fixed",
        "--model=scatter_linear", "--client_batch_size=128", "--client_learning_rate=4",
        "--rounds=20", "--clip=1", "--client_epochs=1", "--audit=canary",
        "--num_canaries=300"),
        "example level: DP-SGD in 10 hospitals, 300 gradient canaries (one-run bound)"),
}


def _define_flags() -> None:
  """Defined only when run as a program, so importing the module defines no flags."""
  flags.DEFINE_integer("runs", 3, "Independent (unseeded) runs per level.")
  flags.DEFINE_list("target_epsilons", ["1", "3", "8"], "Target epsilons (each row's unit).")
  flags.DEFINE_list("only", [], f"Audits to run, in this order: {', '.join(AUDITED)}.")
  flags.DEFINE_string("data_dir", None, "MedMNIST folder (default: the trainer's).")
  flags.DEFINE_string("output_dir", os.path.join("experiments", "results", "canary"),
                      "Where the runs, the table and the figure go.")
  flags.DEFINE_bool("report_only", False, "Train nothing: rebuild the table and figure "
                    "from finished runs.")


def recipe_for(kind: str, target: Optional[float]) -> Recipe:
  mode, extra, _ = AUDITED[kind]
  level = f"eps{target:g}" if target is not None else "nodp"
  return Recipe(f"{kind}_canary_{level}", "pneumoniamnist", "iid", mode, target, extra)


def _number(value) -> float:
  """A JSON number, or the string "inf" the audit writes for an unbounded value."""
  return float(value) if value is not None else math.nan


def audit_points(summaries: list) -> list:
  """(theoretical, estimate, ci, violation) of each run, from its summary.json.

  A one-run lower bound is its own interval's lower end (and has no upper end).
  """
  points = []
  for s in summaries:
    a = s["audit"]
    theory = a["theoretical_epsilon"]
    if "epsilon_lower_bound" in a:
      estimate = _number(a["epsilon_lower_bound"])
      ci = [estimate, math.inf]
    else:
      estimate, ci = _number(a["epsilon_estimate"]), [_number(v) for v in a["epsilon_ci"]]
    points.append({"theoretical": _number(theory) if theory is not None else math.inf,
                   "estimate": estimate, "ci": ci, "violation": bool(a["violation"]),
                   "canaries": a["num_canaries"]})
  return points


def audit_row(recipe: Recipe, summaries: list) -> dict:
  """The recipe's row (recipes.row) with the audit's columns."""
  points = audit_points(summaries)
  estimates = [p["estimate"] for p in points]
  finite = [e for e in estimates if math.isfinite(e)]
  row = recipes.row(recipe, summaries)
  lower_bound = "epsilon_lower_bound" in summaries[0]["audit"]
  row.update({
      "canaries": points[0]["canaries"],
      "audit": "lower bound (95%)" if lower_bound else "estimate [95% CI]",
      "empirical_epsilon": (f"{statistics.mean(finite):.3g} ± "
                            f"{statistics.stdev(finite) if len(finite) > 1 else 0:.2g}"
                            if len(finite) == len(estimates) else "inf"),
      "per_run": "; ".join(
          f"{p['estimate']:.3g}" if lower_bound else
          f"{p['estimate']:.3g} [{p['ci'][0]:.3g}, {p['ci'][1]:.3g}]" for p in points),
      "violations": f"{sum(p['violation'] for p in points)} of {len(points)}",
  })
  return row


def grows_with_epsilon(levels: list) -> Optional[bool]:
  """Whether the mean empirical epsilon does not fall as the theoretical one rises, and
  rises from the smallest to the largest; None under two levels.

  `levels`: (theoretical epsilon, [empirical epsilons]) of the DP levels.
  """
  means = [statistics.mean(e) for _, e in sorted(levels) if e]
  if len(means) < 2:
    return None
  return all(a <= b for a, b in zip(means, means[1:])) and means[0] < means[-1]


def main(argv) -> None:
  del argv
  start = time.time()
  unknown = set(FLAGS.only) - set(AUDITED)
  if unknown:
    raise app.UsageError(f"--only: unknown audits {', '.join(sorted(unknown))}; use "
                         f"{', '.join(AUDITED)}")
  kinds = list(dict.fromkeys(FLAGS.only)) or list(AUDITED)
  try:
    targets = sorted({float(t) for t in FLAGS.target_epsilons})
  except ValueError:
    raise app.UsageError("--target_epsilons: give numbers > 0, e.g. 1,3,8") from None
  if not targets or targets[0] <= 0:
    raise app.UsageError("--target_epsilons: give numbers > 0, e.g. 1,3,8")
  output_dir = FLAGS.output_dir
  os.makedirs(output_dir, exist_ok=True)
  command = shlex.join(["python", "-m", "experiments.canary_table", *sys.argv[1:]])
  table, series, verdicts = [], [], []
  progress = tqdm.tqdm(total=len(kinds) * (len(targets) + 1) * FLAGS.runs,
                       desc="canary audit runs", unit="run", dynamic_ncols=True)
  for kind in kinds:
    points, reference, dp_levels = [], [], []
    series.append({"label": AUDITED[kind][2], "points": points, "reference": reference})
    for target in [*targets, None]:
      recipe = recipe_for(kind, target)
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
      _write(table, verdicts + [_verdict(kind, points, dp_levels, reference)], command,
             start, output_dir)
    verdicts.append(_verdict(kind, points, dp_levels, reference))
  _write(table, verdicts, command, start, output_dir)
  plots.plot_canary_audit(series, os.path.join(output_dir, "canary_audit.png"),
                          title="Canary audits on PneumoniaMNIST: empirical against "
                                "theoretical epsilon")
  progress.close()
  print(f"canary table: {len(table)} levels in {(time.time() - start) / 60:.1f} min; "
        f"{os.path.join(output_dir, 'results.md')}")


def _verdict(kind: str, points: list, dp_levels: list, reference: list) -> str:
  grows = grows_with_epsilon(dp_levels)
  ref = [r for r in reference if math.isfinite(r)]
  return (f"- **{kind}**: empirical epsilon grows with the theoretical one: "
          f"{'–' if grows is None else 'yes' if grows else 'NO'}; violations: "
          f"{sum(p['violation'] for p in points)} of {len(points)} DP runs; without noise: "
          + (f"{statistics.mean(ref):.3g} (mean of {len(ref)})" if ref else
             "inf" if reference else "not run yet") + ".")


def _write(table: list, verdicts: list, command: str, start: float, output_dir: str) -> None:
  recipes.write_table(table, output_dir, [
      "# The canary audits across theoretical epsilon", "",
      f"`{command}`: {(time.time() - start) / 60:.1f} min of wall time for this invocation "
      "on this machine (2 cores; finished runs are reused).",
      "Each recipe with its noise calibrated to the target, and with z = 0 (`nodp`), "
      f"{FLAGS.runs} unseeded run(s) per level. Client level: the one-shot estimate with its "
      "95% bootstrap interval. Example level: the one-run lower bound at 95% confidence. A "
      "violation is an interval entirely above the theoretical epsilon.", "",
      *verdicts, "",
      "No violation found is not a proof of privacy (README, 'Reading the canary audit')."])


if __name__ == "__main__":
  _define_flags()
  app.run(recipes.stop_as_one_line(main))
