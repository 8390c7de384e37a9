"""The training program: prepare (validate everything), then train and report.

`prepare` reads and checks all input before anything is written, so bad input
never leaves a half-made run folder. `train` takes the run folder (locked
against a second run), resumes what it holds only if the privacy settings and
the data are the ones its ledger accounts for, owns the TFF runtime, runs the
round loop (`loop.run_rounds`), and writes summary.json and the SavedModel.
"""

import collections
import contextlib
import dataclasses
import math
import os
import signal
import shutil
import sys
import time
from typing import Callable, Optional

import numpy as np
import tensorflow_federated as tff

from tff_dpmed import models
from tff_dpmed.data import canary_examples
from tff_dpmed.data import client_data as client_data_lib
from tff_dpmed.data import partition as partition_lib
from tff_dpmed.data import registry as data_registry
from tff_dpmed.data.types import ImageSplits
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import canaries as canaries_lib
from tff_dpmed.federated import context
from tff_dpmed.federated import process as process_lib
from tff_dpmed.files import write_json_atomic
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import calibration
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.budget import BudgetLedger
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.spec import DPMode, default_delta
from tff_dpmed.program import artifacts
from tff_dpmed.program import canary_audit
from tff_dpmed.program import evaluation
from tff_dpmed.program import loop
from tff_dpmed.program import run_dir as run_dir_lib
from tff_dpmed.program.config import RunConfig
from tff_dpmed.program.metrics_log import MetricsLog
from tff_dpmed.program.sampling import ClientSampler

TrainingError = loop.TrainingError
RoundHooks = loop.RoundHooks


@dataclasses.dataclass
class PreparedRun:
  config: RunConfig               # with the noise multiplier resolved
  splits: ImageSplits
  partitions: list
  mechanism: mechanisms.Mechanism
  notes: list                     # what was chosen for the user, and why
  budget: Optional[BudgetLedger] = None
  # --audit=canary with --dp_mode=example: the canary examples; the included ones
  # are already in `partitions`, after the real training examples.
  example_canaries: Optional[canary_examples.CanaryExamples] = None


# A local worker holding more than this share of the machine's memory is replaced
# between rounds (patients as clients: it grew ~1.2 GB per round of 256 clients).
WORKER_MEMORY_FRACTION = 0.4


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def prepare(cfg: RunConfig) -> PreparedRun:
  """Validates flags and data and resolves derived settings; writes nothing."""
  if cfg.model not in models.MODEL_NAMES:
    raise UsageError(f"unknown model '{cfg.model}': use one of {', '.join(models.MODEL_NAMES)}")
  run_dir_lib.check_writable(cfg.output_dir, cfg.run_dir)
  _check_runtime(cfg)
  splits = data_registry.load_dataset(cfg.dataset, image_size=cfg.image_size,
                                      data_dir=cfg.data_dir, download=cfg.download,
                                      seed=cfg.seed or 0)
  seed = 0 if cfg.seed is None else cfg.seed
  if cfg.partition == "iid":
    partitions = partition_lib.partition_iid(len(splits.train_labels), cfg.num_clients, seed)
  elif cfg.partition == "per_example":
    partitions = partition_lib.partition_per_example(len(splits.train_labels), cfg.num_clients)
  else:
    partitions = partition_lib.partition_dirichlet(splits.train_labels, cfg.num_clients,
                                                   cfg.dirichlet_alpha, seed)
  notes = []
  spec = cfg.dp
  example_canaries = canary_audit.example_canaries(cfg, splits.train_labels)
  if example_canaries is not None:
    # Canaries are examples like any other: in their hospital's size, so accounted.
    partitions = canary_examples.extend_partitions(partitions, len(splits.train_labels),
                                                   example_canaries)
    notes.append(f"canary audit: {example_canaries.count} gradient canary examples, each "
                 "trained on with probability 1/2")
  if spec.mode is DPMode.EXAMPLE:
    _check_example_level(cfg)
    # The hospitals' sizes fix each one's sampling rate and step count.
    spec = dataclasses.replace(spec, client_sizes=tuple(len(p) for p in partitions))
    cfg = dataclasses.replace(cfg, dp=spec)
  if spec.mode is not DPMode.NONE:
    accounting.check_accountant(spec)
    if cfg.target_epsilon is not None:
      spec = calibration.calibrate(spec, cfg.rounds, cfg.target_epsilon)
      notes.append(f"noise_multiplier={spec.noise_multiplier:.4f}: the smallest that keeps "
                   f"epsilon <= {cfg.target_epsilon:g} after {cfg.rounds} rounds")
      cfg = dataclasses.replace(cfg, dp=spec)
    unit = mechanisms.for_spec(spec).privacy_unit
    units = sum(spec.client_sizes) if unit == "example" else spec.num_clients
    notes.append(f"delta={spec.delta:g}" + (
        f" (default: below 1/N for N={units} {unit}s, the privacy unit)"
        if spec.delta == default_delta(units) else ""))
    if spec.delta >= 1 / units:
      _log(f"warning: --delta={spec.delta:g} >= 1/{units} {unit}s: such a delta allows "
           f"publishing a whole {unit}'s data; use a smaller --delta")
    notes.append(f"accountant={accounting.resolve_accountant(spec)}, "
                 f"sampling={spec.sampling.value}")
  budget = BudgetLedger(cfg.budget_ledger) if cfg.budget_ledger else None
  return PreparedRun(cfg, splits, partitions, mechanisms.for_spec(spec), notes, budget,
                     example_canaries)


