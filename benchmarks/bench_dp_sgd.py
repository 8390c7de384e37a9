"""Example-level DP-SGD: one federated pass over the data versus a central Keras DP-SGD epoch.

  python -m benchmarks.bench_dp_sgd [--data_dir=...] [--repetitions=3]
      [--dp_sgd_models=scatter_linear:64,gap_cnn:128] [--output=benchmarks/RESULTS_DP_SGD.md]

Central: Keras `model.fit`, one epoch over PneumoniaMNIST's 4,708 training
examples in shuffled batches of B, every example clipped to C on its own,
N(0, (zC)^2) added to each step's sum; same model (`models.build_trainable`;
for scatter_* models the scattering features, computed once as the trainer
computes them), the library's loss, C = 1, z = 1.1. Two TF Privacy paths:
`DPModel` (`keras dp_model`: per-example gradients with `tf.vectorized_map`,
the algorithm tff_dpmed's client work uses) and
`VectorizedDPKerasSGDOptimizer` (`keras dp_optimizer`: `num_microbatches=None`,
one microbatch per example; per-example gradients as the jacobian of the
batch's losses). Neither with XLA: TFF's worker does not compile with it.
The optimizer is timed only for `--dp_sgd_optimizer_models`: for conv models
its jacobian runs B backward passes of the whole batch per step (gap_cnn: one
epoch took 382 s in a development run). The ratio's anchor is the faster path
by CPU seconds. tf.data's autotuner is off in the central pipeline: under
load it kept the train step waiting for batches.

Federated (`federated`): `--dp_mode=example --clip_mode=fixed`, the data split
IID over 10 hospitals, all 10 every round (`--sampling=all`),
`--client_epochs=1`, the same B, C, z and model, built by the trainer's own
functions (`trainer.prepare`, `trainer.client_datasets`, `trainer.build_process`)
and run on the local TFF worker; a round is next() and reading the new
weights, as the trainer does. One round is one expected pass: each hospital
runs ceil(n_k / B) Poisson-sampled steps of expected size B, so about 5,120
per-example gradients against the epoch's 4,708. `federated` is what the
trainer runs on its local worker: each hospital's tensors in a private file
the worker reads. `federated, data in the computation` embeds all training
data in the computation, as the trainer does for remote workers.

Per model, one untimed pass of each contender first (tracing; reported as
first pass), then each repetition times one pass of each, in alternating
order. Ratio = round / anchor epoch within a repetition, by wall time and by
CPU seconds (this process and its TFF worker).
"""

import os
import tempfile
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np
# Before absl parses flags; see bench_round_time.
import tensorflow as tf
import tqdm

from benchmarks import common_flags
from benchmarks import procstats
from benchmarks import report
from benchmarks import workload

# The target: a federated pass costs at most this times a central epoch.
TARGET_RATIO = 1.3
NUM_HOSPITALS = 10
CLIP = 1.0
# (model, B): the recipe model and the reference CNN.
MODELS = (("scatter_linear", 64), ("gap_cnn", 128))
DEFAULT_OUTPUT = os.path.join(report.REPO, "benchmarks", "RESULTS_DP_SGD.md")
FEDERATED = "federated"
# Remote workers (no shared file system) get all the data in the computation.
EMBEDDED = "federated, data in the computation (remote workers)"
KERAS = ("keras dp_model", "keras dp_optimizer")

MODEL_CASES = flags.DEFINE_list("dp_sgd_models", [f"{m}:{b}" for m, b in MODELS],
                                "MODEL:BATCH_SIZE pairs to time.")
OPTIMIZER_MODELS = flags.DEFINE_list(
    "dp_sgd_optimizer_models", ["scatter_linear"],
    "Models for which TF Privacy's VectorizedDPKerasSGDOptimizer is timed too (slow for "
    "conv models: see the module doc).")


