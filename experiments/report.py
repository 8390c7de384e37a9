"""The privacy-utility study's outputs: results.csv, results.md and the two figures.

Reads what the runs left (summary.json, audit.json, metrics.csv), aggregates
over seeds (mean and sample std per mode and grid level) and draws the
figures with `experiments.plots`.
"""

import collections
import csv
import datetime
import io
import math
import os
import subprocess
from typing import Optional, Sequence

import numpy as np

from tff_dpmed.files import write_atomic
from tff_dpmed.privacy.budget import BudgetLedger
from tff_dpmed.program import audit
from tff_dpmed.program.config import DEFAULT_NUM_CANARIES
from experiments import plots
from experiments.grid import MODES, GridPoint, StudySettings
from experiments.runner import read_summary

CSV_COLUMNS = ("mode", "z", "epsilon", "delta", "empirical_epsilon", "empirical_epsilon_low",
               "empirical_epsilon_high", "canary_violation", "test_accuracy", "test_auc",
               "mia_auc", "mia_advantage", "wall_seconds", "seed", "target_epsilon", "run")
# Aggregated in results.md, in this order.
_TABLE_METRICS = (("epsilon", "ε"), ("empirical_epsilon", "empirical ε (canary)"),
                  ("test_auc", "test AUC"), ("test_accuracy", "test accuracy"),
                  ("mia_auc", "MIA AUC"), ("mia_advantage", "MIA advantage"),
                  ("wall_seconds", "wall s"))
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
PRIVACY_UTILITY_PNG, TRAINING_CURVES_PNG = "privacy_utility.png", "training_curves.png"
# The per-round metric of training_curves.png: evaluated on the val split every
# --rounds_per_eval rounds in every mode (DP runs log no train loss: it is not
# covered by their epsilon).
CURVE_METRIC = "val_auc"


def collect_rows(points: Sequence[GridPoint], settings: StudySettings) -> list:
  """One results row per finished run without canaries (runs without summary.json are
  left out), with the empirical epsilon of its canary twin if that has finished."""
  rows = []
  for p in points:
    if p.canaries:
      continue
    run_dir = settings.run_dir(p)
    summary = read_summary(run_dir)
    if summary is None:
      continue
    result = audit.load_audit(run_dir) or {}
    privacy = summary["privacy"]
    twin_point = p.twin()
    twin = read_summary(settings.run_dir(twin_point)) if twin_point in points else None
    canary = (twin or {}).get("audit") or {}
    low, high = canary.get("epsilon_ci") or (None, None)
    rows.append({
        "mode": p.mode,
        "z": summary["config"].get("noise_multiplier") if p.mode != "none" else None,
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "empirical_epsilon": canary.get("epsilon_estimate"),
        "empirical_epsilon_low": low,
        "empirical_epsilon_high": high,
        "canary_violation": canary.get("violation"),
        "test_accuracy": summary.get("test_accuracy"),
        "test_auc": summary.get("test_auc"),
        "mia_auc": result.get("attack_auc"),
        "mia_advantage": result.get("attacker_advantage"),
        "wall_seconds": summary.get("wall_seconds"),
        "seed": p.seed,
        "target_epsilon": p.target_epsilon,
        "run": p.name,
        # Not written to the csv: for grouping and curves.
        "_level": p.level, "_label": p.level_label,
    })
  return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
  out = io.StringIO(newline="")
  writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
  write_atomic(path, out.getvalue().encode())


def _num(value) -> Optional[float]:
  if value is None or value == "":
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def aggregate(rows: Sequence[dict]) -> list:
  """Groups rows by (mode, grid level): values over seeds, mean and std of each metric.

  std is the sample std (ddof=1); None with fewer than two finite values.
  """
  groups = collections.OrderedDict()
  order = {m: i for i, m in enumerate(MODES)}
  for row in sorted(rows, key=lambda r: (order.get(r["mode"], 99), r.get("_level") or 0,
                                         r["seed"])):
    key = (row["mode"], row.get("_level"))
    g = groups.setdefault(key, {"mode": row["mode"], "level": row.get("_level"),
                                "label": row.get("_label", ""), "seeds": [],
                                "values": {m: [] for m, _ in _TABLE_METRICS + (("z", ""),)}})
    g["seeds"].append(row["seed"])
    for metric in g["values"]:
      g["values"][metric].append(_num(row.get(metric)))
  out = []
  for g in groups.values():
    g["mean"], g["std"] = {}, {}
    for metric, values in g["values"].items():
      finite = [v for v in values if v is not None]
      g["mean"][metric] = float(np.mean(finite)) if finite else None
      g["std"][metric] = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    out.append(g)
  return out


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
  if value is None:
    return "–"
  if spec == "eps":
    return f"{value:.3g}" if value < 1000 else f"{value:.3e}"
  return format(value, spec)


