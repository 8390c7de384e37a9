"""The training program: prepare (validate everything), then run rounds with checkpoints.

`prepare` reads and checks all input before anything is written, so bad input
never leaves a half-made run folder. `train` owns the TFF runtime, samples
clients the way the accountant assumes, checkpoints program state, and writes
metrics.csv, TensorBoard curves, summary.json and the final SavedModel.
"""

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators import differential_privacy as tff_dp
import tqdm

from tff_dpmed import models
from tff_dpmed.data import client_data as client_data_lib
from tff_dpmed.data import partition as partition_lib
from tff_dpmed.data import registry as data_registry
from tff_dpmed.data.types import ImageSplits
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import context
from tff_dpmed.federated import process as process_lib
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy.dp_config import DPConfig
from tff_dpmed.program import artifacts
from tff_dpmed.program import evaluation
from tff_dpmed.program.checkpoints import Checkpointer
from tff_dpmed.program.config import RunConfig, write_json_atomic
from tff_dpmed.program.metrics_log import MetricsLog
from tff_dpmed.program.sampling import ClientSampler


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. non-finite weights); the last good checkpoint is kept."""


@dataclasses.dataclass
class PreparedRun:
  config: RunConfig               # with noise_multiplier and delta resolved
  splits: ImageSplits
  partitions: list
  privacy: Optional[accounting.PrivacySetting]
  dp: DPConfig
  notes: list                     # what was chosen for the user, and why


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def prepare(cfg: RunConfig) -> PreparedRun:
  """Validates flags and data and resolves derived settings; writes nothing."""
  cfg.validate()
  if cfg.model not in models.MODEL_NAMES:
    raise UsageError(f"unknown model '{cfg.model}': use one of {', '.join(models.MODEL_NAMES)}")
  notes = []
  _check_output_dir_writable(cfg.output_dir)
  _check_runtime(cfg)
  splits = data_registry.load_dataset(cfg.dataset, image_size=cfg.image_size,
                                      data_dir=cfg.data_dir, download=cfg.download,
                                      seed=cfg.seed or 0)
  seed = 0 if cfg.seed is None else cfg.seed
  if cfg.partition == "iid":
    partitions = partition_lib.partition_iid(len(splits.train_labels), cfg.num_clients, seed)
  else:
    partitions = partition_lib.partition_dirichlet(splits.train_labels, cfg.num_clients,
                                                   cfg.dirichlet_alpha, seed)

  privacy = None
  if cfg.dp_mode != "none":
    delta = cfg.delta
    if delta is None:
      delta = accounting.default_delta(cfg.num_clients)
      notes.append(f"delta={delta:g} (default: below 1/N for N={cfg.num_clients} clients, "
                   "the privacy unit)")
    privacy = accounting.PrivacySetting(
        dp_mode=cfg.dp_mode, noise_multiplier=cfg.noise_multiplier or 0.0,
        num_clients=cfg.num_clients, clients_per_round=cfg.clients_per_round,
        sampling=cfg.sampling, delta=delta, accountant=cfg.accountant,
        adaptive_clipping=(cfg.dp_mode == "central" and cfg.clip_mode == "adaptive"),
        clipped_count_stddev=cfg.clipped_count_stddev)
    if cfg.target_epsilon is not None:
      z = calibration.calibrate_noise_multiplier(privacy, cfg.rounds, cfg.target_epsilon)
      notes.append(f"noise_multiplier={z:.4f}: the smallest that keeps epsilon <= "
                   f"{cfg.target_epsilon:g} after {cfg.rounds} rounds")
      privacy = dataclasses.replace(privacy, noise_multiplier=z)
    if privacy.adaptive_clipping and privacy.clipped_count_stddev is None:
      privacy = dataclasses.replace(
          privacy, clipped_count_stddev=calibration.choose_clipped_count_stddev(
              privacy.noise_multiplier, cfg.clients_per_round))
    privacy.validate()
    cfg = dataclasses.replace(cfg, noise_multiplier=privacy.noise_multiplier, delta=delta,
                              clipped_count_stddev=privacy.clipped_count_stddev)
    notes.append(f"accountant={accounting.resolve_accountant(privacy)}, sampling={cfg.sampling}")

  dp = DPConfig(mode=cfg.dp_mode, noise_multiplier=cfg.noise_multiplier or 0.0,
                clip_mode=cfg.clip_mode, clip=cfg.clip,
                target_unclipped_quantile=cfg.target_unclipped_quantile,
                adaptive_clip_learning_rate=cfg.adaptive_clip_learning_rate,
                clipped_count_stddev=cfg.clipped_count_stddev,
                expected_clients_per_round=float(cfg.clients_per_round), seed=cfg.seed)
  dp.validate()
  return PreparedRun(cfg, splits, partitions, privacy, dp, notes)


def _check_output_dir_writable(output_dir: str) -> None:
  existing = os.path.abspath(output_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"output directory {output_dir} is not writable "
                     f"({existing} is not a writable folder): pass a writable --output_dir")


def _check_runtime(cfg: RunConfig) -> None:
  """Before anything is written: every remote worker answers (over TLS if asked), or the
  local worker binary is a TFF worker and can be isolated (unless insecure)."""
  try:
    # Worker network security (issue 17): TLS to remote workers; the local one isolated.
    if cfg.executor == "remote":
      context.check_reachable(cfg.worker_addresses, credentials=_worker_credentials(cfg))
    else:
      context.check_local_runtime(cfg.worker_binary, insecure=cfg.insecure_local_executor)
  except context.WorkerError as e:
    raise UsageError(str(e)) from None


def _worker_credentials(cfg: RunConfig):
  """gRPC channel credentials for --worker_tls_*, or None (plaintext) without them."""
  if cfg.worker_tls_ca is None:
    return None
  return context.tls_channel_credentials(cfg.worker_tls_ca, cfg.worker_tls_cert,
                                         cfg.worker_tls_key)


def _runtime(cfg: RunConfig):
  """The TFF runtime the run executes on, as a context manager."""
  # Worker network security (issue 17): credentials and insecure_local_executor.
  if cfg.executor == "remote":
    return context.remote_runtime(cfg.worker_addresses, credentials=_worker_credentials(cfg))
  return context.local_runtime(
      max_concurrent_computation_calls=cfg.max_concurrent_computation_calls,
      log_dir=cfg.run_dir, binary=cfg.worker_binary, insecure=cfg.insecure_local_executor)


class _Stop(Exception):
  """Raised from a signal handler so the loop can checkpoint before exiting."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_stop(signum, frame):
  del frame
  raise _Stop(signum)


