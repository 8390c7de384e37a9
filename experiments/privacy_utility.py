"""Privacy-utility study: test AUC and membership-inference AUC against epsilon.

  python -m experiments.privacy_utility --data_dir=../shared/data/medmnist \\
      --dataset=pneumoniamnist --num_clients=100 --clients_per_round=10 --rounds=12 \\
      --noise_multipliers=0.1,0.2,0.3,0.5,1.0 --seeds=0,1,2 --output_dir=runs/privacy_utility

Trains one run per (DP mode, noise multiplier z, seed) with the library's
training program (`RunConfig` -> `trainer.prepare` -> `trainer.train`): `none`
once per seed, `central` and `local` once per z and seed (or per
`--target_epsilons` value instead of z). Every finished run is audited with
`tff_dpmed.privacy.audit` (members: the train split; non-members: the test
split). Each run lives in `<output_dir>/runs/<mode>_z<z>_s<seed>/` (`none_s<seed>`
for the baseline, `<mode>_eps<E>_s<seed>` with --target_epsilons). Rerunning
the same command skips runs that have a summary.json (and audits those
without an audit.json); an interrupted run resumes from its checkpoint.

Outputs in <output_dir>/: results.csv (one row per run), results.md (mean ±
std per mode and z, with the command and git commit), privacy_utility.png
(test AUC and MIA AUC against epsilon) and training_curves.png (val AUC per
round at --curve_noise_multiplier).
"""

import collections
import concurrent.futures
import csv
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

from absl import flags
from absl import logging
import numpy as np
import tqdm

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
# TensorFlow must be imported before absl's app.run calls main (see tff_dpmed/train.py).
from tff_dpmed.program import trainer
from tff_dpmed.program.config import RunConfig
from tff_dpmed.privacy import audit
from experiments import plots

MODES = ("none", "central", "local")
CSV_COLUMNS = ("mode", "z", "epsilon", "delta", "test_accuracy", "test_auc", "mia_auc",
               "mia_advantage", "wall_seconds", "seed", "target_epsilon", "run")
# Aggregated in results.md, in this order.
_TABLE_METRICS = (("epsilon", "ε"), ("test_auc", "test AUC"), ("test_accuracy", "test accuracy"),
                  ("mia_auc", "MIA AUC"), ("mia_advantage", "MIA advantage"),
                  ("wall_seconds", "wall s"))
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
PRIVACY_UTILITY_PNG, TRAINING_CURVES_PNG = "privacy_utility.png", "training_curves.png"
# RunConfig fields that a finished run may differ in from the study's flags
# without being a different experiment (paths, where it ran, and what prepare()
# resolves).
_IGNORED_WHEN_RESUMING = {"data_dir", "download", "output_dir", "restart", "audit",
                          "max_concurrent_computation_calls", "executor", "workers",
                          "worker_binary"}


@dataclasses.dataclass(frozen=True)
class GridPoint:
  """One run of the study."""
  mode: str
  seed: int
  noise_multiplier: Optional[float] = None  # None for mode "none" and with target_epsilon.
  target_epsilon: Optional[float] = None

  @property
  def level(self) -> Optional[float]:
    """The grid value this point varies: z, or the target epsilon (None for no DP)."""
    return self.target_epsilon if self.target_epsilon is not None else self.noise_multiplier

  @property
  def level_label(self) -> str:
    if self.mode == "none":
      return "–"
    return f"ε*={self.target_epsilon:g}" if self.target_epsilon is not None else \
        f"z={self.noise_multiplier:g}"

  @property
  def name(self) -> str:
    if self.mode == "none":
      return f"none_s{self.seed}"
    if self.target_epsilon is not None:
      return f"{self.mode}_eps{self.target_epsilon:g}_s{self.seed}"
    return f"{self.mode}_z{self.noise_multiplier:g}_s{self.seed}"


