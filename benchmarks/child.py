"""One contender in a fresh process: stage times, per-round times and peak memory, as JSON.

  python -m benchmarks.child --contender=tff_dpmed --start_time=$(date +%s.%N) ...

Run by bench_first_round and bench_scale (see spawn.py), so that import and
first-trace times are those of a new process and peak RSS is this run's alone.
The last stdout line is `CHILD_RESULT {json}`.
"""

import time

_START = time.time()

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks.spawn import RESULT_PREFIX  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONTENDER = flags.DEFINE_enum("contender", "tff_dpmed", ["tff_dpmed", "reference"],
                               "What to run.")
_START_TIME = flags.DEFINE_float("start_time", None, "time.time() just before the parent "
                                 "started this process (default: when this module loaded).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of MedMNIST .npz files.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 100, "Total clients.")
_CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 10, "Clients per round.")
_RESAMPLE = flags.DEFINE_boolean("resample", False, "Resample the training set to "
                                 "num_clients clients of the 100-client size (scale runs).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds to run, the first included.")
_MAX_CONCURRENT = flags.DEFINE_integer("max_concurrent_computation_calls", -1,
                                       "The TFF worker's limit (-1: none, the trainer's default).")


def _heavy_imports():
  """Everything the training program imports; timed as part of 'import'."""
  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow
  import tensorflow_federated
  from tff_dpmed.program import trainer
  from tff_dpmed.federated import context
  from benchmarks import reference
  from benchmarks import workload


def main(argv):
  del argv
  start = _START_TIME.value or _START
  from benchmarks import procstats  # pylint: disable=g-import-not-at-top
  from benchmarks import workload  # pylint: disable=g-import-not-at-top
  from tff_dpmed.federated import context  # pylint: disable=g-import-not-at-top
  stages = {"import": time.time() - start}
  out = {"contender": _CONTENDER.value, "num_clients": _NUM_CLIENTS.value,
         "clients_per_round": _CLIENTS_PER_ROUND.value, "stages": stages}

  t = time.time()
  work = workload.prepare(_DATA_DIR.value, _NUM_CLIENTS.value, _CLIENTS_PER_ROUND.value,
                          resample=_RESAMPLE.value,
                          max_concurrent_computation_calls=_MAX_CONCURRENT.value)
  stages["data"] = time.time() - t
  cohorts = workload.cohorts(_NUM_CLIENTS.value, _CLIENTS_PER_ROUND.value, _ROUNDS.value)
  rounds, cpus, examples = [], [], []

  def timed_rounds(run_round, pids):
    for participants in cohorts:
      cpu0 = procstats.total_cpu_seconds(pids)
      t0 = time.time()
      examples.append(run_round(participants))
      rounds.append(time.time() - t0)
      cpus.append(procstats.total_cpu_seconds(pids) - cpu0)
      if len(rounds) == 1:
        out["end_of_round_1"] = time.time() - start

  if _CONTENDER.value == "tff_dpmed":
    t = time.time()
    with context.local_runtime(max_concurrent_computation_calls=_MAX_CONCURRENT.value):
      stages["worker_start"] = time.time() - t
      t = time.time()
      process = workload.build_tff_process(work)
      stages["build_process"] = time.time() - t
      t = time.time()
      state = [workload.initial_state(process, work)]
      stages["initialize"] = time.time() - t

      def tff_round(participants):
        state[0], metrics, _ = workload.tff_round(process, state[0], participants)
        return int(metrics["client_work"]["train"]["num_examples"])

      workers = procstats.child_worker_pids()
      timed_rounds(tff_round, [os.getpid(), *workers])
      out["peak_rss_bytes"] = {"main": procstats.peak_rss_bytes(os.getpid()),
                               "worker": sum(procstats.peak_rss_bytes(p) for p in workers)}
      out["workers"] = len(workers)
  else:
    from benchmarks import reference  # pylint: disable=g-import-not-at-top
    t = time.time()
    ref = reference.from_workload(work)
    stages["build_process"] = time.time() - t

    def ref_round(participants):
      metrics = ref.round(participants)
      ref.weights()
      return int(metrics["num_examples"])

    timed_rounds(ref_round, [os.getpid()])
    out["peak_rss_bytes"] = {"main": procstats.peak_rss_bytes(os.getpid()), "worker": 0}
    out["workers"] = 0
  out.update(round_s=rounds, round_cpu_s=cpus, examples=examples)
  print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
  _heavy_imports()
  app.run(main)
