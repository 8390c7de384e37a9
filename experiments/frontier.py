"""The calibrated privacy-utility frontier: test AUC at target epsilons, per privacy unit.

  python -m experiments.frontier [--runs=3] [--target_epsilons=0.5,1,2,3,4,8]
      [--only=pneumonia_iid_example,...] [--data_dir=...]
      [--output_dir=experiments/results/frontier] [--audit_levels=3,nodp] [--quick]

Each row of the study is one recipe (a privacy unit and placement, a dataset
and a split), tuned once on val and documented in ROWS. It runs at every
target epsilon, its noise calibrated by the trainer for its own rounds and
sampling (`--target_epsilon`), and once more with z = 0: the same recipe
without noise. Every level runs `--runs` times, unseeded; the table gives
the test AUC of each run's best-val round, mean ± sd. A target no noise can
reach is a row that says so.

Outputs in --output_dir: results.md and results.csv (updated after every
level, so a stopped study keeps what it finished), frontier_<dataset>.png
(test AUC against epsilon on a log axis, one line per row, the non-private
runs as bands) and curves_<dataset>.png (val AUC per round). After every
level, each row runs once more at each of --audit_levels as a canary twin
(`--audit=canary`), whose empirical epsilon fills the audit table. Rerunning
the command reuses finished runs and resumes a killed one from its checkpoint.
`--quick` is a three-run smoke test (one row, epsilon 3 and z = 0, 2 rounds,
and the epsilon-3 twin).
"""

import dataclasses
import math
import os
import shlex
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import tqdm

from tff_dpmed.program import metrics_log
from experiments import plots
from experiments import recipes
from experiments.recipes import Recipe

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined when run as a program only: importing the module (tests) defines none,
  so it cannot clash with another study's or the benchmarks' flags."""
  flags.DEFINE_integer("runs", 3, "Independent (unseeded) runs per level.")
  flags.DEFINE_list("target_epsilons", ["0.5", "1", "2", "3", "4", "8"],
                    "Target epsilons (each row's own unit, at its delta).")
  flags.DEFINE_list("only", [], "Run only these rows, in this order (default: all).")
  flags.DEFINE_string("data_dir", None, "MedMNIST folder (default: the trainer's).")
  flags.DEFINE_string("output_dir", os.path.join("experiments", "results", "frontier"),
                      "Where the runs, the table and the figures go.")
  flags.DEFINE_bool(
      "report_only", False, "Train nothing: rebuild the table and figures from finished runs "
      "(levels not finished are listed as such). For a study run as several processes, one "
      "per --only subset, or stopped part-way.")
  flags.DEFINE_bool("quick", False, "Smoke test: one row, epsilon 3 and z = 0, "
                    "2 rounds, 1 run, and the epsilon-3 canary twin.")
  flags.DEFINE_list("audit_levels", ["3", "nodp"],
                    "Levels (target epsilons, or nodp) at which each row also runs once as "
                    "a canary twin (--audit=canary: canary clients in client-level rows, "
                    "canary examples in example-level ones) for the empirical epsilon "
                    "column; after every row's utility runs, one level for all rows at a "
                    "time. Empty: no audit.")


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the frontier: a tuned recipe, run at every target epsilon and at z = 0."""
  name: str
  label: str        # For the figures.
  dataset: str
  partition: str
  mode: str
  flags: tuple
  why: str          # Where the recipe comes from.

  def recipe(self, target: Optional[float]) -> Recipe:
    level = f"eps{target:g}" if target is not None else "nodp"
    return Recipe(f"{self.name}_{level}", self.dataset, self.partition, self.mode, target,
                  self.flags)

  def canary_twin(self, target: Optional[float]) -> Recipe:
    """The level's recipe with the trainer's canary audit: its empirical epsilon. The
    canaries join the training, so the twin's AUC is not the row's."""
    recipe = self.recipe(target)
    return dataclasses.replace(recipe, name=recipe.name + "_canaries",
                               flags=recipe.flags + ("--audit=canary",))