def make_grid(modes: Sequence[str], seeds: Sequence[int],
              noise_multipliers: Sequence[float] = (),
              target_epsilons: Sequence[float] = ()) -> list:
  """Every run: `none` once per seed, each DP mode once per z (or target epsilon) and seed."""
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise UsageError(f"--modes: unknown {', '.join(unknown)}: use some of {', '.join(MODES)}")
  if bool(noise_multipliers) == bool(target_epsilons):
    if any(m != "none" for m in modes):
      raise UsageError("give exactly one of --noise_multipliers and --target_epsilons")
  if not seeds:
    raise UsageError("--seeds is empty: give at least one seed, e.g. --seeds=0,1,2")
  if len(set(seeds)) != len(seeds):
    raise UsageError(f"--seeds={','.join(map(str, seeds))} repeats a seed")
  for name, values in (("noise_multipliers", noise_multipliers),
                       ("target_epsilons", target_epsilons)):
    if any(not (math.isfinite(v) and v > 0) for v in values):
      raise UsageError(f"--{name} must all be finite numbers > 0")
    if len(set(values)) != len(values):
      raise UsageError(f"--{name} repeats a value")
  points = []
  for mode in [m for m in MODES if m in modes]:
    for seed in seeds:
      if mode == "none":
        points.append(GridPoint("none", seed))
        continue
      for z in noise_multipliers:
        points.append(GridPoint(mode, seed, noise_multiplier=float(z)))
      for eps in target_epsilons:
        points.append(GridPoint(mode, seed, target_epsilon=float(eps)))
  return points


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """What every run shares, and how DP modes clip."""
  base: dict            # RunConfig fields shared by every run (dataset, rounds, ...).
  output_dir: str
  clip: float = 0.1     # The fixed clip norm of local DP (and of central DP if fixed).
  central_clip_mode: str = "adaptive"
  central_clip: float = 0.1  # Central DP: the initial (adaptive) or fixed clip norm.
  audit_max_examples: int = 2000
  audit_seed: int = 0
  audit_nonmembers: str = "test"
  keep_checkpoints: bool = False
  # True: RunConfig.seed = the point's seed (reproducible runs, including the
  # local-DP noise). False: seed=None, and the seed only names a replicate.
  seeded: bool = True

  @property
  def runs_dir(self) -> str:
    return os.path.join(self.output_dir, "runs")

  def run_dir(self, point: GridPoint) -> str:
    return os.path.join(self.runs_dir, point.name)


def run_config(point: GridPoint, settings: StudySettings) -> RunConfig:
  """The RunConfig of one grid point."""
  kwargs = dict(settings.base)
  kwargs.update(dp_mode=point.mode, seed=point.seed if settings.seeded else None,
                output_dir=settings.runs_dir,
                experiment_name=point.name, noise_multiplier=point.noise_multiplier,
                target_epsilon=point.target_epsilon, restart=False, audit=False)
  if point.mode == "local":
    kwargs.update(clip_mode="fixed", clip=settings.clip)
  elif point.mode == "central":
    kwargs.update(clip_mode=settings.central_clip_mode,
                  clip=settings.clip if settings.central_clip_mode == "fixed"
                  else settings.central_clip)
  return RunConfig(**kwargs)


def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_finished_run_matches(run_dir: str, cfg: RunConfig, summary: dict) -> None:
  """A finished run is only reused if it is the experiment the flags ask for."""
  done = summary["config"]
  wanted = cfg.to_json()
  changed = []
  for key, value in wanted.items():
    if key in _IGNORED_WHEN_RESUMING or value is None or key not in done:
      continue  # None: resolved by prepare() (delta, z from a target epsilon, ...).
    old = done.get(key)
    if isinstance(value, float) and isinstance(old, (int, float)):
      if not math.isclose(value, old, rel_tol=1e-9, abs_tol=1e-12):
        changed.append(key)
    elif old != value:
      changed.append(key)
  if changed:
    raise UsageError(
        f"{run_dir} holds a finished run with different {', '.join(sorted(changed))}: use "
        "another --output_dir for a different study, or delete that run folder")