def _clip_norm(metrics, dp: DPConfig) -> Optional[float]:
  """The clip norm used this round: adaptive clipping reports it in its query metrics."""
  if dp.mode == "none":
    return None
  found = _find_key(metrics.get("aggregator", {}), "clip")
  return float(found) if found is not None else dp.clip


def _find_key(tree, key):
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    for value in tree.values():
      found = _find_key(value, key)
      if found is not None:
        return found
  return None


def _check_finite(round_num, metrics, weights, participants, partitions, epochs) -> None:
  """Stops on NaN/inf weights or loss, and on client updates TFF silently dropped.

  TFF zeroes a client's non-finite update and discards its metrics, so a
  diverging client only shows as missing examples in the round's count.
  """
  train = metrics["client_work"]["train"]
  expected = epochs * sum(len(partitions[i]) for i in participants)
  seen = int(train["num_examples"]) if len(participants) else 0
  loss = float(train["loss"]) if len(participants) else 0.0
  weights_finite = all(np.all(np.isfinite(w)) for w in weights.trainable)
  if not weights_finite or not math.isfinite(loss) or seen < expected:
    detail = (f"{expected - seen} of {expected} client examples came from non-finite updates"
              if seen < expected else f"loss={loss}, weights finite: {weights_finite}")
    raise TrainingError(
        f"round {round_num} produced a non-finite model update or loss ({detail}); stopped, "
        "the last good checkpoint is kept: lower --client_learning_rate or "
        "--server_learning_rate")