def _audit_cell(summary: dict) -> str:
  """The twin's empirical epsilon: the client-level estimate [CI], or the example-level
  one-run lower bound."""
  audit = summary.get("audit") or {}
  flag = " VIOLATION" if audit.get("violation") else ""
  if "epsilon_lower_bound" in audit:
    return f"≥ {audit['epsilon_lower_bound']:.2f}{flag}"
  if "epsilon_estimate" in audit:
    low, high = audit.get("epsilon_ci") or (None, None)
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    return f"{fmt(audit['epsilon_estimate'])} [{fmt(low)}, {fmt(high)}]{flag}"
  return "no audit in summary"


def _audit_glance(rows: list, levels: list, cells: dict) -> list:
  """Markdown lines: the canary twins' empirical epsilon per row and audited level."""
  if not levels:
    return []
  name = lambda t: f"ε = {t:g}" if t is not None else "no noise"
  lines = ["## Audit: empirical ε of one canary twin per level", "",
           "Client-level rows: the canary-client estimate (Andrew et al. 2024) with its 95% "
           "bootstrap interval; example-level rows: the one-run lower bound from canary "
           "examples (Steinke et al. 2023). The theoretical ε is the column's; VIOLATION "
           "marks an audit above it.", "",
           "| row | unit | " + " | ".join(name(t) for t in levels) + " |",
           "|" + "---|" * (len(levels) + 2)]
  for row in rows:
    lines.append(f"| {row.label} (`{row.name}`) | {_unit(row)} | " +
                 " | ".join(cells.get((row.name, t), "not run yet") for t in levels) + " |")
  return lines + [""]


def _shared(clients: int) -> tuple:
  """Every hospital in every round (example-level accounting counts them all anyway)."""
  return (f"--num_clients={clients}", f"--clients_per_round={clients}", "--sampling=all",
          "--rounds_per_eval=2", "--server_learning_rate=1.0", "--server_momentum=0",
          "--clip_mode=fixed", "--model=scatter_linear")


def _hospital_level(*extra: str) -> tuple:
  """Client-level DP over 10 hospitals, all in every round: no sampling amplification."""
  return _shared(10) + ("--client_batch_size=32",
                        "--client_learning_rate=2", "--rounds=20", "--clip=1", *extra)


def _example(batch: int, lr: float, rounds: int, *extra: str, clients: int = 10) -> tuple:
  return _shared(clients) + (f"--client_batch_size={batch}", f"--client_learning_rate={lr:g}",
                             f"--rounds={rounds}", "--clip=1", *extra)


def _patients(patients: int, per_round: int) -> tuple:
  """Patients as clients: one image each, Poisson-sampled, sent to TFF in packs."""
  return (f"--num_clients={patients}", f"--clients_per_round={per_round}",
          "--clip_mode=fixed", "--clip=1", "--rounds=60", "--model=scatter_linear",
          "--client_batch_size=1", "--client_learning_rate=0.5", "--server_learning_rate=1",
          "--server_momentum=0.9", "--rounds_per_eval=4")


_CENTRAL_WHY = ("tuned on PneumoniaMNIST val at eps 3 (client lr 0.5, 2, 4; clip 0.1, 1, 3; "
                "one run each)")
_LOCAL_WHY = "the central recipe, untuned"