def train_and_audit(point: GridPoint, settings: StudySettings) -> str:
  """Trains (or resumes, or skips) one run, then audits it; returns its status.

  "skipped": summary.json and audit.json existed; "audited": only the audit
  was missing; "trained": the run was trained (or resumed) and audited.
  """
  cfg = run_config(point, settings)
  run_dir = settings.run_dir(point)
  summary = _read_json(os.path.join(run_dir, "summary.json"))
  if summary is not None:
    check_finished_run_matches(run_dir, cfg, summary)
    if _audit_is_current(run_dir, settings):
      return "skipped"
  run = trainer.prepare(cfg)
  status = "audited"
  if summary is None:
    trainer.train(run, show_progress=False)
    status = "trained"
  audit.audit_run(run_dir, run.splits, max_examples=settings.audit_max_examples,
                  seed=settings.audit_seed, nonmember_split=settings.audit_nonmembers)
  if not settings.keep_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  return status


def _train_and_audit_in_subprocess(point: GridPoint, settings: StudySettings) -> str:
  logging.set_verbosity(logging.WARNING)
  return train_and_audit(point, settings)


def _audit_is_current(run_dir: str, settings: StudySettings) -> bool:
  """audit.json exists and was made with the study's audit settings."""
  result = audit.load_audit(run_dir)
  return result is not None and (
      result.get("max_examples"), result.get("seed"), result.get("nonmembers")) == (
          settings.audit_max_examples, settings.audit_seed,
          f"{settings.audit_nonmembers} split")


def is_complete(point: GridPoint, settings: StudySettings) -> bool:
  """Trained and audited with the current audit settings (else it is (re)audited)."""
  run_dir = settings.run_dir(point)
  return (os.path.exists(os.path.join(run_dir, "summary.json"))
          and _audit_is_current(run_dir, settings))


def run_grid(points: Sequence[GridPoint], settings: StudySettings, parallel: int = 1,
             show_progress: bool = True,
             run_fn: Callable[[GridPoint, StudySettings], str] = train_and_audit) -> dict:
  """Runs every point not yet complete; returns {point name: status or "failed: ..."}.

  `parallel` > 1 runs that many points at once, each in its own fresh
  process. A run that fails (e.g. diverges) is reported and the others go on.
  """
  statuses = {}
  todo = []
  for p in points:
    summary = _read_json(os.path.join(settings.run_dir(p), "summary.json"))
    if summary is not None:  # Before anything runs: never mix two experiments in one study.
      check_finished_run_matches(settings.run_dir(p), run_config(p, settings), summary)
    if is_complete(p, settings):
      statuses[p.name] = "skipped"
    else:
      todo.append(p)
  bar = tqdm.tqdm(total=len(points), initial=len(points) - len(todo), desc="study",
                  unit="run", disable=not show_progress, file=sys.stderr, dynamic_ncols=True)

  def done(point, status):
    statuses[point.name] = status
    bar.set_postfix_str(f"{point.name}: {status}"[:60], refresh=False)
    bar.update(1)
    if status.startswith("failed"):
      tqdm.tqdm.write(f"warning: {point.name} {status}", file=sys.stderr)

  try:
    if parallel <= 1:
      for p in todo:
        bar.set_postfix_str(f"running {p.name}", refresh=True)
        try:
          done(p, run_fn(p, settings))
        except (trainer.TrainingError, UsageError) as e:
          done(p, f"failed: {type(e).__name__}: {e}")
    else:
      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(max_workers=parallel, mp_context=ctx,
                                                  max_tasks_per_child=1) as pool:
        futures = {pool.submit(_train_and_audit_in_subprocess, p, settings): p for p in todo}
        for future in concurrent.futures.as_completed(futures):
          try:
            done(futures[future], future.result())
          except Exception as e:  # pylint: disable=broad-except
            done(futures[future], f"failed: {type(e).__name__}: {e}")
  finally:
    bar.close()
  return statuses


