"""The recipe runner of the example-level and frontier studies, without training."""

import csv
import json
import os
import sys

import pytest

from experiments import frontier
from experiments import recipes
from experiments.recipes import Recipe


def _recipe(target=3.0, partition="dirichlet"):
  return Recipe("r", "pneumoniamnist", partition, "example", target, ("--rounds=2",))


def test_command_sets_mode_noise_and_split():
  cmd = _recipe().command("/data", "/out/runs", 1)
  assert cmd[1:3] == ["-m", "tff_dpmed.train"]
  for flag in ("--dp_mode=example", "--target_epsilon=3", "--partition=dirichlet",
               "--dirichlet_alpha=0.5", "--rounds=2", "--experiment_name=r_r1",
               "--output_dir=/out/runs", "--data_dir=/data"):
    assert flag in cmd
  plain = _recipe(target=None, partition="iid").command(None, "/o", 0)
  assert "--noise_multiplier=0" in plain and not any("target_epsilon" in f for f in plain)
  assert not any("dirichlet" in f or "data_dir" in f for f in plain)


def _fake_trainer(monkeypatch, script):
  monkeypatch.setattr(Recipe, "command", lambda self, *a: [sys.executable, "-c", script])


def test_unreachable_target_is_a_row_not_a_crash(tmp_path, monkeypatch):
  _fake_trainer(monkeypatch, "print('error: target epsilon 0.5 is not reachable: even "
                "noise_multiplier=1e+04 gives epsilon 9'); raise SystemExit(2)")
  with pytest.raises(recipes.Unreachable, match="0.5 is not reachable"):
    recipes.run_recipe(_recipe(0.5), 0, None, str(tmp_path))
  row = recipes.unreachable_row(_recipe(0.5), "why")
  assert row["epsilon"] == "unreachable" and row["target_epsilon"] == "0.5"


@pytest.mark.parametrize("error", ["--clip must be > 0",
                                   "the TFF worker at unix:/tmp/w.sock is not reachable"])
def test_other_failures_name_the_log(tmp_path, monkeypatch, error):
  _fake_trainer(monkeypatch, f"print('error: {error}'); raise SystemExit(2)")
  with pytest.raises(RuntimeError, match=r"exit 2.*r_r0\.log") as raised:
    recipes.run_recipe(_recipe(), 0, None, str(tmp_path))
  assert not isinstance(raised.value, recipes.Unreachable)


def test_finished_run_is_reused_without_training(tmp_path, monkeypatch):
  _fake_trainer(monkeypatch, "raise SystemExit(1)")  # Would fail if it ran.
  run_dir = tmp_path / "runs" / "r_r0"
  run_dir.mkdir(parents=True)
  (run_dir / "summary.json").write_text(json.dumps({"test_auc": 0.9}))
  assert recipes.run_recipe(_recipe(), 0, None, str(tmp_path)) == {"test_auc": 0.9}


def test_table_has_every_rows_columns(tmp_path):
  rows = [{"recipe": "a", "test_auc": "0.9"}, {"recipe": "b", "epsilon": "unreachable"}]
  recipes.write_table(rows, str(tmp_path), ["# title"])
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    read = list(csv.DictReader(f))
  assert [r["recipe"] for r in read] == ["a", "b"] and read[1]["epsilon"] == "unreachable"
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("# title") and "| recipe | test_auc | epsilon |" in md


def test_frontier_rows_are_distinct_and_each_level_has_its_own_run_name():
  names = [r.name for r in frontier.ROWS]
  assert len(set(names)) == len(names)
  row = frontier.ROWS[0]
  assert row.recipe(0.5).name != row.recipe(None).name
  assert row.recipe(None).target_epsilon is None and row.recipe(2.0).target_epsilon == 2.0


def test_finished_run_reads_summaries_and_refusals_without_training(tmp_path):
  assert recipes.finished_run(_recipe(), 0, str(tmp_path)) is None
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "r_r0.log").write_text(
      "note: ...\nerror: target epsilon 3 is not reachable: even noise_multiplier=1e+04\n")
  with pytest.raises(recipes.Unreachable, match="not reachable"):
    recipes.finished_run(_recipe(), 0, str(tmp_path))
  row = recipes.not_run_row(_recipe(None))
  assert row["epsilon"] == "not run yet" and row["target_epsilon"] == "–"