def _mean_pm_std(g: dict, metric: str, spec: str = ".3f") -> str:
  mean, std = g["mean"][metric], g["std"][metric]
  if mean is None:
    return "∞ (no DP)" if metric == "epsilon" and g["mode"] == "none" else "–"
  return f"{_fmt(mean, spec)} ± {_fmt(std, spec)}"


def results_markdown(rows: Sequence[dict], command: str, commit: str,
                     setting: str = "", failed: Optional[dict] = None,
                     budget_line: str = "") -> str:
  """The results.md text: command and commit on top, then mean ± std per (mode, z)."""
  groups = aggregate(rows)
  by_target = any(r.get("target_epsilon") is not None for r in rows)
  lines = [
      "# Privacy-utility study",
      "",
      f"Command: `{command}`",
      "",
      f"Git commit: `{commit}`",
      "",
      f"Generated: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      "",
  ]
  if setting:
    lines += [setting, ""]
  lines += [
      "Each cell is the mean ± sample std over seeds (– for a single seed). ε is the "
      "client-level epsilon at the run's δ (∞ without DP). MIA AUC and advantage are the "
      "best of TF Privacy's membership-inference attacks on the final model (example level; "
      "0.5 is chance).",
      "",
  ]
  audited = any(r.get("empirical_epsilon") is not None for r in rows)
  metrics = [(m, title) for m, title in _TABLE_METRICS
             if audited or m != "empirical_epsilon"]
  if audited:
    violations = sum(bool(r.get("canary_violation")) for r in rows)
    lines += [
        "Empirical ε is the client-level canary audit's estimate at the run's δ (one-shot "
        "estimation, Andrew et al. 2024; the released model only), mean ± std over seeds, "
        "measured on each run's twin: the same settings with 50 canary clients, which join "
        "the rounds and so move the model (the other columns are the run without them). "
        "results.csv has each twin's 95% interval. It is an estimate against one attack, not "
        "a proof of privacy; a twin whose interval lies entirely above its ε is a violation: "
        f"{violations} of {sum(r.get('empirical_epsilon') is not None for r in rows)} twins.",
        "",
    ]
  level_header = "target ε | z" if by_target else "z"
  header = ["mode", level_header, "runs"] + [title for _, title in metrics]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "|".join(["---"] * len(header)) + "|")
  for g in groups:
    if g["mode"] == "none":
      level = "–"
    elif by_target:
      level = f"{g['level']:g} | {_mean_pm_std(g, 'z', '.3f')}"
    else:
      level = f"{g['level']:g}"
    cells = [g["mode"], level, str(len(g["seeds"]))]
    for metric, _ in metrics:
      cells.append(_mean_pm_std(g, metric, "eps" if "epsilon" in metric else
                                ".0f" if metric == "wall_seconds" else ".3f"))
    lines.append("| " + " | ".join(cells) + " |")
  if budget_line:
    lines += ["", budget_line]
  if failed:
    lines += ["", "Failed runs (not in the table):", ""]
    lines += [f"- `{name}`: {status}" for name, status in sorted(failed.items())]
  return "\n".join(lines) + "\n"


def training_curves(points: Sequence[GridPoint], settings: StudySettings,
                    curve_level: Optional[float]) -> dict:
  """CURVE_METRIC per round (metrics.csv) of each mode's runs at `curve_level` (and no DP).

  Only rounds with a value count: evaluation rounds, and not an undefined AUC.
  """
  curves = collections.OrderedDict()
  for p in points:
    if p.canaries:
      continue
    if p.mode != "none" and (curve_level is None or p.level is None
                             or not math.isclose(p.level, curve_level)):
      continue
    path = os.path.join(settings.run_dir(p), "metrics.csv")
    if read_summary(settings.run_dir(p)) is None or not os.path.exists(path):
      continue
    label = plots.MODE_STYLE[p.mode]["label"] + ("" if p.mode == "none" else f", {p.level_label}")
    curve = {}
    with open(path, newline="") as f:
      for row in csv.DictReader(f):
        if row.get(CURVE_METRIC) not in (None, ""):
          curve[int(row["round"])] = float(row[CURVE_METRIC])
    curves.setdefault(label, {"mode": p.mode, "runs": []})["runs"].append(curve)
  return curves