def collect_rows(points: Sequence[GridPoint], settings: StudySettings) -> list:
  """One results row per finished run (runs without summary.json are left out)."""
  rows = []
  for p in points:
    run_dir = settings.run_dir(p)
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary is None:
      continue
    result = audit.load_audit(run_dir) or {}
    privacy = summary["privacy"]
    rows.append({
        "mode": p.mode,
        "z": summary["config"].get("noise_multiplier") if p.mode != "none" else None,
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
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
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
  os.replace(tmp, path)


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
                     setting: str = "", failed: Optional[dict] = None) -> str:
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
  level_header = "target ε | z" if by_target else "z"
  header = ["mode", level_header, "runs"] + [title for _, title in _TABLE_METRICS]
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
    for metric, _ in _TABLE_METRICS:
      cells.append(_mean_pm_std(g, metric, "eps" if metric == "epsilon" else
                                ".0f" if metric == "wall_seconds" else ".3f"))
    lines.append("| " + " | ".join(cells) + " |")
  if failed:
    lines += ["", "Failed runs (not in the table):", ""]
    lines += [f"- `{name}`: {status}" for name, status in sorted(failed.items())]
  return "\n".join(lines) + "\n"


def training_curves(points: Sequence[GridPoint], settings: StudySettings,
                    curve_level: Optional[float]) -> dict:
  """Val AUC per round (from metrics.csv) of each mode's runs at `curve_level` (and no DP)."""
  curves = collections.OrderedDict()
  for p in points:
    if p.mode != "none" and (curve_level is None or p.level is None
                             or not math.isclose(p.level, curve_level)):
      continue
    path = os.path.join(settings.run_dir(p), "metrics.csv")
    if not os.path.exists(os.path.join(settings.run_dir(p), "summary.json")) or \
        not os.path.exists(path):
      continue
    label = plots.MODE_STYLE[p.mode]["label"] + ("" if p.mode == "none" else f", {p.level_label}")
    curve = {}
    with open(path, newline="") as f:
      for row in csv.DictReader(f):
        if row.get("val_auc") not in (None, ""):
          curve[int(row["round"])] = float(row["val_auc"])
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


def write_outputs(points: Sequence[GridPoint], settings: StudySettings, command: str,
                  commit: str, curve_level: Optional[float], setting: str = "",
                  failed: Optional[dict] = None) -> list:
  """Writes results.csv, results.md and both figures to settings.output_dir; returns the rows."""
  os.makedirs(settings.output_dir, exist_ok=True)
  rows = collect_rows(points, settings)
  out = settings.output_dir
  write_csv(rows, os.path.join(out, RESULTS_CSV))
  with open(os.path.join(out, RESULTS_MD), "w") as f:
    f.write(results_markdown(rows, command, commit, setting, failed))
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


def describe_setting(base: dict, settings: StudySettings) -> str:
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
          + ("Runs are seeded (splits, sampling, init, local-DP noise; central noise never is): "
             "reproducible, and the trainer's warning applies that seeded local noise is not "
             "private in deployment; its distribution, hence utility and accounted ε, is the same."
             if settings.seeded else "Runs are unseeded; the seed only names a replicate."))


