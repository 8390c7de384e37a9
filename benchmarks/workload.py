"""The benchmarked workload: the trainer's defaults, its data, and its TFF process.

Everything is built with the library's own pieces, composed exactly as
`tff_dpmed.program.trainer` composes them (prepare -> client data -> functional
model -> DP-FedAvg process -> dataset computation composed in), so what is
timed is what `python -m tff_dpmed.train` runs each round, minus evaluation
and checkpoints.
"""

import atexit
import dataclasses
import shutil
import tempfile
import time
from typing import Optional

import numpy as np

# Same default noise as `make train`; the value does not change the work done.
NOISE_MULTIPLIER = 1.1


@dataclasses.dataclass
class Workload:
  run: "object"               # trainer.PreparedRun
  federated_data: "object"    # tff.simulation.datasets.ClientData
  initial_weights: list       # trainable weights (NumPy), seeded
  build_seconds: dict         # what building each part took


def run_config(data_dir: Optional[str], num_clients: int, clients_per_round: int,
               dataset: str = "pneumoniamnist", **overrides):
  """The trainer's default RunConfig (central DP, adaptive clipping, the small CNN,
  its client epochs, batch size and learning rates), with a fixed cohort size."""
  from tff_dpmed.program.config import RunConfig  # pylint: disable=g-import-not-at-top
  settings = dict(dataset=dataset, data_dir=data_dir, download=False,
                  num_clients=num_clients, clients_per_round=clients_per_round,
                  noise_multiplier=NOISE_MULTIPLIER, sampling="fixed", seed=0,
                  output_dir=tempfile.gettempdir())
  settings.update(overrides)
  return RunConfig.from_json(settings)


