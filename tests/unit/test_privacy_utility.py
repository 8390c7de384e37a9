"""The privacy-utility study's grid, resume logic, table and figures, on fake runs.

No training here: finished runs are faked as the trainer and the audit leave
them (summary.json, audit.json, metrics.csv). A real grid is minutes of TFF
compiling per run; experiments/README.md records a by-hand tiny grid.
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from experiments import grid
from experiments import report
from experiments import runner
from tff_dpmed.errors import UsageError
from tff_dpmed.program import run_dir as run_dir_lib
from tff_dpmed.program.metrics_log import COLUMNS as METRICS_COLUMNS
from tests.e2e import test_train_bad_inputs as bad_inputs
from tests.conftest import REPO_ROOT


def _settings(tmp_path, **base):
  b = dict(dataset="breastmnist", image_size=28, num_clients=6, partition="iid",
           clients_per_round=3, sampling="poisson", rounds=4, model="cnn",
           client_batch_size=32, client_learning_rate=0.05, rounds_per_eval=2)
  b.update(base)
  return grid.StudySettings(base=b, output_dir=str(tmp_path / "study"))


def _fake_finished_run(point, settings, *, test_auc, epsilon=None, mia_auc=0.55,
                       rounds=4, audit=True, canary=None):
  """What trainer.train and audit.audit_run leave in a run folder."""
  cfg = grid.run_config(point, settings)
  run_dir = settings.run_dir(point)
  os.makedirs(run_dir, exist_ok=True)
  config = cfg.to_json()
  if point.target_epsilon is not None:
    config["noise_multiplier"] = 0.9  # What prepare() calibrated.
  summary = {"config": config, "test_accuracy": test_auc - 0.1, "test_auc": test_auc,
             "wall_seconds": 40.0,
             "privacy": {"dp_mode": point.mode, "epsilon": epsilon,
                         "delta": None if point.mode == "none" else config["delta"]}}
  if canary is not None:  # What --audit=canary leaves in summary.json.
    summary["audit"] = canary
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f)
  if audit:
    with open(os.path.join(run_dir, "audit.json"), "w") as f:
      json.dump({"attack_auc": mia_auc, "attacker_advantage": 2 * (mia_auc - 0.5),
                 "attacks": {}, "max_examples": settings.audit_max_examples,
                 "seed": settings.audit_seed,
                 "nonmembers": f"{settings.audit_nonmembers} split"}, f)
  with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
    # The trainer's columns; DP runs leave the train metrics (not covered by epsilon) empty.
    w = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
    w.writeheader()
    for r in range(1, rounds + 1):
      row = {"round": r, "val_auc": f"{test_auc * r / rounds:.4f}" if r % 2 == 0 else ""}
      if point.mode == "none":
        row.update(train_loss=0.5, train_accuracy=0.7, clients=3, round_seconds=1.0)
      w.writerow(row)
  return run_dir


# Synthetic results: 3 seeds; test AUC seed-dependent so mean and std are known.
_AUC = {"none": 0.90, "central": {0.5: 0.85, 1.0: 0.80}, "local": {0.5: 0.60, 1.0: 0.55}}
_EPS = {"central": {0.5: 20.0, 1.0: 5.0}, "local": {0.5: 400.0, 1.0: 90.0}}


def _fake_study(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(grid.MODES, [0, 1, 2], [0.5, 1.0])
  for p in points:
    base = _AUC["none"] if p.mode == "none" else _AUC[p.mode][p.noise_multiplier]
    eps = None if p.mode == "none" else _EPS[p.mode][p.noise_multiplier] * (1 + 0.01 * p.seed)
    _fake_finished_run(p, settings, test_auc=base + 0.01 * (p.seed - 1), epsilon=eps,
                       mia_auc=0.5 + 0.02 * p.seed)
  return points, settings


def test_grid_runs_no_dp_once_per_seed_and_names_folders():
  points = grid.make_grid(["none", "central", "local"], [0, 1, 2], [0.5, 1.0, 2.0])
  assert len(points) == 3 + 2 * 3 * 3
  assert [p.name for p in points if p.mode == "none"] == ["none_s0", "none_s1", "none_s2"]
  assert "central_z0.5_s1" in {p.name for p in points}
  assert "local_z2_s2" in {p.name for p in points}
  assert len({p.name for p in points}) == len(points)
  by_eps = grid.make_grid(["central"], [0], target_epsilons=[4.0])
  assert [p.name for p in by_eps] == ["central_eps4_s0"]
  for bad in (dict(modes=["nope"], seeds=[0], noise_multipliers=[1.0]),
              dict(modes=["central"], seeds=[0]),
              dict(modes=["central"], seeds=[0], noise_multipliers=[1.0], target_epsilons=[2.0]),
              dict(modes=["central"], seeds=[0, 0], noise_multipliers=[1.0]),
              dict(modes=["central"], seeds=[0], noise_multipliers=[0.0]),
              dict(modes=["none"], seeds=[-1]),
              dict(modes=["none"], seeds=[0, 2**32])):
    with pytest.raises(UsageError):
      grid.make_grid(**bad)
  assert len(grid.make_grid(["none"], [0, 2**32 - 1])) == 2


def test_bad_seeds_are_one_error_line_and_exit_2(tmp_path):
  """Issue 17: a negative or too large --seeds is a usage error, not a traceback."""
  for seeds in ("-1,0", "4294967296"):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.privacy_utility", f"--seeds={seeds}",
         f"--output_dir={tmp_path / 'study'}", "--noprogress"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    lines = bad_inputs._message_lines(proc.stderr)  # pylint: disable=protected-access
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --seeds: "), proc.stderr
    assert not (tmp_path / "study").exists()


def test_run_configs_clip_the_way_each_mode_needs(tmp_path):
  settings = _settings(tmp_path)
  local = grid.run_config(grid.GridPoint("local", 1, noise_multiplier=2.0), settings)
  assert (local.dp.clip_mode, local.dp.clip, local.dp.noise_multiplier, local.seed) == (
      "fixed", settings.clip, 2.0, 1)
  central = grid.run_config(grid.GridPoint("central", 0, noise_multiplier=1.0), settings)
  assert (central.dp.clip_mode, central.dp.clip) == ("adaptive", settings.central_clip)
  none = grid.run_config(grid.GridPoint("none", 0), settings)
  assert none.dp.noise_multiplier == 0 and none.dp.mode == "none"
  for cfg in (local, central, none):
    assert cfg.run_dir.startswith(settings.runs_dir)
    assert (cfg.num_clients, cfg.clients_per_round, cfg.rounds) == (6, 3, 4)
  # DP cohorts are unseeded (epsilon keeps its amplification); the baseline's follow the seed.
  assert not local.dp.reproducible_sampling and not central.dp.reproducible_sampling
  assert run_dir_lib.sampling_seed(local) is None and run_dir_lib.sampling_seed(central) is None
  assert run_dir_lib.sampling_seed(none) == 0
  fixed = dataclasses.replace(settings, central_clip_mode="fixed", clip=0.5)
  central = grid.run_config(grid.GridPoint("central", 0, noise_multiplier=1.0), fixed)
  assert (central.dp.clip_mode, central.dp.clip) == ("fixed", 0.5)
  unseeded = grid.run_config(grid.GridPoint("local", 3, noise_multiplier=1.0),
                             dataclasses.replace(settings, seeded=False))
  assert unseeded.seed is None
  by_eps = grid.run_config(grid.GridPoint("central", 0, target_epsilon=4.0), settings)
  assert by_eps.target_epsilon == 4.0 and by_eps.dp.noise_multiplier is None


def test_the_study_composes_its_dp_runs_in_one_budget_ledger(tmp_path):
  settings = _settings(tmp_path)
  central = grid.run_config(grid.GridPoint("central", 0, noise_multiplier=1.0), settings)
  local = grid.run_config(grid.GridPoint("local", 1, noise_multiplier=2.0), settings)
  none = grid.run_config(grid.GridPoint("none", 0), settings)
  assert central.budget_ledger == local.budget_ledger == settings.budget_ledger
  assert none.budget_ledger is None
  assert report.study_budget_line(settings) == ""  # Nothing recorded yet.
  os.makedirs(settings.output_dir)  # As run_grid does before the first run.
  from tff_dpmed.privacy.budget import BudgetLedger  # pylint: disable=g-import-not-at-top
  BudgetLedger(settings.budget_ledger).record("a", central.dp, 4, central.run_dir)
  BudgetLedger(settings.budget_ledger).record("b", central.dp, 4, "other")
  line = report.study_budget_line(settings)
  total = BudgetLedger(settings.budget_ledger).total()
  assert f"ε = {total.epsilon:.4g}" in line and "2 runs" in line


def test_results_table_has_mean_and_std_per_mode_and_z(tmp_path):
  points, settings = _fake_study(tmp_path)
  rows = report.write_outputs(points, settings, "python -m experiments.privacy_utility --x=1",
                          "abc123", curve_level=1.0, setting="breastmnist test")
  assert len(rows) == len(points)
  out = settings.output_dir
  with open(os.path.join(out, report.RESULTS_CSV)) as f:
    csv_rows = list(csv.DictReader(f))
  assert tuple(csv_rows[0].keys()) == report.CSV_COLUMNS
  assert len(csv_rows) == 15
  none_row = next(r for r in csv_rows if r["run"] == "none_s0")
  assert none_row["epsilon"] == "" and none_row["z"] == ""
  md = open(os.path.join(out, report.RESULTS_MD)).read()
  assert md.index("python -m experiments.privacy_utility --x=1") < md.index("| mode")
  assert "abc123" in md
  lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
           for line in md.splitlines() if line.startswith("| ")}
  # AUCs over seeds 0,1,2 are base-0.01, base, base+0.01: std exactly 0.010.
  assert "0.800 ± 0.010" in lines[("central", "1")]
  assert "0.850 ± 0.010" in lines[("central", "0.5")]
  assert "0.550 ± 0.010" in lines[("local", "1")]
  assert "0.900 ± 0.010" in lines[("none", "–")] and "∞" in lines[("none", "–")]
  # MIA AUC 0.50, 0.52, 0.54; epsilon 5, 5.05, 5.1.
  assert "0.520 ± 0.020" in lines[("central", "1")]
  assert "5.05 ± 0.05" in lines[("central", "1")]
  assert "| 3 |" in lines[("local", "0.5")]


def test_single_seed_shows_no_std(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(["central"], [0], [1.0])
  _fake_finished_run(points[0], settings, test_auc=0.8, epsilon=3.0)
  md = report.results_markdown(report.collect_rows(points, settings), "cmd", "c0")
  assert "0.800 ± –" in md


def test_figures_are_written(tmp_path):
  points, settings = _fake_study(tmp_path)
  report.write_outputs(points, settings, "cmd", "c0", curve_level=0.5)
  for name in (report.PRIVACY_UTILITY_PNG, report.TRAINING_CURVES_PNG):
    path = os.path.join(settings.output_dir, name)
    with open(path, "rb") as f:
      head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000  # Axes, lines and labels, not an empty canvas.
  curves = report.training_curves(points, settings, 0.5)
  assert set(curves) == {"no DP", "central DP, z=0.5", "local DP, z=0.5"}
  assert len(curves["central DP, z=0.5"]["runs"]) == 3
  assert sorted(curves["no DP"]["runs"][0]) == [2, 4]  # Only rounds with a val AUC.


def test_resume_skips_finished_runs_and_only_audits_unaudited_ones(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(grid.MODES, [0], [0.5, 1.0])
  done = {p.name for p in points[:2]}
  for p in points[:2]:
    _fake_finished_run(p, settings, test_auc=0.8, epsilon=None if p.mode == "none" else 3.0)
  unaudited = points[2]
  _fake_finished_run(unaudited, settings, test_auc=0.8, epsilon=3.0, audit=False)
  calls = []

  def fake_run(point, s):
    calls.append(point.name)
    _fake_finished_run(point, s, test_auc=0.7, epsilon=1.0)
    return "trained"

  statuses = runner.run_grid(points, settings, show_progress=False, run_fn=fake_run)
  assert set(calls) == {p.name for p in points} - done
  assert unaudited.name in calls  # Finished but unaudited: handed on (to be audited).
  assert all(statuses[name] == "skipped" for name in done)
  assert len(report.collect_rows(points, settings)) == len(points)
  # A second pass has nothing left to do.
  calls.clear()
  statuses = runner.run_grid(points, settings, show_progress=False, run_fn=fake_run)
  assert calls == [] and set(statuses.values()) == {"skipped"}
  # Other audit settings: every run is handed on again (to be re-audited, not retrained).
  other = dataclasses.replace(settings, audit_nonmembers="val")
  runner.run_grid(points, other, show_progress=False, run_fn=fake_run)
  assert set(calls) == {p.name for p in points}


def test_train_and_audit_audits_a_finished_run_without_retraining(tmp_path, monkeypatch):
  settings = _settings(tmp_path)
  point = grid.GridPoint("central", 0, noise_multiplier=1.0)
  _fake_finished_run(point, settings, test_auc=0.8, epsilon=3.0, audit=False)
  calls = []
  monkeypatch.setattr(runner.trainer, "prepare", lambda cfg: calls.append("prepare") or
                      type("Run", (), {"splits": "splits"})())
  monkeypatch.setattr(runner.trainer, "train", lambda *a, **k: calls.append("train"))
  monkeypatch.setattr(runner.audit, "audit_run", lambda run_dir, splits, **k: calls.append(
      ("audit", run_dir, splits)))
  assert runner.train_and_audit(point, settings) == "audited"
  assert calls == ["prepare", ("audit", settings.run_dir(point), "splits")]


def test_a_finished_run_of_another_experiment_is_not_reused(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(["none"], [0])
  _fake_finished_run(points[0], settings, test_auc=0.8)
  longer = _settings(tmp_path, rounds=8)
  with pytest.raises(UsageError, match="different rounds"):
    runner.run_grid(points, longer, show_progress=False, run_fn=lambda p, s: "trained")


def _reused(points, settings) -> bool:
  """run_grid on fake finished runs: True if they are reused, False if the study stops."""
  try:
    runner.run_grid(points, settings, show_progress=False, run_fn=lambda p, s: "trained")
  except UsageError:
    return False
  return True


def test_finished_runs_are_reused_by_the_trainers_resume_rule(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(["central", "local"], [0], target_epsilons=[4.0])
  for p in points:
    _fake_finished_run(p, settings, test_auc=0.8, epsilon=3.9)
  assert _reused(points, settings)  # Its calibrated z is taken for the target's.
  # Not in run_dir.RESUME_KEYS nor privacy: where the data is, how often to evaluate.
  assert _reused(points, _settings(tmp_path, data_dir="/elsewhere", rounds_per_eval=1))
  # A resume key of the trainer.
  assert not _reused(points, _settings(tmp_path, client_batch_size=16))
  # The privacy (the DPSpec): sampling, delta, clipping, and the target z is calibrated to.
  assert not _reused(points, _settings(tmp_path, sampling="fixed"))
  assert not _reused(points, _settings(tmp_path, delta=1e-6))
  assert not _reused(points, dataclasses.replace(settings, clip=0.5))  # Local DP's clip.
  for p in points:
    path = os.path.join(settings.run_dir(p), "summary.json")
    with open(path) as f:
      summary = json.load(f)
    summary["config"]["target_epsilon"] = 2.0
    with open(path, "w") as f:
      json.dump(summary, f)
  with pytest.raises(UsageError, match="different target_epsilon"):
    runner.check_finished_run_matches(settings.run_dir(points[0]),
                                      grid.run_config(points[0], settings),
                                      runner.read_summary(settings.run_dir(points[0])))


def test_failed_runs_are_reported_and_the_grid_goes_on(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(["central"], [0], [0.5, 1.0])

  def flaky(point, s):
    if point.noise_multiplier == 0.5:
      raise runner.trainer.TrainingError("non-finite loss")
    _fake_finished_run(point, s, test_auc=0.7, epsilon=1.0)
    return "trained"

  statuses = runner.run_grid(points, settings, show_progress=False, run_fn=flaky)
  assert statuses["central_z0.5_s0"].startswith("failed: TrainingError: non-finite")
  assert statuses["central_z1_s0"] == "trained"
  md = report.results_markdown(report.collect_rows(points, settings), "cmd", "c0",
                           failed={k: v for k, v in statuses.items() if v.startswith("failed")})
  assert "central_z0.5_s0" in md.split("Failed runs")[1]


def test_git_commit_is_the_checkouts_head():
  commit = report.git_commit(str(REPO_ROOT))
  assert len(commit.split()[0]) == 40
  assert report.git_commit("/") .startswith("unknown")


def _png_width(path) -> int:
  with open(path, "rb") as f:
    return int.from_bytes(f.read(24)[16:20], "big")  # IHDR width.


def test_canary_twins_report_the_empirical_epsilon_beside_the_theoretical(tmp_path):
  settings = _settings(tmp_path)
  points = grid.make_grid(["none", "central"], [0, 1, 2], [1.0], canary_twins=True)
  plain = [p for p in points if not p.canaries]
  assert [p.twin() for p in plain] == [p for p in points if p.canaries]
  assert {p.name for p in points} >= {"central_z1_s0", "central_z1_s0_canaries"}
  for p in points:
    assert grid.run_config(p, settings).audit == ("canary" if p.canaries else "none")
    # Twins: estimates 0.4, 0.5, 0.6 under DP (theory 5); 80, 90, 100 without noise.
    # The utility differs between a run and its twin: the table takes the run's.
    dp = p.mode == "central"
    estimate = (0.4 if dp else 80) * (1 + p.seed / (4 if dp else 8))
    _fake_finished_run(p, settings, test_auc=0.6 if p.canaries else 0.8,
                       epsilon=5.0 if dp else None, audit=not p.canaries,
                       canary={"epsilon_estimate": estimate,
                               "epsilon_ci": [estimate / 2, estimate * 2],
                               "violation": p.seed == 2 and dp} if p.canaries else None)
  assert all(runner.is_complete(p, settings) for p in points)  # Twins need no MIA audit.
  rows = report.write_outputs(points, settings, "cmd", "c0", curve_level=1.0)
  assert len(rows) == 6 and {r["test_auc"] for r in rows} == {0.8}
  md = open(os.path.join(settings.output_dir, report.RESULTS_MD)).read()
  header = next(line for line in md.splitlines() if line.startswith("| mode"))
  assert "| ε | empirical ε (canary) |" in header
  lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
  assert "| 5 ± 0 | 0.5 ± 0.1 | 0.800 ± 0.000 |" in lines["central"]
  assert "| ∞ (no DP) | 90 ± 10 |" in lines["none"]
  assert "a violation: 1 of 6 twins" in md
  with open(os.path.join(settings.output_dir, report.RESULTS_CSV)) as f:
    by_run = {r["run"]: r for r in csv.DictReader(f)}
  assert set(by_run) == {p.name for p in plain}
  assert float(by_run["central_z1_s1"]["empirical_epsilon"]) == pytest.approx(0.5)
  assert float(by_run["central_z1_s1"]["empirical_epsilon_high"]) == pytest.approx(1.0)
  curves = report.training_curves(points, settings, 1.0)
  assert all(len(c["runs"]) == 3 for c in curves.values())  # Twins are not curves.
  # A third panel (empirical against theoretical epsilon): 18 inches wide, not 12.
  with_canaries = _png_width(os.path.join(settings.output_dir, report.PRIVACY_UTILITY_PNG))
  plain_points, plain_settings = _fake_study(tmp_path / "plain")
  report.write_outputs(plain_points, plain_settings, "cmd", "c0", curve_level=1.0)
  without = _png_width(os.path.join(plain_settings.output_dir, report.PRIVACY_UTILITY_PNG))
  assert with_canaries == pytest.approx(without * 1.5, rel=0.05)
  md = open(os.path.join(plain_settings.output_dir, report.RESULTS_MD)).read()
  assert "empirical ε" not in md


def test_a_run_without_canaries_is_not_reused_as_a_twin(tmp_path):
  settings = _settings(tmp_path)
  point = grid.GridPoint("central", 0, noise_multiplier=1.0)
  run_dir = _fake_finished_run(point, settings, test_auc=0.8, epsilon=5.0)
  summary = runner.read_summary(run_dir)
  with pytest.raises(UsageError, match="canaries"):
    runner.check_finished_run_matches(run_dir, grid.run_config(point.twin(), settings), summary)
  runner.check_finished_run_matches(run_dir, grid.run_config(point, settings), summary)