ROWS = (
    Row("pneumonia_iid_example", "example-level DP-SGD, 10 hospitals, IID", "pneumoniamnist",
        "iid", "example", _example(128, 4.0, 20, "--client_epochs=1"),
        "experiments.dp_sgd_recipes pneumonia_iid"),
    Row("pneumonia_dirichlet_example", "example-level DP-SGD, 10 hospitals, Dirichlet 0.5",
        "pneumoniamnist", "dirichlet", "example",
        _example(256, 4.0, 40, "--client_epochs=1", "--local_batching=fixed_rate"),
        "experiments.dp_sgd_recipes pneumonia_dirichlet_b256_r40"),
    Row("pneumonia_iid_central", "hospital-level central DP, 10 hospitals, IID",
        "pneumoniamnist", "iid", "central", _hospital_level(), _CENTRAL_WHY),
    Row("pneumonia_dirichlet_central", "hospital-level central DP, 10 hospitals, Dirichlet 0.5",
        "pneumoniamnist", "dirichlet", "central", _hospital_level(), _CENTRAL_WHY),
    # DP-FTRL (issue 14): the same steps, with the noise of a tree over the
    # rounds instead of fresh noise each round.
    Row("pneumonia_iid_central_tree", "hospital-level DP-FTRL (tree noise), 10 hospitals, IID",
        "pneumoniamnist", "iid", "central_tree", _hospital_level(),
        "the pneumonia_iid_central recipe, untuned"),
    # Patients as clients (issue 14): client-level DP is patient-level DP, and
    # Poisson sampling of 256 of 4,708 patients per round amplifies it.
    Row("pneumonia_patients_central", "patient-level central DP, 4,708 patients as clients",
        "pneumoniamnist", "per_example", "central", _patients(4708, 256),
        "tuned on PneumoniaMNIST val at eps 3, one run each: 20, 60 or 100 rounds of 256 "
        "patients or 50 of 512, client lr 0.5 or 1 (README, Patients as clients)"),
    Row("pneumonia_iid_local", "hospital-level local DP, 10 hospitals, IID", "pneumoniamnist",
        "iid", "local", _hospital_level(), _LOCAL_WHY),
    # One data holder with all the data: DP-SGD as a central trainer runs it,
    # the upper bound the federated rows are measured against. Its batch is the
    # federated recipe's examples per step summed over the 10 hospitals, with the
    # same steps and learning rate: the same update with 1/sqrt(10) of the noise.
    Row("pneumonia_central_dp_sgd_b1280", "central DP-SGD reference (1 data holder)",
        "pneumoniamnist", "iid", "example",
        _example(1280, 4.0, 20, "--client_epochs=1", clients=1),
        "the pneumonia_iid_example recipe with one client and 10x its batch"),
    Row("breast_iid_example", "example-level DP-SGD, 10 hospitals, IID", "breastmnist", "iid",
        "example", _example(32, 2.0, 30, "--client_epochs=1"),
        "experiments.dp_sgd_recipes breast_iid"),
    Row("breast_dirichlet_example", "example-level DP-SGD, 10 hospitals, Dirichlet 0.5",
        "breastmnist", "dirichlet", "example",
        _example(32, 2.0, 30, "--client_epochs=1", "--local_batching=fixed_rate"),
        "the breast_iid_example recipe with fixed-rate batches (small hospitals), untuned"),
    Row("breast_central_dp_sgd_b320", "central DP-SGD reference (1 data holder)",
        "breastmnist", "iid", "example", _example(320, 2.0, 30, "--client_epochs=1", clients=1),
        "the breast_iid_example recipe with one client and 10x its batch"),
    Row("breast_iid_central", "hospital-level central DP, 10 hospitals, IID", "breastmnist",
        "iid", "central", _hospital_level(), _CENTRAL_WHY),
    Row("breast_dirichlet_central", "hospital-level central DP, 10 hospitals, Dirichlet 0.5",
        "breastmnist", "dirichlet", "central", _hospital_level(), _CENTRAL_WHY),
    Row("breast_patients_central", "patient-level central DP, 546 patients as clients",
        "breastmnist", "per_example", "central", _patients(546, 64),
        "the pneumonia_patients_central recipe with 64 of 546 patients per round, untuned"),
    Row("breast_iid_local", "hospital-level local DP, 10 hospitals, IID", "breastmnist", "iid",
        "local", _hospital_level(), _LOCAL_WHY),
)