def git_commit(repo_dir: str) -> str:
  """`git rev-parse HEAD`, marked if the work tree has uncommitted changes (read-only git)."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    # Changed or new Python files: the code that ran is not all in HEAD.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                            "*.py"], cwd=repo_dir, capture_output=True, text=True, check=True,
                           timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown (not a git checkout)"
  return head + (" (with uncommitted changes)" if dirty else "")


def study_budget_line(settings) -> str:
  """The privacy spent by all the study's DP runs together, from its budget ledger."""
  if not os.path.exists(settings.budget_ledger):
    return ""
  total = BudgetLedger(settings.budget_ledger).total()
  return (f"Privacy spent by the whole study on these clients: every DP run composed "
          f"({total.entries} runs, {total.compositions} accounting steps, {total.method}) "
          f"gives client-level ε = {total.epsilon:.4g} at δ = {total.delta:g}. Each row's ε "
          "is what one run alone would cost; the non-private baseline is not covered.")


def write_outputs(points: Sequence[GridPoint], settings: StudySettings, command: str,
                  commit: str, curve_level: Optional[float], setting: str = "",
                  failed: Optional[dict] = None) -> list:
  """Writes results.csv, results.md and both figures to settings.output_dir; returns the rows."""
  os.makedirs(settings.output_dir, exist_ok=True)
  rows = collect_rows(points, settings)
  out = settings.output_dir
  write_csv(rows, os.path.join(out, RESULTS_CSV))
  write_atomic(os.path.join(out, RESULTS_MD),
               results_markdown(rows, command, commit, setting, failed,
                                study_budget_line(settings)).encode())
  title = setting.split(". ")[0] if setting else ""
  plots.plot_privacy_utility(aggregate(rows), os.path.join(out, PRIVACY_UTILITY_PNG),
                             title=title)
  curve_label = next((p.level_label for p in points
                      if p.level is not None and curve_level is not None
                      and math.isclose(p.level, curve_level)), "")
  plots.plot_training_curves(training_curves(points, settings, curve_level),
                             os.path.join(out, TRAINING_CURVES_PNG),
                             title=f"val AUC per round at {curve_label}" if curve_label else "")
  return rows


def describe_setting(base: dict, settings: StudySettings, canary_twins: bool = False) -> str:
  """The study's setting in words, for the top of results.md (and the figure's title)."""
  b = base
  central = (f"central: {settings.central_clip_mode} clipping "
             f"({'initial ' if settings.central_clip_mode == 'adaptive' else ''}C="
             f"{settings.central_clip if settings.central_clip_mode == 'adaptive' else settings.clip:g})")
  return (f"{b['dataset']} ({b['image_size']} px), model {b['model']}, {b['num_clients']} "
          f"clients ({b['partition']}), {b['clients_per_round']} per round ({b['sampling']} "
          f"sampling), {b['rounds']} rounds, client lr {b['client_learning_rate']:g}. "
          f"DP: {central}; local: fixed clipping C={settings.clip:g}. Audit: up to "
          f"{settings.audit_max_examples} members (train split) and as many class-stratified "
          f"non-members ({settings.audit_nonmembers} split), seed {settings.audit_seed}. "
          + ("Runs are seeded (splits, init, client shuffling, local-DP noise; central noise "
             "never is); the trainer's warning applies that seeded local noise is not private "
             "in deployment, though its distribution, hence utility and accounted ε, is the "
             "same. " if settings.seeded else
             "Runs are unseeded; the seed only names a replicate. ")
          + "DP runs sample their cohorts unseeded (the no-DP baseline's follow the seed), so "
          "ε is reported with the amplification of sampling."
          + (f" Each run has a canary twin: the same run with {DEFAULT_NUM_CANARIES} canary "
             "clients (--audit=canary), sampled as the hospitals are, for the empirical ε."
             if canary_twins else ""))