# ---------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
  d = RunConfig()
  f = flags
  f.DEFINE_string("dataset", d.dataset, "Dataset spec, as for tff_dpmed.train.")
  f.DEFINE_enum("image_size", str(d.image_size), ["28", "64", "128", "224"], "Image side.")
  f.DEFINE_string("data_dir", None, "Folder of dataset files (default: $TFF_DPMED_DATA_DIR, "
                  "else the user cache).")
  f.DEFINE_integer("num_clients", d.num_clients, "Simulated institutions (privacy units).")
  f.DEFINE_enum("partition", d.partition, ["iid", "dirichlet"], "Client split.")
  f.DEFINE_integer("clients_per_round", 10, "Expected clients per round.")
  f.DEFINE_enum("sampling", d.sampling, ["poisson", "fixed", "all"], "Client sampling.")
  f.DEFINE_integer("rounds", 12, "Federated rounds per run.")
  f.DEFINE_string("model", d.model, "cnn, gap_cnn or resnet18 (tff_dpmed.models).")
  f.DEFINE_integer("client_batch_size", 32, "Local batch size.")
  f.DEFINE_float("client_learning_rate", d.client_learning_rate, "Client SGD learning rate.")
  f.DEFINE_integer("rounds_per_eval", 2, "Val evaluation (and training-curve point) every N "
                   "rounds.")
  f.DEFINE_list("modes", list(MODES), "DP modes to run: none, central, local.")
  f.DEFINE_list("noise_multipliers", ["0.1", "0.2", "0.3", "0.5", "1.0"],
                "Noise multipliers z of the DP runs (at least 5 for the study).")
  f.DEFINE_list("target_epsilons", None, "Instead of --noise_multipliers: the epsilons to "
                "calibrate z to (per mode: local DP needs much more noise).")
  f.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (at least 3 for the study): splits, "
                "sampling, init and local noise. Central DP noise is never seeded.")
  f.DEFINE_bool("seeded", True, "Pass each seed to the runs (reproducible; the trainer warns "
                "that seeded local-DP noise is not private in deployment, though its "
                "distribution, and so utility and accounted epsilon, are the same). False: "
                "unseeded runs, the seed only names a replicate.")
  f.DEFINE_float("clip", 0.1, "Fixed clip norm of local DP (and of central DP with "
                 "--central_clip_mode=fixed). Local DP's signal-to-noise ratio does not depend "
                 "on it, but its noise magnitude (zC per coordinate) does: at C=1 the small CNN's "
                 "weights blow up within a few rounds.")
  f.DEFINE_enum("central_clip_mode", "adaptive", ["adaptive", "fixed"],
                "Central DP clipping; local DP always clips at the fixed --clip.")
  f.DEFINE_float("central_clip", d.clip, "Initial clip norm of central adaptive clipping.")
  f.DEFINE_float("curve_noise_multiplier", None, "The z of training_curves.png (one of "
                 "--noise_multipliers; default: the middle one).")
  f.DEFINE_float("curve_target_epsilon", None, "With --target_epsilons: the value for "
                 "training_curves.png (default: the middle one).")
  f.DEFINE_integer("audit_max_examples", 2000, "Members and non-members per audit (at most).")
  f.DEFINE_integer("audit_seed", 0, "Seed of the audit's subsampling and attacks.")
  f.DEFINE_enum("audit_nonmembers", "test", list(audit.NONMEMBER_SPLITS), "The audit's "
                "non-members. test: never touched by training, but shifted from train on "
                "some datasets (PneumoniaMNIST), which the attacks pick up as 'membership'; "
                "val: same source as train, used only to pick the best round.")
  f.DEFINE_string("output_dir", "runs/privacy_utility", "Study folder: runs/ and results.")
  f.DEFINE_integer("parallel", 1, "Runs at once. 1: one after another in this process; N > 1: "
                   "N fresh processes (each run uses ~1 core; mind the machine's cores).")
  f.DEFINE_bool("keep_checkpoints", False, "Keep each finished run's checkpoints/ (not "
                "needed to resume the study: finished runs are skipped).")
  f.DEFINE_bool("results_only", False, "Only (re)write results and figures from the runs "
                "that exist; train nothing.")
  f.DEFINE_bool("progress", True, "Show a progress bar over the grid.")


def _floats(name: str, values: Optional[Iterable[str]]) -> list:
  try:
    return [float(v) for v in values or []]
  except ValueError:
    raise UsageError(f"--{name}={','.join(values)} must be a comma-separated list of numbers")