def _quick_row() -> Row:
  row = next(r for r in ROWS if r.name == "breast_iid_example")  # The smallest dataset.
  return dataclasses.replace(row, name="quick", flags=row.flags + ("--rounds=2",))


def _curve(run_dir: str) -> dict:
  return {int(r["round"]): float(r["val_auc"]) for r in metrics_log.read_metrics(run_dir)
          if r.get("val_auc") not in (None, "")}


def _figures(rows: list, done: dict, output_dir: str) -> None:
  """frontier_<dataset>.png and curves_<dataset>.png from the finished levels."""
  for dataset in sorted({r.dataset for r in rows}):
    series, curves = [], {}
    for row in [r for r in rows if r.dataset == dataset]:
      points, baseline = [], None
      for (name, target), summaries in done.items():
        if name != row.name or not summaries:
          continue
        aucs = recipes.test_aucs(summaries)
        if target is None:
          baseline = aucs
        else:
          points.append((max(s["privacy"]["epsilon"] for s in summaries), aucs))
        if target in (None, 3.0):
          curves[f"{row.label}, " + ("no noise" if target is None else "ε=3")] = {
              "mode": row.mode, "runs": [_curve(s["run_dir"]) for s in summaries]}
      series.append({"label": row.label, "mode": row.mode, "points": sorted(points),
                     "baseline": baseline})
    plots.plot_frontier(series, os.path.join(output_dir, f"frontier_{dataset}.png"),
                        title=f"{dataset}: test AUC at calibrated ε (mean ± sd over runs)")
    plots.plot_training_curves(curves, os.path.join(output_dir, f"curves_{dataset}.png"),
                               title=f"{dataset}: val AUC per round")


def _unit(row: Row) -> str:
  return ("example" if row.mode == "example" else
          "patient" if row.partition == "per_example" else "hospital")


def _glance(rows: list, targets: list, cells: dict) -> list:
  """Markdown lines: one line per row, test AUC (mean ± sd) at each target and without noise."""
  levels = [*targets, None]
  lines = ["## At a glance: test AUC (mean ± sd over runs)", "",
           "| row | unit | " + " | ".join(f"ε = {t:g}" for t in targets) + " | no noise |",
           "|" + "---|" * (len(levels) + 2)]
  for row in rows:
    lines.append(f"| {row.label} (`{row.name}`) | {_unit(row)} | " +
                 " | ".join(cells.get((row.name, t), "not run yet") for t in levels) + " |")
  return lines + ["", "## Every level", ""]


def _audit_levels(targets: list) -> list:
  """--audit_levels as levels of this study (floats, None for nodp), in the flag's order."""
  levels = []
  for text in FLAGS.audit_levels:
    if text == "nodp":
      levels.append(None)
      continue
    try:
      level = float(text)
    except ValueError:
      level = math.nan
    if level not in targets:
      raise app.UsageError(f"--audit_levels: {text} is not one of the study's levels "
                           f"({','.join(f'{t:g}' for t in targets)},nodp)")
    levels.append(level)
  return list(dict.fromkeys(levels))