def parse_models(values: Sequence[str]) -> list[tuple[str, int]]:
  """'scatter_linear:64' -> ('scatter_linear', 64)."""
  out = []
  for value in values:
    name, _, batch = value.partition(":")
    if not batch.isdigit():
      raise app.UsageError(f"--dp_sgd_models: {value!r} is not MODEL:BATCH_SIZE")
    out.append((name, int(batch)))
  return out


class Setup:
  """One model's prepared run (the trainer's, dp_mode=example), its training
  inputs and seeded initial weights."""

  def __init__(self, data_dir: Optional[str], model: str, batch_size: int,
               num_clients: int = NUM_HOSPITALS, dataset: str = "pneumoniamnist"):
    from tff_dpmed import models  # pylint: disable=g-import-not-at-top
    from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
    # Unseeded, as a private run is: the client work then draws its batches
    # and noise from the OS, the trainer's normal path.
    self.run = trainer.prepare(workload.run_config(
        data_dir, num_clients, num_clients, dataset, model=model, dp_mode="example",
        clip_mode="fixed", clip=CLIP, sampling="all", client_epochs=1,
        client_batch_size=batch_size, seed=None))
    splits = self.run.splits
    # The trainer's own client data (its feature stage included), in the computation.
    self.client_data = trainer.client_datasets(self.run)
    self.initial_weights = [np.asarray(w) for w in
                            models.build_trainable(model, splits.info, seed=0).get_weights()]


def client_data_from_files(setup: Setup, folder: str):
  """The trainer's whole-client datasets as it runs them on the local worker: each
  hospital's tensors in a file of `folder`, read by the worker."""
  from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
  return trainer.client_datasets(setup.run, folder)


class FederatedDPSGD:
  """The trainer's DP-SGD process over `federated_data`, all hospitals every round."""

  def __init__(self, setup: Setup, federated_data):
    import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
    from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
    self.process, _ = trainer.build_process(setup.run, federated_data)
    weights = tff.learning.models.ModelWeights(trainable=list(setup.initial_weights),
                                               non_trainable=[])
    self.state = self.process.set_model_weights(self.process.initialize(), weights)
    spec = setup.run.config.dp
    self.participants = list(range(spec.num_clients))
    self.steps = sum(spec.local_steps(n) for n in spec.client_sizes)
    self.gradients = self.steps * spec.batch_size  # Expected: batches are Poisson.

  def one_pass(self) -> None:
    """One round: every hospital runs one local epoch of DP-SGD."""
    self.state, _, _ = workload.tff_round(self.process, self.state, self.participants)