def _check_example_level(cfg: RunConfig) -> None:
  """What example-level DP cannot do (yet), before anything is written."""
  if cfg.debug_metrics:
    raise UsageError("--debug_metrics is not available with --dp_mode=example: the DP-SGD "
                     "client work releases nothing but its noised update; drop the flag")
  if cfg.budget_ledger:
    raise UsageError("--budget_ledger does not compose example-level runs yet (their epsilon "
                     "is a maximum over client sizes, not one event): drop it and add the "
                     "runs' epsilons up by hand (basic composition)")


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
      log_dir=cfg.run_dir, binary=cfg.worker_binary, insecure=cfg.insecure_local_executor,
      concurrent_clients=concurrent_clients(cfg),
      # The worker loads (a second or more) while the process is built: see wait_ready.
      wait=False)


def concurrent_clients(cfg: RunConfig) -> float:
  """The TFF client computations a round runs (expected): clients, or their packs."""
  if cfg.packs_clients:
    return math.ceil(cfg.clients_per_round / PATIENTS_PER_PACK)
  return cfg.clients_per_round


def train(run: PreparedRun, show_progress: bool = True,
          hooks: loop.RoundHooks = loop.RoundHooks()) -> dict:
  """Runs (or resumes) the training program and returns the summary."""
  cfg = run.config
  with run_dir_lib.RunFolder(cfg, run.splits, run.budget) as folder:
    for note in run.notes:
      _log(f"note: {note}")
    start_time = time.time()
    previous = {s: signal.signal(s, loop.raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      with _runtime(cfg) as runtime, _client_files(run) as client_files:
        return _train_with_runtime(run, folder, start_time, show_progress, hooks, client_files,
                                   runtime)
    except context.WorkerError as e:
      # Nothing of the failed round was committed; the checkpoints are as they were.
      saved = folder.checkpointer.versions()
      kept = (f"the checkpoint after round {saved[-1]} is kept" if saved
              else "no checkpoint had been saved yet")
      restart = "restart the worker and " if cfg.executor == "remote" else ""
      raise TrainingError(f"{e}; stopped, {kept}: {restart}rerun the same command to "
                          "resume") from e
    except loop.Stop as stop:
      _log(f"note: {stop} received: checkpoint saved after round "
           f"{(folder.checkpointer.versions() or [0])[-1]}; rerun the same command to resume")
      sys.exit(128 + stop.signum)
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)


def _initial_weights(cfg: RunConfig, info) -> tff.learning.models.ModelWeights:
  # Seeded initial weights, taken before TFF builds anything (see _eager_model).
  initial = tff.learning.models.ModelWeights.from_model(
      models.build_trainable(cfg.model, info, seed=cfg.seed))
  return tff.learning.models.ModelWeights(
      trainable=[np.asarray(w) for w in initial.trainable],
      non_trainable=[np.asarray(w) for w in initial.non_trainable])


CLIENT_FILES = "client_data.tmp"
# One-example clients per TFF client with --client_packing (benchmarks/bench_patients.py).
PATIENTS_PER_PACK = 64


@contextlib.contextmanager
def _client_files(run: PreparedRun):
  """A private folder from which the local worker reads the clients' data, or None
  where the data go in the computation (remote workers need not share this
  machine's file system).

  It lives in the (locked) run folder, mode 0700, and is removed when the run
  ends; a run killed before that leaves it there, and the next run in the
  folder replaces it, so no copy of the data is left elsewhere.
  """
  if run.config.executor != "local":
    yield None
    return
  path = os.path.join(run.config.run_dir, CLIENT_FILES)
  shutil.rmtree(path, ignore_errors=True)
  os.mkdir(path, 0o700)
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _worker_memory_guard(runtime) -> Callable[[int], None]:
  """Between rounds, replaces a local worker that holds over WORKER_MEMORY_FRACTION of
  this machine's memory (its memory grows with the client calls it has served)."""
  if not isinstance(runtime, context.LocalRuntime):
    return lambda round_num: None
  limit = WORKER_MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

  def check(round_num: int) -> None:
    held = runtime.rss_bytes()
    if held > limit:
      runtime.recycle()
      _log(f"note: the TFF worker held {held / 2**30:.1f} GiB after round {round_num}, over "
           f"{WORKER_MEMORY_FRACTION:.0%} of this machine's memory: replaced it with a fresh "
           "one (it keeps nothing between rounds)")
  return check


def _train_with_runtime(run: PreparedRun, folder: "run_dir_lib.RunFolder", start_time: float,
                        show_progress: bool, hooks: loop.RoundHooks,
                        client_files: Optional[str] = None, runtime=None) -> dict:
  cfg, splits, info, mechanism = run.config, run.splits, run.splits.info, run.mechanism
  canary_audit.save_example_secret(cfg, run.example_canaries)
  initial = _initial_weights(cfg, info)
  federated_data = client_datasets(run, client_files, initial)
  process, release_client_metrics = build_process(run, federated_data)
  if isinstance(runtime, context.LocalRuntime):
    runtime.wait_ready()  # Started without waiting (_runtime); nothing executed before here.
  for key, value in mechanism.noise_choices().items():
    _log(f"note: {key}={value}")
  if cfg.packs_clients:
    _log(f"note: client_packing: each round's sampled clients go to TFF in packs of up to "
         f"{PATIENTS_PER_PACK}, each client's update clipped on its own inside its pack "
         "(the same release; --client_packing=off sends them one by one)")
  elif cfg.partition == "per_example" and cfg.client_packing == "auto":
    _log(f"note: client_packing: off, {cfg.packing_obstacle()}: every one-example client "
         "is its own TFF client (slower)")
  learning_state = process.set_model_weights(process.initialize(), initial)
  sampler = make_sampler(cfg)
  state = loop.ProgramState(learning_state=learning_state, round=0,
                            sampler=sampler.get_state(),
                            best_weights=list(initial.trainable) + list(initial.non_trainable))
  state, ledger = folder.restore(state, PrivacyLedger(mechanism.spec))
  sampler.set_state(state.sampler)
  audit_start = None
  if cfg.audit == "canary":
    audit_start = canary_audit.initial_trainable(cfg.run_dir, initial.trainable,
                                                 resumed=state.round > 0)
  # A feature model's val features are computed once; each evaluation runs its head.
  val_inputs = _model_inputs(cfg, info, splits.val_images, "val")
  parts = loop.LoopParts(
      process=process, sampler=sampler, ledger=ledger, mechanism=mechanism,
      checkpointer=folder.checkpointer, metrics_log=MetricsLog(cfg.run_dir, state.round),
      evaluate=lambda weights: evaluation.evaluate(
          _eager_model(cfg, info, weights, trainable_only=True), info, val_inputs,
          splits.val_labels),
      check_finite=_check_finite_for(release_client_metrics, run.partitions, cfg.client_epochs),
      save_ledger=folder.save_ledger, between_rounds=_worker_memory_guard(runtime))
  settings = loop.LoopSettings(
      rounds=cfg.rounds, rounds_per_eval=cfg.rounds_per_eval,
      # DP-FTRL: every released round is checkpointed, so a resume never re-runs
      # a released round with the tree's noise again (loop.run_rounds).
      rounds_per_checkpoint=1 if mechanism.state_holds_noise_seed else cfg.rounds_per_checkpoint,
      max_epsilon=cfg.max_epsilon,
      write_unaccounted_metrics=release_client_metrics)
  try:
    state = loop.run_rounds(state, parts, settings, hooks, show_progress)
  finally:
    parts.metrics_log.close()
  summary = _finish(run, process, state, ledger, time.time() - start_time, audit_start)
  if mechanism.state_holds_noise_seed:
    # The checkpoints could replay the noise (mechanisms.CentralTreeFTRL); the
    # run is over, so nothing needs them.
    folder.checkpointer.remove_all()
    _log("note: checkpoints deleted: they hold the tree aggregator's noise seeds")
  return summary


def client_datasets(run: PreparedRun, folder: Optional[str] = None,
                    initial: Optional[tff.learning.models.ModelWeights] = None):
  """The clients' train data as the mechanism reads it: local batches, packs of
  one-example clients (--client_packing), or (DP-SGD, which samples its own
  batches) each client's examples whole; from files in `folder` if given.
  `initial`: the model's weights, if built already (canary examples need its size)."""
  cfg, splits, info = run.config, run.splits, run.splits.info
  images, labels, canary = splits.train_images, splits.train_labels, None
  if run.example_canaries is not None:
    if initial is None:
      initial = _initial_weights(cfg, info)
    num_parameters = sum(int(np.size(w)) for w in initial.trainable)
    images, labels, canary = canary_examples.training_arrays(
        images, labels, run.example_canaries, info, num_parameters)
  train_inputs = _model_inputs(cfg, info, images, "train")
  if cfg.packs_clients:
    return client_data_lib.make_packed_client_data(train_inputs, labels, run.partitions, info,
                                                   folder=folder)
  if run.mechanism.samples_batches_itself:
    return client_data_lib.make_whole_client_data(
        train_inputs, labels, run.partitions, info, folder=folder, canary=canary)
  return client_data_lib.make_federated_train_data(
      train_inputs, labels, run.partitions, info,
      batch_size=cfg.client_batch_size, epochs=cfg.client_epochs,
      seed=0 if cfg.seed is None else cfg.seed, folder=folder)


def _model_inputs(cfg: RunConfig, info, images: np.ndarray, split: str) -> np.ndarray:
  """The images, or for a model with a fixed feature stage their features,
  computed once here: the stage looks at no data, so it costs no privacy."""
  stage = models.feature_stage(cfg.model, info)
  if stage is None:
    return images
  start = time.time()
  features = stage.transform(images)
  _log(f"note: {cfg.model}: features {features.shape[1:]} of {len(features)} {split} images "
       f"computed in {time.time() - start:.1f} s")
  return features


def make_sampler(cfg: RunConfig) -> ClientSampler:
  """Client sampling as the accountant assumes it, seeded only where that protects nothing;
  with --audit=canary, the canaries' own sampling beside it."""
  return ClientSampler(cfg.num_clients, cfg.clients_per_round, cfg.dp.sampling.value,
                       seed=run_dir_lib.sampling_seed(cfg), num_canaries=cfg.canary_clients)


def build_process(run: PreparedRun, federated_data):
  """The learning process with the clients' data composed in, and whether it
  releases per-client train metrics (only without DP, or with --debug_metrics)."""
  cfg, info, mechanism = run.config, run.splits.info, run.mechanism
  element_type = federated_data.element_type_structure
  if mechanism.samples_batches_itself or cfg.packs_clients:
    element_type = client_data_lib.any_client_size(element_type)
  # The model sees (x, y) batches; DP-SGD's client element also carries the client id.
  input_spec = collections.OrderedDict(x=element_type["x"], y=element_type["y"])
  keras_model = models.build_trainable(cfg.model, info, seed=cfg.seed)
  tff_model = process_lib.make_functional_model(cfg.model, info, input_spec,
                                                keras_model=keras_model)
  # Per-client train metrics are plain sums outside any DP mechanism: in DP
  # modes they are not released unless --debug_metrics asks for them.
  release_client_metrics = not mechanism.states_guarantee or cfg.debug_metrics
  canaries = canary_audit.plan_for(cfg)
  process = process_lib.build_learning_process(
      tff_model, mechanism, process_lib.OptimizerConfig(
          cfg.client_learning_rate, cfg.server_learning_rate, cfg.server_momentum),
      release_client_metrics=release_client_metrics, client_element_type=element_type,
      canaries=canaries, packed=cfg.packs_clients, keras_model=keras_model,
      loss=models.loss_for(info))
  if canaries is not None:
    # Canary ids get no data and a marker (federated/canaries.py).
    return (canaries_lib.compose_client_data(federated_data, canaries, process),
            release_client_metrics)
  # Clients build their datasets on the worker from their id, so no dataset
  # graph is serialised per client per round.
  process = tff.simulation.compose_dataset_computation_with_learning_process(
      federated_data.dataset_computation, process)
  if cfg.packs_clients:
    process = process_lib.PackingProcess(process, PATIENTS_PER_PACK)
  return process, release_client_metrics


def _check_finite_for(client_metrics_released: bool, partitions, epochs):
  """Stops on a non-finite model; without DP, also on client updates TFF dropped.

  TFF zeroes a client's non-finite update and discards its metrics, so a
  diverging client only shows as missing examples in the round's count. That
  count is a per-client release, so DP runs do not have it and look only at
  the released (noised) model.
  """

  def check(round_num, metrics, weights, participants) -> None:
    weights_finite = all(np.all(np.isfinite(w)) for w in weights.trainable)
    detail = f"weights finite: {weights_finite}"
    healthy = weights_finite
    if client_metrics_released:
      train = metrics["client_work"]["train"]
      expected = epochs * sum(len(partitions[i]) for i in participants)
      seen = int(train["num_examples"]) if len(participants) else 0
      loss = float(train["loss"]) if len(participants) else 0.0
      healthy = healthy and np.isfinite(loss) and seen >= expected
      detail = (f"{expected - seen} of {expected} client examples came from non-finite updates"
                if seen < expected else f"loss={loss}, {detail}")
    if not healthy:
      raise TrainingError(
          f"round {round_num} produced a non-finite model update or loss ({detail}); stopped, "
          "the last good checkpoint is kept: lower --client_learning_rate or "
          "--server_learning_rate")

  return check


def _finish(run: PreparedRun, process, state: loop.ProgramState, ledger: PrivacyLedger,
            wall_seconds: float, audit_start: Optional[list] = None) -> dict:
  """Model selection on val; the test split is used once, here, for the report.

  `audit_start`: with --audit=canary, the trainable weights training started from.
  """
  cfg, splits, info = run.config, run.splits, run.splits.info
  final_weights = state.best_weights if state.best_round > 0 else loop.flat_weights(
      process.get_model_weights(state.learning_state))
  keras_model = _eager_model(cfg, info, final_weights)
  test = evaluation.evaluate(keras_model, info, splits.test_images, splits.test_labels)
  summary = {
      "config": cfg.to_json(),
      "dataset": info.to_json(),
      "rounds_completed": state.round,
      "selected_round": state.best_round or state.round,
      "best_val_auc": state.best_val_auc if state.best_round else None,
      "test_accuracy": test["accuracy"],
      "test_auc": test["auc"],
      "stopped_by_max_epsilon": state.stopped_by_budget,
      "wall_seconds": wall_seconds,
      "privacy": _privacy_summary(run.mechanism, ledger),
  }
  if not np.isfinite(test["auc"]):
    summary["test_auc_note"] = "undefined: the test split has fewer than two classes"
  if run.example_canaries is not None:
    _log(f"note: running the canary audit ({run.example_canaries.count} canary examples, "
         f"{int(run.example_canaries.included.sum())} of them trained on, final model only)")
    summary["audit"] = canary_audit.example_audit(
        run.example_canaries, audit_start, final_weights[:len(audit_start)],
        summary["privacy"]["epsilon"], run.mechanism.spec.delta)
  elif cfg.audit == "canary":
    _log(f"note: running the canary audit ({cfg.canary_count} canaries, final model only)")
    summary["audit"] = canary_audit.audit(
        canary_audit.plan_for(cfg), audit_start, final_weights[:len(audit_start)],
        summary["privacy"]["epsilon"], run.mechanism.spec.delta, run.mechanism.spec.mode)
  if cfg.audit == "mia":
    from tff_dpmed.program import audit  # TF Privacy's attacks take seconds to import.
    _log("note: running the membership-inference audit (train = members, test = non-members)")
    summary["audit"] = audit.membership_inference_audit(
        keras_model, info, splits.train_images, splits.train_labels,
        splits.test_images, splits.test_labels, seed=0 if cfg.seed is None else cfg.seed)
  summary["saved_model"] = artifacts.export_final_model(cfg.run_dir, keras_model, info, summary)
  write_json_atomic(os.path.join(cfg.run_dir, "summary.json"), summary)
  artifacts.save_final_weights(cfg.run_dir, keras_model)
  return summary


def _eager_model(cfg: RunConfig, info, weights, trainable_only: bool = False):
  """A freshly built Keras model holding `weights` (ModelWeights or a flat list);
  with `trainable_only`, only the part trained in TFF (a feature model's head).

  Always a new model: Keras swaps its layer classes between v1 and v2 globally
  whenever one is constructed, and TFF constructs Keras objects (e.g. metrics)
  in v1 graphs, which breaks older eager models. Constructing one eagerly
  swaps the classes it uses back.
  """
  model = (models.build_trainable if trainable_only else models.build_model)(cfg.model, info)
  if isinstance(weights, tff.learning.models.ModelWeights):
    weights.assign_weights_to(model)
  else:
    n = len(model.trainable_weights)
    tff.learning.models.ModelWeights(weights[:n], weights[n:]).assign_weights_to(model)
  return model


def _privacy_summary(mechanism: mechanisms.Mechanism, ledger: PrivacyLedger) -> dict:
  spec = mechanism.spec
  if not mechanism.states_guarantee:
    return {"dp_mode": "none", "epsilon": None, "delta": None,
            "guarantee": "none: no differential privacy"}
  return {"dp_mode": spec.mode.value, "epsilon": ledger.epsilon(), "delta": spec.delta,
          "noise_multiplier": spec.noise_multiplier,
          "accountant": accounting.resolve_accountant(spec), "sampling": spec.sampling.value,
          "privacy_unit": mechanism.privacy_unit,
          "clipped_count_stddev": spec.count_stddev if spec.adaptive else None,
          "amplified_by_sampling": mechanism.amplified,
          "rounds_accounted": ledger.rounds} | _client_level_summary(mechanism, ledger)


def _client_level_summary(mechanism: mechanisms.Mechanism, ledger: PrivacyLedger) -> dict:
  """The second guarantee of example-level runs with --client_dp=central."""
  inner = mechanism.client_level()
  if inner is None:
    return {}
  return {"client_level": {
      "epsilon": ledger.client_level_epsilon(), "delta": ledger.client_level_delta,
      "privacy_unit": inner.privacy_unit, "noise_multiplier": inner.spec.noise_multiplier,
      "clip": inner.spec.clip, "sampling": inner.spec.sampling.value,
      "accountant": accounting.resolve_accountant(inner.spec),
      "amplified_by_sampling": inner.amplified}}
