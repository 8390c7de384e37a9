"""The frontier study's smoke test: `--quick` trains its tiny grid and writes every output."""

import csv
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_quick_frontier_runs_and_resumes_without_training_again(data_dir, tmp_path):
  cmd = [sys.executable, "-m", "experiments.frontier", "--quick", f"--data_dir={data_dir}",
         f"--output_dir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "results.csv", encoding="utf-8") as f:
    rows = {r["recipe"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"quick_eps3", "quick_nodp"}
  assert abs(float(rows["quick_eps3"]["epsilon"]) - 3.0) < 0.01
  assert rows["quick_eps3"]["privacy_unit"] == "example"
  assert rows["quick_nodp"]["epsilon"] == "inf (no noise)"
  for name in ("results.md", "frontier_breastmnist.png", "curves_breastmnist.png"):
    assert (tmp_path / name).stat().st_size > 0
  # The audit column: the eps-3 level's canary twin (canary examples: a lower bound).
  twin = tmp_path / "runs" / "quick_eps3_canaries_r0" / "summary.json"
  assert "epsilon_lower_bound" in twin.read_text()
  glance = (tmp_path / "results.md").read_text()
  audit_row = next(l for l in glance.splitlines() if l.startswith("| ") and "≥ " in l)
  assert "(`quick`)" in audit_row and "not run yet" not in audit_row
  # Run again: finished runs are reused, nothing trains (a run log would be rewritten).
  logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.log")}
  again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
  assert again.returncode == 0, again.stderr[-2000:]
  assert {p: p.stat().st_mtime_ns for p in logs} == logs