class KerasDPSGD:
  """Central DP-SGD: `model.fit` with TF Privacy's DPModel or its vectorised optimizer."""

  def __init__(self, setup: Setup, use_optimizer: bool):
    import tensorflow_privacy  # pylint: disable=g-import-not-at-top
    from tff_dpmed import models  # pylint: disable=g-import-not-at-top
    cfg, info = setup.run.config, setup.run.splits.info
    dp = dict(l2_norm_clip=cfg.dp.clip, noise_multiplier=cfg.dp.noise_multiplier,
              # None: one microbatch per example, also in the last, partial batch.
              num_microbatches=None)
    model = models.build_trainable(cfg.model, info)
    loss = models.loss_for(info)
    if use_optimizer:
      optimizer = tensorflow_privacy.VectorizedDPKerasSGDOptimizer(
          learning_rate=cfg.client_learning_rate, **dp)
      # The optimizer clips per microbatch, so it needs every example's loss.
      loss = loss.__class__.from_config(
          {**loss.get_config(), "reduction": tf.keras.losses.Reduction.NONE})
    else:
      optimizer = tf.keras.optimizers.SGD(cfg.client_learning_rate)
      model = tensorflow_privacy.DPModel(use_xla=False, inputs=model.inputs,
                                         outputs=model.outputs, **dp)
    model.set_weights(setup.initial_weights)
    model.compile(optimizer=optimizer, loss=loss)
    self.model = model
    # The exact tensors the hospitals train on, all of them.
    elements = [e for (e,) in map(setup.client_data.create_tf_dataset_for_client,
                                  setup.client_data.client_ids)]
    x, y = (np.concatenate([e[name] for e in elements]) for name in ("x", "y"))
    # Without tf.data's autotuner: on this loaded 2-core machine it left the
    # train step waiting for batches (epochs of 1.27 s and 10.24 s wall, again
    # and again, for 0.8 and 8 CPU s); off, the anchor's wall time is its work.
    options = tf.data.Options()
    options.autotune.enabled = False
    self.data = (tf.data.Dataset.from_tensor_slices((x, y))
                 .shuffle(len(y), seed=0).batch(cfg.client_batch_size).with_options(options))
    self.steps = -(-len(y) // cfg.client_batch_size)
    self.gradients = len(y)

  def one_pass(self) -> None:
    """One epoch."""
    self.model.fit(self.data, epochs=1, verbose=0)


def measure(setup: Setup, repetitions: int, with_optimizer: bool = True,
            show_progress: bool = True) -> dict:
  """Times every contender on `setup`; needs a TFF runtime (context.local_runtime)."""
  cfg = setup.run.config
  with tempfile.TemporaryDirectory(prefix="bench_dp_sgd_") as folder:
    builders = {
        # The trainer's path on its local worker: each hospital's data in a file.
        FEDERATED: lambda: FederatedDPSGD(setup, client_data_from_files(setup, folder)),
        EMBEDDED: lambda: FederatedDPSGD(setup, setup.client_data),
        KERAS[0]: lambda: KerasDPSGD(setup, use_optimizer=False)}
    if with_optimizer:
      builders[KERAS[1]] = lambda: KerasDPSGD(setup, use_optimizer=True)
    # TFF first: it builds Keras objects in v1 graphs, which would break an
    # eager Keras model built before it (see trainer._eager_model).
    contenders, results = {}, {}
    for name, build in builders.items():
      start = time.perf_counter()
      contenders[name] = build()
      results[name] = {"build_s": time.perf_counter() - start, "steps": contenders[name].steps,
                       "gradients": contenders[name].gradients, "wall_s": [], "cpu_s": []}
    pids = [os.getpid(), *procstats.child_worker_pids()]
    with tqdm.tqdm(total=len(contenders) * (1 + repetitions), desc=f"DP-SGD {cfg.model}",
                   unit="pass", disable=not show_progress, dynamic_ncols=True) as bar:
      for name, contender in contenders.items():
        start = time.perf_counter()
        contender.one_pass()  # Traces (Keras) or compiles and runs round 1 (TFF).
        results[name]["first_s"] = time.perf_counter() - start
        bar.update(1)
      for rep in range(repetitions):
        # Alternate the order, so slow drift of the machine favours none.
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for name in order:
          cpu0, start = procstats.total_cpu_seconds(pids), time.perf_counter()
          contenders[name].one_pass()
          results[name]["wall_s"].append(time.perf_counter() - start)
          results[name]["cpu_s"].append(procstats.total_cpu_seconds(pids) - cpu0)
          bar.update(1)
  return {"model": cfg.model, "batch_size": cfg.client_batch_size,
          "num_clients": cfg.num_clients, "examples": int(len(setup.run.splits.train_labels)),
          "clip": cfg.dp.clip, "noise_multiplier": cfg.dp.noise_multiplier,
          "results": results}


def run(data_dir: Optional[str], cases: Sequence[tuple[str, int]], repetitions: int,
        optimizer_models: Sequence[str] = ("scatter_linear",),
        show_progress: bool = True) -> list[dict]:
  """One measurement per (model, B), each with its own TFF runtime; JSON-able results."""
  from tff_dpmed.federated import context  # pylint: disable=g-import-not-at-top
  from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
  out = []
  for model, batch_size in cases:
    setup = Setup(data_dir, model, batch_size)
    with context.local_runtime(
        max_concurrent_computation_calls=setup.run.config.max_concurrent_computation_calls,
        concurrent_clients=trainer.concurrent_clients(setup.run.config)):
      out.append(measure(setup, repetitions, with_optimizer=model in optimizer_models,
                         show_progress=show_progress))
  return out


def anchor(entry: dict) -> str:
  """The central contender the ratio divides by: the faster Keras path by CPU
  seconds, which other jobs on the machine disturb far less than wall time."""
  timed = [k for k in KERAS if k in entry["results"]]
  return min(timed, key=lambda k: report.median_range(entry["results"][k]["cpu_s"])[0])


def ratios(entry: dict, what: str = "wall_s", contender: str = FEDERATED) -> list:
  """`contender`'s pass / the anchor's epoch, per repetition."""
  res = entry["results"]
  return [f / k for f, k in zip(res[contender][what], res[anchor(entry)][what]) if k > 0]


def verdicts(entries: list[dict]) -> list[str]:
  out = []
  for e in entries:
    med = report.median_range(ratios(e))[0]
    cpu = report.median_range(ratios(e, "cpu_s"))[0]
    met = "met" if med <= TARGET_RATIO else f"**not met**, {med / TARGET_RATIO:.1f}x the target"
    levers = [n for n in e["results"] if n.startswith(FEDERATED) and n != FEDERATED]
    lever = "".join(f"; {n}: "
                    f"{report.median_range(ratios(e, contender=n))[0]:.2f}" for n in levers)
    out.append(f"- Example-level DP-SGD, {e['model']} (B={e['batch_size']}): a federated round "
               f"over {e['num_clients']} hospitals / a central Keras DP-SGD epoch "
               f"({anchor(e)}) = {med:.2f} by wall time ({cpu:.2f} by CPU time); target <= "
               f"{TARGET_RATIO}: {met}{lever}.")
  return out


def markdown(entries: list[dict]) -> str:
  rows = []
  for e in entries:
    for name, r in e["results"].items():
      if name == anchor(e):
        versus = ("anchor", "")
      elif name.startswith(FEDERATED):
        versus = (f"**{report.fmt(ratios(e, contender=name))}**",
                  report.fmt(ratios(e, "cpu_s", contender=name)))
      else:
        versus = ("", "")
      rows.append((e["model"], str(e["batch_size"]), name, report.fmt(r["wall_s"]),
                   report.fmt(r["cpu_s"]), f"{r['first_s']:.1f}", str(r["steps"]),
                   f"{r['gradients']:,}", *versus))
  return report.table(
      ["model", "B", "contender", "s per pass", "CPU s per pass", "first pass s", "steps",
       "per-example gradients", "ratio to the anchor (wall)", "(CPU)"], rows,
      align="lrl" + "r" * 7)


def main(argv):
  del argv
  started = time.time()
  quick = common_flags.QUICK.value
  cases = parse_models(MODEL_CASES.value)[:1 if quick else None]
  reps = 1 if quick else common_flags.REPETITIONS.value
  info = report.machine("benchmarks.bench_dp_sgd")
  entries = run(common_flags.DATA_DIR.value, cases, reps, OPTIMIZER_MODELS.value)
  # Other jobs on a shared machine inflate wall times far more than CPU seconds.
  load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
  raw = {"machine": info, "quick": quick, "dp_sgd": entries, "seconds": time.time() - started,
         "load_average_at_end": load}
  title = ("# Example-level DP-SGD: federated vs central" +
           (" (SMOKE RUN: --quick, the numbers mean nothing)" if quick else ""))
  text = "\n".join([
      title, "", f"Run time {raw['seconds'] / 60:.1f} min. Values are medians over {reps} "
      f"repetition(s) with (min-max). Load average at the end (1/5/15 min): {load}; above "
      f"{procstats.usable_cores()}, other jobs shared the cores, and CPU seconds are the better "
      "guide.", "", report.machine_table(info), "", "## Target", "",
      *verdicts(entries), "", "## How", "", "\n\n".join(__doc__.strip().split("\n\n")[2:]),
      "", "## Results", "", markdown(entries), ""])
  print(text)
  report.write(common_flags.OUTPUT.value or DEFAULT_OUTPUT, text, raw)


if __name__ == "__main__":
  app.run(main)
