"""A/B runs of the cheap levers on tff_dpmed's round: each variant in fresh processes.

  python -m benchmarks.bench_levers [--data_dir=...] [--repetitions=3]
      [--lever_clients_per_round=100] [--lever_rounds=6] [--protobuf_overlay=DIR]

Variants (benchmarks.child flags; the baseline is what the trainer does):
  baseline              dataset computation composed in, the library's client
                        loop (DATASET_ITERATOR), weights read from the returned state,
                        no concurrency limit
  loop=DATASET_REDUCE   TFF's default client loop (the library's until this
                        benchmark showed it costs more)
  max_concurrent=N      the worker runs at most N client computations at once
                        (N = usable cores)
  get_model_weights     new weights by get_model_weights, a second computation
                        (the trainer reads them from the returned state)
  per-round datasets    no dataset computation: each round passes the cohort's
                        datasets, built in Python (TFF serialises each one)
  protobuf overlay      only with --protobuf_overlay=DIR: DIR (a `pip install
                        --target` of a protobuf with the upb backend) is put
                        first on PYTHONPATH

Repetitions are interleaved (every variant once, then again) so drift of a
shared machine spreads over all variants. Steady values are medians over
rounds 3..N of each process; CPU is the process plus its worker.
"""

import os
from typing import Optional

from absl import app
from absl import flags
import tqdm

from benchmarks import common_flags
from benchmarks import procstats
from benchmarks import report
from benchmarks import spawn

_PER_ROUND = flags.DEFINE_integer("lever_clients_per_round", 100, "Cohort (of 100 clients).")
_ROUNDS = flags.DEFINE_integer("lever_rounds", 6, "Rounds per process, the first two untimed.")
_OVERLAY = flags.DEFINE_string("protobuf_overlay", None, "A folder holding a faster protobuf "
                               "(pip install --target DIR protobuf==4.25.*), tried as a lever.")


def variants(overlay: Optional[str]) -> list:
  """(name, child flags, extra environment)."""
  out = [
      ("baseline (the trainer's way)", [], {}),
      ("loop=DATASET_REDUCE (TFF's default)", ["--loop=DATASET_REDUCE"], {}),
      (f"max_concurrent_computation_calls={procstats.usable_cores()}",
       [f"--max_concurrent_computation_calls={procstats.usable_cores()}"], {}),
      ("weights by get_model_weights", ["--noweights_from_state"], {}),
      ("per-round datasets (no dataset computation)", ["--nocompose"], {}),
  ]
  if overlay:
    path = os.pathsep.join(p for p in (overlay, os.environ.get("PYTHONPATH")) if p)
    out.append((f"protobuf from {overlay}", [], {"PYTHONPATH": path}))
  return out


def run(data_dir: Optional[str], repetitions: int, clients_per_round: int, rounds: int,
        overlay: Optional[str] = None, show_progress: bool = True) -> dict:
  base = [f"--clients_per_round={clients_per_round}", f"--rounds={rounds}"]
  if data_dir:
    base.append(f"--data_dir={data_dir}")
  results = {name: [] for name, _, _ in variants(overlay)}
  jobs = [v for _ in range(repetitions) for v in variants(overlay)]
  for name, args, env in tqdm.tqdm(jobs, desc="levers (fresh processes)", unit="process",
                                   disable=not show_progress, dynamic_ncols=True):
    results[name].append(spawn.run_child(base + args, env={**os.environ, **env}))
  return results


def markdown(results: dict) -> str:
  rows = []
  base_cpu = None
  for name, runs in results.items():
    wall = [report.median_range(r["round_s"][2:])[0] for r in runs]
    cpu = [report.median_range(r["round_cpu_s"][2:])[0] for r in runs]
    first = [r["end_of_round_1"] for r in runs]
    rss = [(r["peak_rss_bytes"]["main"] + r["peak_rss_bytes"]["worker"]) / 2**30 for r in runs]
    if base_cpu is None:
      base_cpu = report.median_range(cpu)[0]
    rows.append([name, report.fmt(wall), report.fmt(cpu),
                 f"{report.median_range(cpu)[0] / base_cpu:.2f}", report.fmt(first, 1),
                 report.fmt(rss)])
  return report.table(["variant", "s/round", "CPU s/round", "CPU vs baseline",
                       "start to end of round 1, s", "peak RSS GiB"], rows)


def main(argv):
  del argv
  print(markdown(run(common_flags.DATA_DIR.value, common_flags.REPETITIONS.value,
                     _PER_ROUND.value, _ROUNDS.value, _OVERLAY.value)))


if __name__ == "__main__":
  app.run(main)
