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
  # Run again: finished runs are reused, nothing trains (a run log would be rewritten).
  logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.log")}
  again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
  assert again.returncode == 0, again.stderr[-2000:]
  assert {p: p.stat().st_mtime_ns for p in logs} == logs
