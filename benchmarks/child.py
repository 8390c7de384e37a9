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
_DATASET = flags.DEFINE_string("dataset", "pneumoniamnist", "MedMNIST dataset.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 100, "Total clients.")
_CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 10, "Clients per round.")
_RESAMPLE = flags.DEFINE_enum("resample", None, ["shared", "copied"], "Make num_clients "
                              "resampled clients of the 100-client size, sharing the real "
                              "images or each with its own copies (scale runs).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds to run, the first included.")
_PER_EXAMPLE = flags.DEFINE_boolean("per_example", False, "Patients as clients: one training "
                                    "example per client (--partition=per_example, batch 1); "
                                    "--num_clients must be the training set's size.")
_MAX_CONCURRENT = flags.DEFINE_integer("max_concurrent_computation_calls", -1,
                                       "The TFF worker's limit (-1: none, the trainer's default).")
_PACKING = flags.DEFINE_enum("client_packing", "auto", ["auto", "on", "off"],
                             "With --per_example: the trainer's --client_packing (packing "
                             "needs fixed clipping, so --per_example runs use it).")
# Levers (see workload.py); the defaults are what the trainer does.
_UPSAMPLE = flags.DEFINE_integer("upsample", None, "Resize every image to this side, px "
                                 "(bench_large_images).")
_CLIENT_FILES = flags.DEFINE_boolean("client_files", True, "The clients' data in files the "
                                     "worker reads (the trainer's local runs), not embedded "
                                     "in the computation.")
_LOOP = flags.DEFINE_enum("loop", None, ["DATASET_REDUCE", "DATASET_ITERATOR"],
                          "TFF's client training loop (default: TFF's).")
_COMPOSE = flags.DEFINE_boolean("compose", True, "Clients build their datasets on the worker "
                                "(dataset computation composed in), as the trainer does.")
_ONE_THREAD_OPS = flags.DEFINE_enum("worker_op_threads", "auto", ["auto", "tf_default"],
                                    "The worker's intra-op threads: the trainer's rule "
                                    "(one per op when the clients fill the cores) or TF's "
                                    "default (all cores per op).")
_WEIGHTS_FROM_STATE = flags.DEFINE_boolean("weights_from_state", True, "Read the weights from "
                                           "the new state, as the trainer does (--no...: call "
                                           "get_model_weights, a second computation).")


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
                          dataset=_DATASET.value, resample=_RESAMPLE.value,
                          max_concurrent_computation_calls=_MAX_CONCURRENT.value,
                          client_files=_CLIENT_FILES.value, upsample=_UPSAMPLE.value,
                          **(dict(partition="per_example", client_batch_size=1,
                                  clip_mode="fixed", clip=1.0,
                                  client_packing=_PACKING.value)
                             if _PER_EXAMPLE.value else {}))
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
    from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
    concurrent = (trainer.concurrent_clients(work.run.config)
                  if _ONE_THREAD_OPS.value == "auto" else None)
    # As the trainer: the worker loads while the process is built.
    with context.local_runtime(max_concurrent_computation_calls=_MAX_CONCURRENT.value,
                               concurrent_clients=concurrent, wait=False) as runtime:
      launch = time.time() - t
      t = time.time()
      runner = workload.TffContender(work, loop=_LOOP.value, compose=_COMPOSE.value,
                                     weights_from_state=_WEIGHTS_FROM_STATE.value,
                                     before_execution=runtime.wait_ready)
      # Worker start: what of it the build did not hide. Process construction, then
      # initialize() + set_model_weights (first executions).
      stages["worker_start"] = launch + runner.wait_seconds
      stages["build_process"] = runner.build_seconds
      stages["initialize"] = time.time() - t - runner.build_seconds - runner.wait_seconds
      workers = procstats.child_worker_pids()
      timed_rounds(runner.round, [os.getpid(), *workers])
      out["peak_rss_bytes"] = {"main": procstats.peak_rss_bytes(os.getpid()),
                               "worker": sum(procstats.peak_rss_bytes(p) for p in workers)}
      out["workers"] = len(workers)
  else:
    t = time.time()
    runner = workload.ReferenceContender(work)
    stages["build_process"] = time.time() - t
    timed_rounds(runner.round, [os.getpid()])
    out["peak_rss_bytes"] = {"main": procstats.peak_rss_bytes(os.getpid()), "worker": 0}
    out["workers"] = 0
  out.update(round_s=rounds, round_cpu_s=cpus, examples=examples)
  print(RESULT_PREFIX + json.dumps(out), flush=True)


if __name__ == "__main__":
  _heavy_imports()
  app.run(main)