@contextlib.contextmanager
def _signals_deferred():
  """Holds SIGINT/SIGTERM until the block ends, so it runs as a unit."""
  blocked = {signal.SIGINT, signal.SIGTERM}
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def train(run: PreparedRun, show_progress: bool = True) -> dict:
  """Runs (or resumes) the training program and returns the summary."""
  cfg = run.config
  info = run.splits.info
  artifacts.check_resume_compatible(cfg.run_dir, cfg)
  os.makedirs(cfg.run_dir, exist_ok=True)
  checkpointer = Checkpointer(cfg.run_dir)
  if cfg.restart:
    checkpointer.remove_all()
    for stale in ("metrics.csv", "summary.json", "tensorboard"):
      path = os.path.join(cfg.run_dir, stale)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  write_json_atomic(os.path.join(cfg.run_dir, "config.json"),
                    {"config": cfg.to_json(), "dataset": info.to_json()})
  for note in run.notes:
    _log(f"note: {note}")

  start_time = time.time()
  previous_handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with _runtime(cfg):
      return _train_with_runtime(run, checkpointer, start_time, show_progress)
  except context.WorkerError as e:
    # Nothing of the failed round was committed; the checkpoints are as they were.
    saved = checkpointer.versions()
    kept = (f"the checkpoint after round {saved[-1]} is kept" if saved
            else "no checkpoint had been saved yet")
    restart = "restart the worker and " if cfg.executor == "remote" else ""
    raise TrainingError(f"{e}; stopped, {kept}: {restart}rerun the same command to "
                        "resume") from e
  finally:
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)


