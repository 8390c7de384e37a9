"""Training throughput of the default model: tff_dpmed rounds versus Keras `model.fit`.

  python -m benchmarks.bench_throughput [--data_dir=...] [--repetitions=3] [--fit_epochs=2]

Keras: the library's model and loss, plain SGD at the client learning rate,
batches of the client batch size, over the same PneumoniaMNIST training images
preprocessed by the library (`make_eval_dataset`); one untimed epoch first
(tracing), then each repetition is `--fit_epochs` timed epochs. tff_dpmed and
the reference: the round-time measurement at 100 of 100 clients per round,
where a round is one pass over the same 4,708 images (run_all passes its
results in; standalone, it is measured here). Per core = divided by the CPUs
this process may use; per CPU-second = divided by the CPU time actually spent.
"""

import os
import time
from typing import Optional

from absl import app
from absl import flags
# Before absl parses flags; see bench_round_time.
import tensorflow as tf
import tqdm

from benchmarks import common_flags
from benchmarks import procstats
from benchmarks import report
from benchmarks import workload

_EPOCHS = flags.DEFINE_integer("fit_epochs", 2, "Timed Keras epochs per repetition.")


def keras_fit(data_dir: Optional[str], repetitions: int, epochs: int,
              show_progress: bool = True, dataset: str = "pneumoniamnist",
              upsample: Optional[int] = None) -> dict:
  """Seconds and CPU seconds per epoch of model.fit, and examples per epoch
  (`upsample`: on images resized to that side, as workload.prepare does)."""
  from tff_dpmed import models  # pylint: disable=g-import-not-at-top
  from tff_dpmed.data import client_data  # pylint: disable=g-import-not-at-top
  work = workload.prepare(data_dir, 100, 1, dataset=dataset, upsample=upsample,
                          client_files=False)
  cfg, splits = work.run.config, work.run.splits
  model = models.build_model(cfg.model, splits.info, seed=cfg.seed)
  model.compile(optimizer=tf.keras.optimizers.SGD(cfg.client_learning_rate),
                loss=models.loss_for(splits.info),
                metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
  data = client_data.make_eval_dataset(splits.train_images, splits.train_labels, splits.info,
                                       cfg.client_batch_size).map(lambda b: (b["x"], b["y"]))
  model.fit(data, epochs=1, verbose=0)  # Traces the train step.
  out = {"examples_per_epoch": int(len(splits.train_labels)), "wall_s": [], "cpu_s": []}
  pid = os.getpid()
  for _ in tqdm.trange(repetitions, desc="Keras fit", unit="rep", disable=not show_progress,
                       dynamic_ncols=True):
    cpu0, start = procstats.cpu_seconds(pid), time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0)
    out["wall_s"].append((time.perf_counter() - start) / epochs)
    out["cpu_s"].append((procstats.cpu_seconds(pid) - cpu0) / epochs)
  return out


def rows_from_round_time(entry: dict) -> list:
  """(name, examples, [wall per rep], [cpu per rep]) from a bench_round_time entry."""
  from benchmarks import bench_round_time  # pylint: disable=g-import-not-at-top
  out = []
  for name, raw in entry["results"].items():
    r = bench_round_time.Rounds(**raw)
    label = f"{name} round, {entry['clients_per_round']} of {entry['num_clients']} clients"
    out.append((label, r.examples_per_round(), r.rep_medians(), r.rep_medians("cpu_s")))
  return out


def markdown(keras: dict, round_entry: Optional[dict]) -> str:
  cores = procstats.usable_cores()
  runs = [("Keras model.fit, one epoch", keras["examples_per_epoch"], keras["wall_s"],
           keras["cpu_s"])]
  if round_entry is not None:
    runs += rows_from_round_time(round_entry)
  rows = []
  for name, examples, wall, cpu in runs:
    rows.append([name, f"{examples:,.0f}", report.fmt(wall),
                 f"**{report.fmt([examples / w / cores for w in wall], 0)}**",
                 report.fmt([examples / c for c in cpu if c > 0], 0)])
  return report.table(["what", "examples", "seconds", f"examples/s per core ({cores} cores)",
                       "examples per CPU-second"], rows)


def main(argv):
  del argv
  from benchmarks import bench_round_time  # pylint: disable=g-import-not-at-top
  data_dir, reps = common_flags.DATA_DIR.value, common_flags.REPETITIONS.value
  keras = keras_fit(data_dir, reps, _EPOCHS.value)
  entry = bench_round_time.run(data_dir, [100], rounds=2, repetitions=reps)[0]
  print(markdown(keras, entry))


if __name__ == "__main__":
  app.run(main)