def main(argv) -> None:
  del argv
  start = time.time()
  if FLAGS.quick:
    rows, targets, runs, audit_levels = [_quick_row()], [3.0], 1, [3.0]
  else:
    unknown = set(FLAGS.only) - {r.name for r in ROWS}
    if unknown:
      raise app.UsageError(f"--only: unknown rows {', '.join(sorted(unknown))}; use "
                           f"{', '.join(r.name for r in ROWS)}")
    by_name = {r.name: r for r in ROWS}
    rows = [by_name[n] for n in dict.fromkeys(FLAGS.only)] if FLAGS.only else list(ROWS)
    try:
      targets = sorted({float(t) for t in FLAGS.target_epsilons})
    except ValueError:
      raise app.UsageError(f"--target_epsilons={','.join(FLAGS.target_epsilons)}: give numbers, "
                           "e.g. 0.5,1,2,4,8") from None
    if not targets or min(targets) <= 0:
      raise app.UsageError("--target_epsilons must be numbers > 0, e.g. 0.5,1,2,4,8")
    runs = FLAGS.runs
    audit_levels = _audit_levels(targets)
  output_dir = FLAGS.output_dir
  os.makedirs(output_dir, exist_ok=True)
  command = shlex.join(["python", "-m", "experiments.frontier", *sys.argv[1:]])
  levels = [(row, target) for row in rows for target in [*targets, None]]
  twins = [(row, target) for target in audit_levels for row in rows]
  table, done, cells, audit_cells = [], {}, {}, {}
  progress = tqdm.tqdm(total=len(levels) * runs + len(twins), desc="frontier runs",
                       unit="run", dynamic_ncols=True)

  def write_table() -> None:
    recipes.write_table(table, output_dir, [
        "# Privacy-utility frontier at calibrated epsilon", "",
        f"`{command}`: {(time.time() - start) / 60:.1f} min of wall time for this invocation "
        "on this machine (2 cores; finished runs are reused).",
        "Each level is the row's recipe with its noise calibrated to the target (or z = 0), "
        f"{runs} unseeded run(s); test AUC at each run's best-val round, mean ± sd. Epsilon "
        "is in the row's privacy unit (privacy_unit) at its delta.", "",
        "Recipes: " + "; ".join(f"`{r.name}` from {r.why}" for r in rows) + ".", "",
        *_audit_glance(rows, audit_levels, audit_cells),
        *_glance(rows, targets, cells)])

  for row, target in levels:
    recipe = row.recipe(target)
    summaries = []
    try:
      for run in range(runs):
        if FLAGS.report_only:
          summary = recipes.finished_run(recipe, run, output_dir)
          if summary is None:
            break
        else:
          summary = recipes.run_recipe(recipe, run, FLAGS.data_dir, output_dir)
        summary["run_dir"] = recipes.run_dir_of(recipe, run, output_dir)
        summaries.append(summary)
        progress.update()
    except recipes.Unreachable as e:
      progress.update(runs - len(summaries))
      table.append(recipes.unreachable_row(recipe, str(e)))
      cells[(row.name, target)] = "unreachable"
    else:
      if summaries:
        done[(row.name, target)] = summaries
        table.append(recipes.row(recipe, summaries))
        cells[(row.name, target)] = (recipes.mean_sd(recipes.test_aucs(summaries)) +
                                     (f" ({len(summaries)} of {runs})"
                                      if len(summaries) < runs else ""))
      else:
        table.append(recipes.not_run_row(recipe))
    write_table()
    if not FLAGS.report_only:
      _figures(rows, done, output_dir)  # Partial figures as levels finish.
  # The audit twins, after every utility run: the study's table comes first.
  for row, target in twins:
    twin = row.canary_twin(target)
    try:
      summary = (recipes.finished_run(twin, 0, output_dir) if FLAGS.report_only else
                 recipes.run_recipe(twin, 0, FLAGS.data_dir, output_dir))
    except recipes.Unreachable:
      audit_cells[(row.name, target)] = "unreachable"
    except RuntimeError as e:  # One twin that fails leaves the others their cells.
      audit_cells[(row.name, target)] = "failed (see its log)"
      print(f"warning: {e}", file=sys.stderr, flush=True)
    else:
      if summary is not None:
        audit_cells[(row.name, target)] = _audit_cell(summary)
    progress.update()
    write_table()
  if FLAGS.report_only:
    _figures(rows, done, output_dir)  # Otherwise drawn as each level finished.
  progress.close()
  print(f"frontier: {len(table)} levels and {len(audit_cells)} audit twins in "
        f"{(time.time() - start) / 60:.1f} min; {os.path.join(output_dir, 'results.md')}")


if __name__ == "__main__":
  _define_flags()
  app.run(recipes.stop_as_one_line(main))