def test_a_run_stopped_by_a_signal_says_how_to_resume(tmp_path, monkeypatch):
  _fake_trainer(monkeypatch, "raise SystemExit(143)")  # The trainer after SIGTERM.
  with pytest.raises(recipes.Stopped, match="rerun the same command to resume"):
    recipes.run_recipe(_recipe(), 0, None, str(tmp_path))


def test_a_stopped_study_exits_with_one_line():
  def main(argv):
    raise recipes.Stopped("r run 0 was stopped (exit 143): rerun the same command")
  with pytest.raises(SystemExit, match=r"^stopped: r run 0 was stopped"):
    recipes.stop_as_one_line(main)([])


def _audited_summary(theory, estimate, low=None, high=None, violation=False):
  """A summary with a client-level estimate (low/high given) or an example-level bound."""
  audit = ({"epsilon_estimate": estimate, "epsilon_ci": [low, high]} if low is not None else
           {"epsilon_lower_bound": estimate})
  return {"privacy": {"epsilon": theory, "delta": 1e-5, "privacy_unit": "client",
                      "noise_multiplier": 1.0},
          "config": {"model": "cnn", "client_batch_size": 16, "client_learning_rate": 0.05,
                     "clip": 0.1, "rounds": 60},
          "best_val_auc": 0.9, "test_auc": 0.85, "wall_seconds": 80.0,
          "audit": {"theoretical_epsilon": theory, "violation": violation,
                    "num_canaries": 50, **audit}}


def test_canary_rows_report_estimates_intervals_and_violations():
  from experiments import canary_table
  summaries = [_audited_summary(3.0, 0.5, 0.2, 0.9), _audited_summary(3.0, 0.7, 0.3, 1.1),
               _audited_summary(3.0, 4.0, 3.5, 4.6, violation=True)]
  row = canary_table.audit_row(canary_table.recipe_for("client", 3.0), summaries)
  assert row["violations"] == "1 of 3" and row["canaries"] == 50
  assert row["empirical_epsilon"].startswith("1.73 ± ")
  assert row["per_run"].split("; ")[0] == "0.5 [0.2, 0.9]"
  # Without noise the estimate and the interval may be unbounded ("inf" in JSON).
  nodp = canary_table.audit_row(canary_table.recipe_for("client", None),
                                [_audited_summary(None, "inf", 40.0, "inf")])
  assert nodp["empirical_epsilon"] == "inf" and nodp["violations"] == "0 of 1"
  assert canary_table.audit_points([_audited_summary(None, 9.0, 8, 10)])[0]["theoretical"] \
      == float("inf")
  # A one-run lower bound is its own interval's lower end.
  bounds = [_audited_summary(8.0, 0.5), _audited_summary(8.0, 0.3)]
  example = canary_table.audit_row(canary_table.recipe_for("example", 8.0), bounds)
  assert example["audit"] == "lower bound (95%)" and example["per_run"] == "0.5; 0.3"
  assert canary_table.audit_points(bounds)[0]["ci"] == [0.5, float("inf")]
  assert "--num_canaries=300" in canary_table.recipe_for("example", 1.0).flags


def test_canary_estimates_must_rise_with_epsilon_to_count_as_growing():
  from experiments import canary_table
  assert canary_table.grows_with_epsilon([(8.0, [3.0, 3.2]), (1.0, [0.1, 0.3]),
                                          (3.0, [1.0])]) is True
  assert canary_table.grows_with_epsilon([(1.0, [0.0]), (3.0, [0.0]), (8.0, [0.4])]) is True
  assert canary_table.grows_with_epsilon([(1.0, [0.5]), (3.0, [0.4])]) is False
  assert canary_table.grows_with_epsilon([(1.0, [0.0]), (3.0, [0.0])]) is False
  assert canary_table.grows_with_epsilon([(1.0, [0.5])]) is None
