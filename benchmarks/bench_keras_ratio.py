"""Against Keras `fit`: round time per example at three client sizes, side by side.

  python -m benchmarks.bench_keras_ratio [--data_dir=...] [--repetitions=3]
      [--output=benchmarks/RESULTS_KERAS_RATIO.md]

What a user compares a federated round with is Keras `fit` on the same
examples (the library's model and loss, plain SGD, batches of 16, over
PneumoniaMNIST's 4,708 training images preprocessed by the library;
bench_throughput's anchor). Three tff_dpmed workloads, the trainer's
defaults otherwise (central DP, the small CNN), each in its own process
(benchmarks.child, the first two rounds untimed, then three timed rounds):

  100 clients of about 47 images, all 100 in every round;
  10 hospitals of about 470 images, all 10 in every round;
  500 one-image clients per round of 4,708 (patients as clients,
  `--partition=per_example`, fixed clipping, packed as the trainer packs them).

A repetition is one Keras `fit` measurement (two timed epochs after an
untimed one) followed by one process per workload; the ratio is a round's
median time over the time `fit` took in that repetition for as many
examples as the round trained. Values are medians (min-max) over repetitions.
"""

import os
from typing import Optional

from absl import app
import numpy as np
import tqdm

from benchmarks import bench_throughput
from benchmarks import common_flags
from benchmarks import report
from benchmarks import spawn

DEFAULT_OUTPUT = os.path.join(report.REPO, "benchmarks", "RESULTS_KERAS_RATIO.md")
WARMUP_ROUNDS = 2
ROUNDS_PER_REP = 3
PATIENTS = 4708  # PneumoniaMNIST's training images: one client each.

# (key, description, child arguments, target ratio or None); targets from issue 16.
WORKLOADS = (
    ("clients_100x47", "100 clients of ~47 images, 100 per round",
     ["--num_clients=100", "--clients_per_round=100"], 1.2),
    ("hospitals_10x470", "10 hospitals of ~470 images, 10 per round",
     ["--num_clients=10", "--clients_per_round=10"], None),
    ("patients_500x1", f"500 one-image clients per round of {PATIENTS:,} (packed)",
     [f"--num_clients={PATIENTS}", "--clients_per_round=500", "--per_example",
      "--client_packing=on"], 2.0),
)


def run(data_dir: Optional[str], repetitions: int, rounds_per_rep: int = ROUNDS_PER_REP,
        quick: bool = False, show_progress: bool = True) -> dict:
  reps = []
  workloads = WORKLOADS[:1] if quick else WORKLOADS
  jobs = tqdm.tqdm(total=repetitions * (1 + len(workloads)), desc="keras ratio",
                   unit="process", disable=not show_progress, dynamic_ncols=True)
  for _ in range(repetitions):
    keras = bench_throughput.keras_fit(data_dir, 1, 1 if quick else 2, show_progress=False)
    jobs.update()
    points = {}
    for key, _, args, _ in workloads:
      args = [*args, f"--rounds={WARMUP_ROUNDS + rounds_per_rep}"] + (
          [f"--data_dir={data_dir}"] if data_dir else [])
      points[key] = spawn.run_child(args)
      jobs.update()
    reps.append({"keras": keras, "points": points})
  jobs.close()
  return {"repetitions": reps, "quick": quick}


def ratios(raw: dict) -> dict:
  """Per workload: (ratios, seconds per round, examples per round), one per repetition."""
  out = {}
  for rep in raw["repetitions"]:
    keras = rep["keras"]
    per_example = float(np.median(keras["wall_s"])) / keras["examples_per_epoch"]
    for key, result in rep["points"].items():
      seconds = float(np.median(result["round_s"][WARMUP_ROUNDS:]))
      examples = float(np.median(result["examples"][WARMUP_ROUNDS:]))
      entry = out.setdefault(key, ([], [], []))
      entry[0].append(seconds / (examples * per_example))
      entry[1].append(seconds)
      entry[2].append(examples)
  return out


def verdicts(raw: dict) -> list:
  out = []
  found = ratios(raw)
  for key, description, _, target in WORKLOADS:
    if target is None or key not in found:
      continue
    med = report.median_range(found[key][0])[0]
    met = "met" if med <= target else f"**missed** by {med / target - 1:.0%}"
    out.append(f"- Ratio to Keras `fit`, {description}: {med:.2f}; target <= {target}: {met}.")
  return out


def markdown(raw: dict) -> str:
  found = ratios(raw)
  rows = []
  for key, description, _, target in WORKLOADS:
    if key not in found:
      continue
    ratio, seconds, examples = found[key]
    rows.append([description, f"{np.median(examples):.0f}", report.fmt(seconds),
                 f"**{report.fmt(ratio)}**", "–" if target is None else f"<= {target}"])
  keras = [float(np.median(r["keras"]["wall_s"])) for r in raw["repetitions"]]
  rows.append(["Keras `fit`, one epoch", f"{raw['repetitions'][0]['keras']['examples_per_epoch']:,}",
               report.fmt(keras), "1", ""])
  return report.table(["workload", "examples per round", "s per round", "ratio to Keras fit",
                       "target"], rows)


def main(argv):
  del argv
  quick = common_flags.QUICK.value
  info = report.machine("benchmarks.bench_keras_ratio")
  raw = run(common_flags.DATA_DIR.value, 1 if quick else common_flags.REPETITIONS.value,
            1 if quick else ROUNDS_PER_REP, quick=quick)
  text = "\n\n".join(["# Against Keras fit", report.machine_table(info),
                      "\n\n".join(__doc__.strip().split("\n\n")[1:]), markdown(raw),
                      "\n".join(verdicts(raw))])
  print(text)
  report.write(common_flags.OUTPUT.value or DEFAULT_OUTPUT, text, {"machine": info, **raw})


if __name__ == "__main__":
  app.run(main)