def _train_with_runtime(run: PreparedRun, checkpointer: Checkpointer, start_time: float,
                        show_progress: bool) -> dict:
  cfg, splits, info = run.config, run.splits, run.splits.info
  seed = cfg.seed
  # Seeded initial weights, taken before TFF builds anything (see _eager_model).
  initial = tff.learning.models.ModelWeights.from_model(models.build_model(cfg.model, info, seed=seed))
  initial = tff.learning.models.ModelWeights(
      trainable=[np.asarray(w) for w in initial.trainable],
      non_trainable=[np.asarray(w) for w in initial.non_trainable])
  federated_data = client_data_lib.make_federated_train_data(
      splits.train_images, splits.train_labels, run.partitions, info,
      batch_size=cfg.client_batch_size, epochs=cfg.client_epochs,
      seed=0 if seed is None else seed)
  tff_model = process_lib.make_functional_model(cfg.model, info,
                                                federated_data.element_type_structure, seed)
  learning_process, dp_choices = process_lib.build_learning_process(
      tff_model, run.dp, process_lib.OptimizerConfig(
          cfg.client_learning_rate, cfg.server_learning_rate, cfg.server_momentum))
  for key, value in dp_choices.items():
    _log(f"note: {key}={value}")
  # Clients build their datasets on the worker from their id, so no dataset
  # graph is serialised per client per round.
  learning_process = tff.simulation.compose_dataset_computation_with_learning_process(
      federated_data.dataset_computation, learning_process)

  state = learning_process.initialize()
  # Initial weights from the seeded Keras model, so a seeded run is reproducible.
  state = learning_process.set_model_weights(state, initial)
  sampler = ClientSampler(cfg.num_clients, cfg.clients_per_round, cfg.sampling, seed)
  ledger = accounting.PrivacyLedger(run.privacy) if run.privacy else None
  initial_weights = list(initial.trainable) + list(initial.non_trainable)
  program_state = {
      "learning_state": state, "round": 0, "sampler": sampler.get_state(),
      "ledger": ledger.to_json() if ledger else "",
      "best_round": 0, "best_val_auc": -1.0, "best_weights": initial_weights,
      "stopped_by_budget": False,
  }
  restored = checkpointer.load_latest(program_state)
  if restored is not None:
    round_num, loaded = restored
    program_state = dict(loaded)
    state = program_state["learning_state"]
    sampler.set_state(str(_py(program_state["sampler"])))
    if ledger:
      ledger = accounting.PrivacyLedger.from_json(str(_py(program_state["ledger"])))
    _log(f"note: resuming {cfg.run_dir} from the checkpoint after round {round_num}")
  round_num = int(_py(program_state["round"]))
  best = {"round": int(_py(program_state["best_round"])),
          "auc": float(_py(program_state["best_val_auc"])),
          "weights": [np.asarray(w) for w in program_state["best_weights"]]}
  stopped_by_budget = bool(_py(program_state["stopped_by_budget"]))
  metrics_log = MetricsLog(cfg.run_dir, resume_round=round_num)
  start_round = round_num
  last_saved = round_num

  def snapshot():
    return {"learning_state": state, "round": round_num, "sampler": sampler.get_state(),
            "ledger": ledger.to_json() if ledger else "", "best_round": best["round"],
            "best_val_auc": best["auc"], "best_weights": best["weights"],
            "stopped_by_budget": stopped_by_budget}

  progress = tqdm.tqdm(total=cfg.rounds, initial=round_num, desc="rounds", unit="round",
                       disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
  try:
    while round_num < cfg.rounds and not stopped_by_budget:
      # Compute the round; a signal here abandons it and undoes its client draw,
      # so the checkpoint never holds the sampler state of a round that did not run.
      sampler_state_before = sampler.get_state()
      try:
        participants = sampler.sample()
        if ledger and cfg.max_epsilon is not None:
          trial = accounting.PrivacyLedger.from_json(ledger.to_json())
          trial.record_round(participants)
          if trial.epsilon() > cfg.max_epsilon:
            sampler.set_state(sampler_state_before)
            stopped_by_budget = True
            _log(f"note: stopping before round {round_num + 1}: it would take epsilon above "
                 f"--max_epsilon={cfg.max_epsilon:g}")
            break
        t0 = time.time()
        output = learning_process.next(state, [str(i) for i in participants])
        new_state, metrics = output.state, output.metrics
        weights = learning_process.get_model_weights(new_state)
        _check_finite(round_num + 1, metrics, weights, participants,
                      run.partitions, cfg.client_epochs)
        if run.privacy and run.privacy.dp_mode == "central" and round_num == start_round:
          # What TFF's aggregator says it released must be what we account for.
          accounting.check_event_matches(
              run.privacy, tff_dp.extract_dp_event_from_state(new_state.aggregator))
        train_metrics = metrics["client_work"]["train"]
        row = {"round": round_num + 1, "clients": len(participants),
               "train_loss": float(train_metrics["loss"]) if len(participants) else None,
               "train_accuracy": float(train_metrics["accuracy"]) if len(participants) else None,
               "clip_norm": _clip_norm(metrics, run.dp),
               "delta": run.privacy.delta if run.privacy else None}
        new_best = None
        if (round_num + 1) % cfg.rounds_per_eval == 0 or round_num + 1 == cfg.rounds:
          val = evaluation.evaluate(_eager_model(cfg, info, weights), info,
                                    splits.val_images, splits.val_labels)
          row.update(val_accuracy=val["accuracy"], val_auc=val["auc"])
          if math.isfinite(val["auc"]) and val["auc"] > best["auc"]:
            new_best = {"round": round_num + 1, "auc": val["auc"], "weights": _flat(weights)}
        row["round_seconds"] = time.time() - t0
      except (_Stop, TrainingError):
        sampler.set_state(sampler_state_before)
        raise
      # Commit the round as a unit: state, ledger, metrics row and checkpoint agree.
      with _signals_deferred():
        state = new_state
        round_num += 1
        if ledger:
          ledger.record_round(participants)
          row["epsilon"] = ledger.epsilon()
        best = new_best or best
        metrics_log.write(row)
        if round_num % cfg.rounds_per_checkpoint == 0:
          checkpointer.save(snapshot(), round_num)
          last_saved = round_num
      progress.update(1)
      progress.set_postfix(_postfix(row), refresh=False)
  except _Stop as stop:
    progress.close()
    with _signals_deferred():
      if round_num > last_saved:
        checkpointer.save(snapshot(), round_num)
      metrics_log.close()
    _log(f"note: {stop} received: checkpoint saved after round {round_num}; rerun the same "
         "command to resume")
    sys.exit(128 + stop.signum)
  progress.close()
  metrics_log.close()
  if round_num > last_saved:
    checkpointer.save(snapshot(), round_num)

  # Model selection on val; the test split is used once, here, for the report.
  final_weights = best["weights"] if best["round"] > 0 else _flat(
      learning_process.get_model_weights(state))
  keras_model = _eager_model(cfg, info, final_weights)
  test = evaluation.evaluate(keras_model, info, splits.test_images, splits.test_labels)
  summary = {
      "config": cfg.to_json(),
      "dataset": info.to_json(),
      "rounds_completed": round_num,
      "selected_round": best["round"] or round_num,
      "best_val_auc": best["auc"] if best["round"] else None,
      "test_accuracy": test["accuracy"],
      "test_auc": test["auc"],
      "stopped_by_max_epsilon": stopped_by_budget,
      "wall_seconds": time.time() - start_time,
      "privacy": _privacy_summary(run, ledger),
  }
  if cfg.audit:
    from tff_dpmed.privacy import audit  # pylint: disable=g-import-not-at-top
    _log("note: running the membership-inference audit (train = members, test = non-members)")
    summary["audit"] = audit.membership_inference_audit(
        keras_model, info, splits.train_images, splits.train_labels,
        splits.test_images, splits.test_labels, seed=0 if cfg.seed is None else cfg.seed)
  summary["saved_model"] = artifacts.export_final_model(cfg.run_dir, keras_model, info, summary)
  write_json_atomic(os.path.join(cfg.run_dir, "summary.json"), summary)
  artifacts.save_final_weights(cfg.run_dir, keras_model)
  return summary


def _flat(weights: tff.learning.models.ModelWeights) -> list:
  return [np.asarray(w) for w in list(weights.trainable) + list(weights.non_trainable)]


def _eager_model(cfg: RunConfig, info, weights):
  """A freshly built Keras model holding `weights` (ModelWeights or a flat list).

  Always a new model: Keras swaps its layer classes between v1 and v2 globally
  whenever one is constructed, and TFF constructs Keras objects (e.g. metrics)
  in v1 graphs, which breaks older eager models. Constructing one eagerly
  swaps the classes it uses back.
  """
  model = models.build_model(cfg.model, info)
  if isinstance(weights, tff.learning.models.ModelWeights):
    weights.assign_weights_to(model)
  else:
    n = len(model.trainable_weights)
    tff.learning.models.ModelWeights(weights[:n], weights[n:]).assign_weights_to(model)
  return model


def _privacy_summary(run: PreparedRun, ledger) -> dict:
  if ledger is None:
    return {"dp_mode": "none", "epsilon": None, "delta": None,
            "guarantee": "none: no differential privacy"}
  p = run.privacy
  return {"dp_mode": p.dp_mode, "epsilon": ledger.epsilon(), "delta": p.delta,
          "noise_multiplier": p.noise_multiplier, "accountant": accounting.resolve_accountant(p),
          "sampling": p.sampling, "privacy_unit": "client",
          "clipped_count_stddev": p.clipped_count_stddev, "rounds_accounted": ledger.rounds}


def _postfix(row: dict) -> dict:
  out = {}
  for key, short in (("train_loss", "loss"), ("train_accuracy", "acc"), ("val_auc", "val_auc"),
                     ("epsilon", "eps")):
    if isinstance(row.get(key), float) and math.isfinite(row[key]):
      out[short] = f"{row[key]:.3f}"
  return out


def _py(value):
  """Checkpointed scalars come back as numpy values or bytes."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, np.generic):
    return value.item()
  return value
