"""Patients as clients: round time and per-client overhead with one image per client.

  python -m benchmarks.bench_patients [--data_dir=...] [--patients_per_round=64,256,512]
      [--repetitions=3] [--patients_rounds_per_rep=3] [--output=benchmarks/RESULTS_PATIENTS.md]

PneumoniaMNIST's 4,708 training images, each its own client
(`--partition=per_example`, batch 1), and the trainer's DP-FedAvg process
otherwise (central DP with fixed clipping, the small CNN), each cohort size
in its own process (benchmarks.child; the first two rounds untimed). Two
ways to run a round: `packed` sends the sampled clients to TFF in packs of
`trainer.PATIENTS_PER_PACK`, each client clipped on its own inside its pack
(`--client_packing`, the trainer's default here), and `one by one` makes
each client its own TFF client. The per-client overhead is the slope of the
median round time against the cohort size (least squares); the intercept
is what a round costs whatever its size. The anchor is Keras `fit` on the
same images (the library's model and loss, batches of 16, as
bench_throughput measures it): the ratio is a round's time over the time
`fit` takes for as many examples. Beside it, a hospital round (100 clients
of 47 images, 10 per round) gives the cost per example at the size TFF's
per-client work is amortised over.
"""

import os
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np
import tqdm

from benchmarks import bench_throughput
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


KINDS = ("packed", "one by one")


def _point(data_dir: Optional[str], num_clients: int, per_round: int, rounds: int,
           packing: Optional[str]) -> dict:
  args = [f"--num_clients={num_clients}", f"--clients_per_round={per_round}",
          f"--rounds={rounds}"] + (["--per_example", f"--client_packing={packing}"]
                                   if packing else [])
  if data_dir:
    args.append(f"--data_dir={data_dir}")
  return spawn.run_child(args)


def run(data_dir: Optional[str], cohorts: Sequence[int], repetitions: int,
        rounds_per_rep: int, show_progress: bool = True) -> dict:
  # Keras first, on the fresh machine, two epochs per repetition (as bench_throughput).
  keras = bench_throughput.keras_fit(data_dir, repetitions, 2, show_progress=show_progress)
  rounds = WARMUP_ROUNDS + repetitions * rounds_per_rep
  grid = [(kind, n) for kind in KINDS for n in cohorts]
  points = [(kind, n, _point(data_dir, PATIENTS, n, rounds,
                             "on" if kind == "packed" else "off"))
            for kind, n in tqdm.tqdm(grid, desc="cohorts", unit="point",
                                     disable=not show_progress, dynamic_ncols=True)]
  points.append(("hospitals", 10, _point(data_dir, 100, 10, rounds, None)))
  return {"repetitions": repetitions, "points": points, "keras": keras}


def _median_round(result: dict) -> float:
  return report.median_range(result["round_s"][WARMUP_ROUNDS:])[0]


def render(raw: dict) -> str:
  keras = raw["keras"]
  keras_per_example = float(np.median(keras["wall_s"])) / keras["examples_per_epoch"]
  rows, fits = [], {}
  for kind, per_round, result in raw["points"]:
    timed = result["round_s"][WARMUP_ROUNDS:]
    examples = float(np.median(result["examples"][WARMUP_ROUNDS:]))
    median = _median_round(result)
    rows.append([kind, str(per_round), f"{examples:.0f}", f"**{report.fmt(timed)}**",
                 f"{1000 * median / per_round:.1f}", f"{1000 * median / examples:.2f}",
                 f"**{median / (examples * keras_per_example):.1f}x**",
                 f"{result['end_of_round_1']:.1f}"])
    if kind in KINDS:
      fits.setdefault(kind, []).append((per_round, median))
  text = report.table(["clients", "per round", "examples per round", "s/round",
                       "ms per client", "ms per example", "ratio to Keras fit",
                       "start to end of round 1, s"], rows)
  text += (f"\n\nKeras `fit`: {report.fmt(keras['wall_s'])} s per epoch of "
           f"{keras['examples_per_epoch']:,} images, {1000 * keras_per_example:.2f} ms per "
           "example.\n")
  for kind, points in fits.items():
    if len(points) >= 2:
      slope, intercept = np.polyfit(*zip(*points), 1)
      text += (f"\nPer-client overhead, {kind} (slope of s/round against clients per round): "
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
