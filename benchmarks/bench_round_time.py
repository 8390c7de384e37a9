"""Steady-state seconds per round: tff_dpmed versus the plain-TF reference.

  python -m benchmarks.bench_round_time [--data_dir=...] [--clients_per_round=10,100]
      [--repetitions=3] [--rounds_per_rep=3]

PneumoniaMNIST split IID over 100 clients; central DP with adaptive clipping,
the default CNN and the trainer's client/server settings (see workload.py).
Per cohort size, one TFF process is built and both contenders run, after
`--warmup_rounds` untimed rounds each (round 1 traces and compiles), in
alternating blocks of `--rounds_per_rep` rounds; a repetition is one block of each,
and its value is the block's median round. Ratio = tff_dpmed / reference
within a repetition. CPU seconds (this process and its TFF worker) are
recorded too: they are far less disturbed by other load than wall time. The
reference trains a round's clients one after another (TF's threads share
each step), tff_dpmed's worker trains them all at once; the CPU ratio leaves
that difference out.
"""

import dataclasses
import os
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
# TensorFlow must be imported before absl parses flags: imported later (inside
# main), Keras's functional models fail to build (Flatten sees a None shape).
import tensorflow as tf  # pylint: disable=unused-import
import tqdm

from benchmarks import common_flags
from benchmarks import procstats
from benchmarks import report
from benchmarks import workload

_CLIENTS_PER_ROUND = flags.DEFINE_list("clients_per_round", ["10", "100"],
                                       "Cohort sizes to time (of 100 clients).")
_ROUNDS = flags.DEFINE_integer("rounds_per_rep", 3, "Timed rounds per block (one block per "
                               "contender per repetition).")
_WARMUP = flags.DEFINE_integer("warmup_rounds", 2, "Untimed rounds per contender first "
                               "(round 1 traces and compiles).")

CONTENDERS = ("tff_dpmed", "reference")


@dataclasses.dataclass
class Rounds:
  """Per-round measurements of one contender at one cohort size."""
  contender: str
  clients_per_round: int
  first_round_s: float = 0.0
  # One list per repetition, one value per timed round.
  wall_s: list = dataclasses.field(default_factory=list)
  cpu_s: list = dataclasses.field(default_factory=list)
  examples: list = dataclasses.field(default_factory=list)

  def rep_medians(self, what: str = "wall_s") -> list:
    return [report.median_range(block)[0] for block in getattr(self, what)]

  def examples_per_round(self) -> float:
    return report.median_range([e for block in self.examples for e in block])[0]


def measure(work: workload.Workload, rounds: int, repetitions: int, warmup_rounds: int = 2,
            contenders: Sequence[str] = CONTENDERS, show_progress: bool = True,
            runners: Optional[dict] = None) -> dict:
  """Times `contenders` on `work`; needs a TFF runtime (context.local_runtime) for tff_dpmed.

  runners: already built contenders by name (workload.TffContender,
  workload.ReferenceContender);
  the others are built here. Returns {contender: Rounds}.
  """
  cfg = work.run.config
  k = cfg.clients_per_round
  cohorts = workload.cohorts(cfg.num_clients, k, warmup_rounds + rounds * repetitions)
  builders = {"tff_dpmed": workload.TffContender, "reference": workload.ReferenceContender}
  results, runners = {}, dict(runners or {})
  total = len(contenders) * (warmup_rounds + rounds * repetitions)
  with tqdm.tqdm(total=total, desc=f"round time, {k} clients/round", unit="round",
                 disable=not show_progress, dynamic_ncols=True) as bar:
    for name in contenders:
      if name not in runners:
        runners[name] = builders[name](work)
      results[name] = Rounds(name, k)
      for i in range(warmup_rounds):
        start = time.perf_counter()
        runners[name].round(cohorts[i])
        if i == 0:
          results[name].first_round_s = time.perf_counter() - start
        bar.update(1)
    for rep in range(repetitions):
      # Alternate who goes first, so slow drift of the machine favours neither.
      order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
      pids = [os.getpid(), *procstats.child_worker_pids()]
      for name in order:
        walls, cpus, examples = [], [], []
        for i in range(rounds):
          participants = cohorts[warmup_rounds + rep * rounds + i]
          cpu0 = procstats.total_cpu_seconds(pids)
          start = time.perf_counter()
          examples.append(runners[name].round(participants))
          walls.append(time.perf_counter() - start)
          cpus.append(procstats.total_cpu_seconds(pids) - cpu0)
          bar.update(1)
        results[name].wall_s.append(walls)
        results[name].cpu_s.append(cpus)
        results[name].examples.append(examples)
  return results


def run(data_dir: Optional[str], clients_per_round: Sequence[int], rounds: int,
        repetitions: int, warmup_rounds: int = 2, num_clients: int = 100,
        show_progress: bool = True) -> list[dict]:
  """One measurement per cohort size, each in its own TFF runtime; JSON-able results."""
  from tff_dpmed.federated import context  # pylint: disable=g-import-not-at-top
  from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
  out = []
  for k in clients_per_round:
    work = workload.prepare(data_dir, num_clients, k)
    with context.local_runtime(
        max_concurrent_computation_calls=work.run.config.max_concurrent_computation_calls,
        concurrent_clients=trainer.concurrent_clients(work.run.config)):
      results = measure(work, rounds, repetitions, warmup_rounds, show_progress=show_progress)
    out.append({"clients_per_round": k, "num_clients": num_clients,
                "results": {n: dataclasses.asdict(r) for n, r in results.items()}})
  return out


def ratios(entry: dict, what: str = "wall_s") -> list:
  """tff_dpmed / reference per repetition."""
  res = {n: Rounds(**r) for n, r in entry["results"].items()}
  return [t / r for t, r in zip(res["tff_dpmed"].rep_medians(what),
                                res["reference"].rep_medians(what)) if r > 0]


def markdown(entries: list[dict]) -> str:
  rows = []
  for entry in entries:
    res = {n: Rounds(**r) for n, r in entry["results"].items()}
    tff, ref = res["tff_dpmed"], res["reference"]
    rows.append((
        f"{entry['clients_per_round']} of {entry['num_clients']}",
        f"{tff.examples_per_round():.0f}",
        report.fmt(tff.rep_medians()), report.fmt(ref.rep_medians()),
        f"**{report.fmt(ratios(entry))}**",
        report.fmt(tff.rep_medians("cpu_s")), report.fmt(ref.rep_medians("cpu_s")),
        report.fmt(ratios(entry, "cpu_s")),
        f"{tff.first_round_s:.1f} / {ref.first_round_s:.1f}"))
  return report.table(
      ["clients/round", "examples/round", "tff_dpmed s/round", "reference s/round",
       "ratio (wall)", "tff_dpmed CPU s/round", "reference CPU s/round", "ratio (CPU)",
       "round 1 s (tff_dpmed / reference)"], rows)


def main(argv):
  del argv
  entries = run(common_flags.DATA_DIR.value, [int(k) for k in _CLIENTS_PER_ROUND.value],
                _ROUNDS.value, common_flags.REPETITIONS.value, _WARMUP.value)
  print(markdown(entries))


if __name__ == "__main__":
  app.run(main)