def _ints(name: str, values: Iterable[str]) -> list:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--{name}={','.join(values)} must be a comma-separated list of integers")


def _middle(values: Sequence[float]) -> Optional[float]:
  return sorted(values)[len(values) // 2] if values else None


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}: all options are --flags")
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  z_values = _floats("noise_multipliers", FLAGS.noise_multipliers)
  eps_values = _floats("target_epsilons", FLAGS.target_epsilons)
  if eps_values and FLAGS["noise_multipliers"].present:
    raise UsageError("--noise_multipliers and --target_epsilons are alternatives: give only one")
  if eps_values:
    z_values = []
  points = make_grid(FLAGS.modes, _ints("seeds", FLAGS.seeds), z_values, eps_values)
  levels = eps_values or z_values
  curve_flag = "curve_target_epsilon" if eps_values else "curve_noise_multiplier"
  curve_level = getattr(FLAGS, curve_flag)
  if curve_level is None:
    curve_level = _middle(levels)
  elif not any(math.isclose(curve_level, v) for v in levels):
    raise UsageError(f"--{curve_flag}={curve_level:g} is not in the grid "
                     f"({', '.join(f'{v:g}' for v in levels)})")
  if FLAGS.parallel < 1:
    raise UsageError(f"--parallel={FLAGS.parallel} must be >= 1")
  base = dict(dataset=FLAGS.dataset, image_size=int(FLAGS.image_size), data_dir=FLAGS.data_dir,
              num_clients=FLAGS.num_clients, partition=FLAGS.partition,
              clients_per_round=FLAGS.clients_per_round, sampling=FLAGS.sampling,
              rounds=FLAGS.rounds, model=FLAGS.model, client_batch_size=FLAGS.client_batch_size,
              client_learning_rate=FLAGS.client_learning_rate,
              rounds_per_eval=FLAGS.rounds_per_eval)
  settings = StudySettings(base=base, output_dir=FLAGS.output_dir, clip=FLAGS.clip,
                           central_clip_mode=FLAGS.central_clip_mode,
                           central_clip=FLAGS.central_clip,
                           audit_max_examples=FLAGS.audit_max_examples,
                           audit_seed=FLAGS.audit_seed,
                           audit_nonmembers=FLAGS.audit_nonmembers,
                           keep_checkpoints=FLAGS.keep_checkpoints,
                           seeded=FLAGS.seeded)
  for p in points:  # Every config is checked before anything runs.
    run_config(p, settings).validate()
  if len(levels) < 5 or len(points) and len({p.seed for p in points}) < 3:
    print(f"note: {len(levels)} grid values and {len({p.seed for p in points})} seeds: the "
          "study wants at least 5 and 3", file=sys.stderr)
  command = "python -m experiments.privacy_utility " + shlex.join(argv_for_record())
  statuses = {}
  if not FLAGS.results_only:
    todo = [p for p in points if not is_complete(p, settings)]
    if todo:  # Bad data or output flags end here, before the grid starts.
      trainer.prepare(run_config(todo[0], settings))
    t0 = time.time()
    statuses = run_grid(points, settings, parallel=FLAGS.parallel, show_progress=FLAGS.progress)
    counts = collections.Counter(s.split(":")[0] for s in statuses.values())
    print(f"grid of {len(points)} runs done in {time.time() - t0:.0f}s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=sys.stderr)
  failed = {k: v for k, v in statuses.items() if v.startswith("failed")}
  repo_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = write_outputs(points, settings, command, git_commit(repo_dir), curve_level,
                       describe_setting(base, settings), failed)
  print(f"{len(rows)} of {len(points)} runs in {os.path.join(settings.output_dir, RESULTS_CSV)}; "
        f"table {RESULTS_MD}, figures {PRIVACY_UTILITY_PNG} and {TRAINING_CURVES_PNG}")
  if failed:
    sys.exit(1)


def argv_for_record() -> list:
  return sys.argv[1:]


def run():
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
