"""Patients as clients: round time and per-client overhead with one image per client.

  python -m benchmarks.bench_patients [--data_dir=...] [--patients_per_round=64,256,512]
      [--repetitions=3] [--patients_rounds_per_rep=3] [--output=benchmarks/RESULTS_PATIENTS.md]

PneumoniaMNIST's 4,708 training images, each its own client
(`--partition=per_example`, batch 1), and the trainer's DP-FedAvg process
otherwise (central DP, the small CNN), each cohort size in its own process
(benchmarks.child; the first two rounds untimed). The per-client overhead is
the slope of the median round time against the cohort size (least squares);
the intercept is what a round costs whatever its size. Beside it, a hospital
round (100 clients of 47 images, 10 per round) gives the cost per example at
the size TFF's per-client work is amortised over.
"""

import os
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np
import tqdm

from benchmarks import common_flags
from benchmarks import report
from benchmarks import spawn

_PER_ROUND = flags.DEFINE_list("patients_per_round", ["64", "256", "512"],
                               "Cohort sizes (clients of one image each).")
_ROUNDS_PER_REP = flags.DEFINE_integer("patients_rounds_per_rep", 3,
                                       "Timed rounds per repetition.")
DEFAULT_OUTPUT = os.path.join(report.REPO, "benchmarks", "RESULTS_PATIENTS.md")
PATIENTS = 4708  # PneumoniaMNIST's training images: one client each.
WARMUP_ROUNDS = 2


def _point(data_dir: Optional[str], num_clients: int, per_round: int, rounds: int,
           per_example: bool) -> dict:
  args = [f"--num_clients={num_clients}", f"--clients_per_round={per_round}",
          f"--rounds={rounds}"] + (["--per_example"] if per_example else [])
  if data_dir:
    args.append(f"--data_dir={data_dir}")
  return spawn.run_child(args)


def run(data_dir: Optional[str], cohorts: Sequence[int], repetitions: int,
        rounds_per_rep: int, show_progress: bool = True) -> dict:
  rounds = WARMUP_ROUNDS + repetitions * rounds_per_rep
  points = [("patients", n, _point(data_dir, PATIENTS, n, rounds, True))
            for n in tqdm.tqdm(cohorts, desc="cohorts", unit="point",
                               disable=not show_progress, dynamic_ncols=True)]
  points.append(("hospitals", 10, _point(data_dir, 100, 10, rounds, False)))
  return {"repetitions": repetitions, "points": points}


def _median_round(result: dict) -> float:
  return report.median_range(result["round_s"][WARMUP_ROUNDS:])[0]


def render(raw: dict) -> str:
  rows, xs, ys = [], [], []
  for kind, per_round, result in raw["points"]:
    timed = result["round_s"][WARMUP_ROUNDS:]
    examples = float(np.median(result["examples"][WARMUP_ROUNDS:]))
    median = _median_round(result)
    rows.append([kind, str(per_round), f"{examples:.0f}", f"**{report.fmt(timed)}**",
                 f"{1000 * median / per_round:.1f}", f"{1000 * median / examples:.2f}",
                 f"{result['end_of_round_1']:.1f}"])
    if kind == "patients":
      xs.append(per_round)
      ys.append(median)
  text = report.table(["clients", "per round", "examples per round", "s/round",
                       "ms per client", "ms per example", "start to end of round 1, s"], rows)
  if len(xs) >= 2:
    slope, intercept = np.polyfit(xs, ys, 1)
    text += (f"\n\nPer-client overhead (slope of s/round against clients per round): "
             f"**{1000 * slope:.1f} ms per one-image client**; fixed cost per round "
             f"{intercept:.2f} s.\n")
  return text


def main(argv):
  del argv
  quick = common_flags.QUICK.value
  cohorts = [16, 32] if quick else [int(c) for c in _PER_ROUND.value]
  reps, per_rep = (1, 1) if quick else (common_flags.REPETITIONS.value, _ROUNDS_PER_REP.value)
  info = report.machine("benchmarks.bench_patients")
  raw = run(common_flags.DATA_DIR.value, cohorts, reps, per_rep)
  text = "\n\n".join(["# Patients as clients: per-client overhead", report.machine_table(info),
                      "\n\n".join(__doc__.strip().split("\n\n")[1:]), render(raw)])
  print(text)
  report.write(common_flags.OUTPUT.value or DEFAULT_OUTPUT, text, {"machine": info, **raw})


if __name__ == "__main__":
  app.run(main)
