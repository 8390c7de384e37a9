"""The benchmarked workload: the trainer's defaults, its data, and its TFF process.

Everything is built with the library's own pieces, composed exactly as
`tff_dpmed.program.trainer` composes them (prepare -> client data -> functional
model -> DP-FedAvg process -> dataset computation composed in), so what is
timed is what `python -m tff_dpmed.train` runs each round, minus evaluation
and checkpoints.
"""

import dataclasses
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
  return RunConfig(**settings)


def resample_clients(run, num_clients: int, seed: int = 0):
  """`run` with `num_clients` clients of the 100-client split's size, images resampled.

  For scale points beyond the real training set: every client gets as many
  examples as a client of the 100-client split, drawn with replacement from
  the real training images, and the images are copied, so memory grows with
  the number of clients as it would with that much real data.
  """
  splits = run.splits
  per_client = max(1, len(splits.train_labels) // 100)
  picks = np.random.default_rng(seed).integers(0, len(splits.train_labels),
                                               num_clients * per_client)
  splits = dataclasses.replace(splits, train_images=splits.train_images[picks],
                               train_labels=splits.train_labels[picks])
  partitions = [np.arange(i * per_client, (i + 1) * per_client, dtype=np.int64)
                for i in range(num_clients)]
  config = dataclasses.replace(run.config, num_clients=num_clients)
  return dataclasses.replace(run, config=config, splits=splits, partitions=partitions)


def prepare(data_dir: Optional[str], num_clients: int, clients_per_round: int,
            dataset: str = "pneumoniamnist", resample: bool = False, **overrides) -> Workload:
  """Loads and partitions the data and builds the client datasets (no TFF process yet).

  resample: `num_clients` clients of the 100-client split's size, resampled
  (see `resample_clients`); otherwise the real training set split IID.
  overrides: RunConfig fields, e.g. noise_multiplier=0.0.
  """
  from tff_dpmed import models  # pylint: disable=g-import-not-at-top
  from tff_dpmed.data import client_data as client_data_lib  # pylint: disable=g-import-not-at-top
  from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  run = trainer.prepare(run_config(data_dir, 100 if resample else num_clients,
                                   clients_per_round, dataset, **overrides))
  if resample:
    run = resample_clients(run, num_clients)
  cfg = run.config
  t1 = time.perf_counter()
  federated_data = client_data_lib.make_federated_train_data(
      run.splits.train_images, run.splits.train_labels, run.partitions, run.splits.info,
      batch_size=cfg.client_batch_size, epochs=cfg.client_epochs, seed=cfg.seed)
  model = models.build_model(cfg.model, run.splits.info, seed=cfg.seed)
  initial = [np.asarray(w) for w in model.trainable_weights]
  t2 = time.perf_counter()
  return Workload(run, federated_data, initial, {"data": t1 - t0, "client_data": t2 - t1})


def build_tff_process(work: Workload):
  """The learning process the trainer runs, built by the library (see trainer)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tff_dpmed.federated import process as process_lib  # pylint: disable=g-import-not-at-top
  cfg = work.run.config
  tff_model = process_lib.make_functional_model(
      cfg.model, work.run.splits.info, work.federated_data.element_type_structure, cfg.seed)
  learning_process, _ = process_lib.build_learning_process(
      tff_model, work.run.dp, process_lib.OptimizerConfig(
          cfg.client_learning_rate, cfg.server_learning_rate, cfg.server_momentum))
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


def tff_round(process, state, participants):
  """One round as the trainer does it: next() and reading the new model weights."""
  output = process.next(state, [str(i) for i in participants])
  weights = process.get_model_weights(output.state)
  return output.state, output.metrics, weights
