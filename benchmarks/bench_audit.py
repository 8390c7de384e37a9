"""What the canary audit costs: a training run with `--audit=canary` against the same without.

  python -m benchmarks.bench_audit [--data_dir=...] [--repetitions=3] [--quick]
      [--output=benchmarks/RESULTS_AUDIT.md]

Each case is one `python -m tff_dpmed.train` command, run as a user runs it
(a new process: import, data, build, rounds, selection, test, export), with
and without `--audit=canary`, alternating, `--repetitions` times; the wall
time is the process's, start to exit. Target (issue 15): the audited run
takes at most 1.3 times as long.

- client: central DP-FedAvg over 100 hospitals, 20 per round (the main
  job's settings, fewer rounds); 50 canary clients join the rounds and the
  audit computes their 50 cosines with the released model (the null of
  never-inserted directions is exact, not sampled).
- example: DP-SGD in 10 hospitals (the IID example-level recipe, fewer
  rounds); 300 gradient canary examples (about 150 in the data) and the
  one-run bound.
"""

import os
import subprocess
import sys
import time
from typing import Optional

from absl import app

from benchmarks import common_flags
from benchmarks import report

TARGET = 1.3
DEFAULT_OUTPUT = os.path.join(report.REPO, "benchmarks", "RESULTS_AUDIT.md")

_EXAMPLE = ("--dp_mode=example", "--num_clients=10", "--clients_per_round=10", "--sampling=all",
            "--clip_mode=fixed", "--model=scatter_linear", "--client_batch_size=128",
            "--client_learning_rate=4", "--server_learning_rate=1.0", "--server_momentum=0",
            "--clip=1", "--noise_multiplier=10", "--num_canaries=300")
CASES = {
    "client": ("--dp_mode=central", "--noise_multiplier=1.1"),
    "example": _EXAMPLE,
}


def _command(case: str, rounds: int, audit: bool, run_dir: str,
             data_dir: Optional[str] = None) -> list:
  flags = [f for f in CASES[case] if audit or not f.startswith("--num_canaries")]
  data = [f"--data_dir={data_dir}"] if data_dir else []
  return [sys.executable, "-m", "tff_dpmed.train", *flags, f"--rounds={rounds}",
          f"--rounds_per_eval={rounds}", "--noprogress", "--restart",
          f"--output_dir={run_dir}", f"--experiment_name={case}_{int(audit)}",
          f"--audit={'canary' if audit else 'none'}", *data]


def _wall(command: list) -> float:
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=report.REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{tail}")
  return time.perf_counter() - start


def measure(rounds: int, repetitions: int, run_dir: str, data_dir: Optional[str]) -> dict:
  """{case: {"plain": [s...], "audited": [s...]}}, runs alternating."""
  raw = {}
  for case in CASES:
    raw[case] = {"plain": [], "audited": []}
    for rep in range(repetitions):
      for audit in (False, True):
        seconds = _wall(_command(case, rounds, audit, run_dir, data_dir))
        raw[case]["audited" if audit else "plain"].append(seconds)
        print(f"{case} {'audited' if audit else 'plain'} run {rep + 1}: {seconds:.1f} s",
              flush=True)
  return raw


def render(raw: dict, rounds: int) -> str:
  rows = []
  for case, times in raw.items():
    plain, audited = (report.median_range(times[k])[0] for k in ("plain", "audited"))
    ratio = audited / plain
    rows.append((case, report.fmt(times["plain"], 1), report.fmt(times["audited"], 1),
                 f"{ratio:.2f}", "met" if ratio <= TARGET else
                 f"missed by {ratio / TARGET - 1:.0%}"))
  return report.table(["case", "without audit (s)", "with --audit=canary (s)",
                       "ratio (medians)", f"target <= {TARGET}"], rows) + (
      f"\n\nWall time of the whole `python -m tff_dpmed.train` process, {rounds} rounds, "
      "median (min-max) over the repetitions.\n")


def main(argv):
  del argv
  rounds, reps = (2, 1) if common_flags.QUICK.value else (20, common_flags.REPETITIONS.value)
  info = report.machine("benchmarks.bench_audit")
  run_dir = os.path.join(report.REPO, "build", "bench_audit")
  raw = measure(rounds, reps, run_dir, common_flags.DATA_DIR.value)
  text = "\n\n".join(["# What the canary audit costs", report.machine_table(info),
                      "\n\n".join(__doc__.strip().split("\n\n")[2:]), render(raw, rounds)])
  print(text)
  report.write(common_flags.OUTPUT.value or DEFAULT_OUTPUT, text,
               {"machine": info, "rounds": rounds, "seconds": raw})


if __name__ == "__main__":
  app.run(main)