def resample_clients(run, num_clients: int, copy_images: bool = False, seed: int = 0):
  """`run` with `num_clients` clients of the 100-client split's size (47 examples).

  For scale points beyond the real training set, each client's examples are
  drawn with replacement from the real training images. By default clients
  share (overlap in) those images, so the number of clients grows while the
  image memory stays that of the real set; copy_images=True gives every
  client its own copies, so the data grows with the clients too.
  """
  splits = run.splits
  per_client = max(1, len(splits.train_labels) // 100)
  picks = np.random.default_rng(seed).integers(0, len(splits.train_labels),
                                               num_clients * per_client)
  if copy_images:
    splits = dataclasses.replace(splits, train_images=splits.train_images[picks],
                                 train_labels=splits.train_labels[picks])
    picks = np.arange(len(picks))
  partitions = [np.sort(picks[i * per_client:(i + 1) * per_client]).astype(np.int64)
                for i in range(num_clients)]
  from tff_dpmed.privacy import mechanisms  # pylint: disable=g-import-not-at-top
  # delta=None: the default for the new number of clients, as a fresh run would get.
  config = run.config.replace(num_clients=num_clients, delta=None)
  return dataclasses.replace(run, config=config, splits=splits, partitions=partitions,
                             mechanism=mechanisms.for_spec(config.dp))


def upsampled(run, size: int):
  """`run` with every split's images resized to `size` x `size` (bilinear, uint8)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  splits = run.splits

  def resize(images: np.ndarray) -> np.ndarray:
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for start in range(0, len(images), 512):  # Bounded float32 temporaries.
      batch = tf.image.resize(images[start:start + 512], (size, size), method="bilinear")
      out[start:start + 512] = np.clip(np.round(batch.numpy()), 0, 255).astype(np.uint8)
    return out

  info = dataclasses.replace(splits.info, image_shape=(size, size, splits.info.image_shape[2]))
  splits = dataclasses.replace(
      splits, info=info, train_images=resize(splits.train_images),
      val_images=resize(splits.val_images), test_images=resize(splits.test_images))
  return dataclasses.replace(run, splits=splits)


def prepare(data_dir: Optional[str], num_clients: int, clients_per_round: int,
            dataset: str = "pneumoniamnist", resample: Optional[str] = None,
            client_files: bool = True, upsample: Optional[int] = None,
            **overrides) -> Workload:
  """Loads and partitions the data and builds the client datasets (no TFF process yet).

  resample: None splits the real training set IID over `num_clients`;
  "shared" or "copied" makes `num_clients` resampled clients (see
  `resample_clients`: shared images, or copies per client).
  upsample: a side in px: every split's images resized to it (bilinear, uint8), for
  large-image benchmarks where no file of that size exists.
  client_files: the clients' data in files the local worker reads, as the
  trainer does (a private temporary folder, removed at exit); False embeds
  them in the computation (the trainer's way with remote workers).
  overrides: flat, flag-named RunConfig fields, e.g. noise_multiplier=0.0.
  """
  from tff_dpmed import models  # pylint: disable=g-import-not-at-top
  from tff_dpmed.data import client_data as client_data_lib  # pylint: disable=g-import-not-at-top
  from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  run = trainer.prepare(run_config(data_dir, 100 if resample else num_clients,
                                   clients_per_round, dataset, **overrides))
  if resample:
    run = resample_clients(run, num_clients, copy_images=(resample == "copied"))
  if upsample:
    run = upsampled(run, upsample)
  cfg = run.config
  t1 = time.perf_counter()
  folder = _private_folder() if client_files else None
  if cfg.packs_clients:  # The trainer's packed one-example clients.
    federated_data = trainer.client_datasets(run, folder)
  else:
    federated_data = client_data_lib.make_federated_train_data(
        run.splits.train_images, run.splits.train_labels, run.partitions, run.splits.info,
        batch_size=cfg.client_batch_size, epochs=cfg.client_epochs, seed=cfg.seed,
        folder=folder)
  model = models.build_model(cfg.model, run.splits.info, seed=cfg.seed)
  initial = [np.asarray(w) for w in model.trainable_weights]
  t2 = time.perf_counter()
  return Workload(run, federated_data, initial, {"data": t1 - t0, "client_data": t2 - t1})


def _private_folder() -> str:
  """A 0700 temporary folder (the trainer's is in its run folder), removed at exit."""
  folder = tempfile.mkdtemp(prefix="tff_dpmed_bench_clients_")
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  return folder


def releases_client_metrics(work: Workload) -> bool:
  """The trainer's rule: per-client train metrics leave the clients only without DP
  (or with --debug_metrics), since no DP mechanism covers them."""
  cfg = work.run.config
  return cfg.dp.mode.value == "none" or cfg.debug_metrics


def build_tff_process(work: Workload, loop: Optional[str] = None, compose: bool = True):
  """The learning process the trainer runs, built by the library (see trainer).

  Levers (defaults = the trainer): `loop` names TFF's client loop
  (DATASET_REDUCE, DATASET_ITERATOR; None: the library's choice); compose=False
  leaves the dataset computation out, so each round takes client datasets
  (see `tff_round`). Client metrics are released as the trainer releases them
  (`releases_client_metrics`).
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tff_dpmed.federated import process as process_lib  # pylint: disable=g-import-not-at-top
  cfg = work.run.config
  if cfg.packs_clients:
    if loop or not compose:
      raise ValueError("the loop and compose levers do not apply to packed clients")
    from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
    return trainer.build_process(work.run, work.federated_data)[0]
  tff_model = process_lib.make_functional_model(
      cfg.model, work.run.splits.info, work.federated_data.element_type_structure, cfg.seed)
  loop_kw = {"loop_implementation": tff.learning.LoopImplementation[loop]} if loop else {}
  learning_process = process_lib.build_learning_process(
      tff_model, work.run.mechanism, process_lib.OptimizerConfig(
          cfg.client_learning_rate, cfg.server_learning_rate, cfg.server_momentum),
      release_client_metrics=releases_client_metrics(work), **loop_kw)
  if not compose:
    return learning_process
  return tff.simulation.compose_dataset_computation_with_learning_process(
      work.federated_data.dataset_computation, learning_process)


def initial_state(process, work: Workload):
  """initialize() + the seeded weights, as the trainer starts a run."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  state = process.initialize()
  weights = tff.learning.models.ModelWeights(trainable=list(work.initial_weights),
                                             non_trainable=[])
  return process.set_model_weights(state, weights)


def cohorts(num_clients: int, clients_per_round: int, rounds: int, seed: int = 0) -> list:
  """The clients of each round: fixed-size uniform draws, the same for every contender."""
  rng = np.random.default_rng(seed)
  return [np.sort(rng.choice(num_clients, clients_per_round, replace=False))
          for _ in range(rounds)]


def tff_round(process, state, participants, work: Optional[Workload] = None,
              weights_from_state: bool = True):
  """One round as the trainer does it: next() and reading the new model weights.

  Levers: with `work`, the process is the uncomposed one and takes each
  client's dataset, built here in Python; weights_from_state=False calls
  get_model_weights (a second computation, which sends the whole state back
  to the worker) instead of reading the weights from the returned state, as
  the trainer did before 3 December.
  """
  if work is None:
    clients = [str(i) for i in participants]
  else:
    clients = [work.federated_data.create_tf_dataset_for_client(str(i)) for i in participants]
  output = process.next(state, clients)
  if weights_from_state:
    weights = output.state.global_model_weights
  else:
    weights = process.get_model_weights(output.state)
  return output.state, output.metrics, weights


class TffContender:
  """tff_dpmed's process, driven the way the trainer drives it (levers as in build_tff_process
  and tff_round). `round` returns the examples trained on: TFF's own count where the
  process releases client metrics, else the cohort's examples times the client epochs
  (what the trainer trains on; in DP modes TFF reports no count)."""

  def __init__(self, work: Workload, loop: Optional[str] = None, compose: bool = True,
               weights_from_state: bool = True, before_execution=None):
    start = time.perf_counter()
    self.process = build_tff_process(work, loop=loop, compose=compose)
    self.build_seconds = time.perf_counter() - start
    # The trainer builds while its worker loads, then waits for it (runtime.wait_ready).
    start = time.perf_counter()
    if before_execution is not None:
      before_execution()
    self.wait_seconds = time.perf_counter() - start
    self.state = initial_state(self.process, work)
    self.weights = None
    self._work = None if compose else work
    self._weights_from_state = weights_from_state
    self._partitions = work.run.partitions
    self._epochs = work.run.config.client_epochs
    self.counts_from_tff = releases_client_metrics(work)

  def round(self, participants) -> int:
    self.state, metrics, self.weights = tff_round(
        self.process, self.state, participants, work=self._work,
        weights_from_state=self._weights_from_state)
    if self.counts_from_tff:
      return int(metrics["client_work"]["train"]["num_examples"])
    return self._epochs * sum(len(self._partitions[int(i)]) for i in participants)


class ReferenceContender:
  """The plain-TF reference (benchmarks.reference) on the same workload."""

  def __init__(self, work: Workload, noise_seed: Optional[int] = None):
    from benchmarks import reference  # pylint: disable=g-import-not-at-top
    self.ref = reference.from_workload(work, noise_seed=noise_seed)

  def round(self, participants) -> int:
    metrics = self.ref.round(participants)
    self.ref.weights()  # The trainer reads the new weights every round too.
    return int(metrics["num_examples"])
