"""The round loop: sample, run a round, account, evaluate, commit, checkpoint.

After `tff.learning.programs.train_model`: everything the loop touches is
injected (the process, the sampler, the ledger, the checkpoint and metrics
managers, an evaluation function and test hooks), and its state is one typed
`ProgramState`.

Each round commits as a unit with SIGINT/SIGTERM held back: the ledger
records the round (and is persisted) before anything of the round is written,
so every executed round is accounted, including one re-run after a crash.
"""

import contextlib
import dataclasses
import math
import signal
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import tqdm

from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.mechanisms import Mechanism
from tff_dpmed.program.checkpoints import Checkpointer
from tff_dpmed.program.metrics_log import MetricsLog
from tff_dpmed.program.sampling import ClientSampler


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. non-finite weights); the last good checkpoint is kept."""


class Stop(Exception):
  """Raised from a signal handler so the loop can checkpoint before exiting."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def raise_stop(signum, frame):
  del frame
  raise Stop(signum)


@contextlib.contextmanager
def signals_deferred():
  """Holds SIGINT/SIGTERM until the block ends, so it runs as a unit."""
  blocked = {signal.SIGINT, signal.SIGTERM}
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclasses.dataclass
class ProgramState:
  """What a checkpoint holds; `tree()` is the structure the state manager saves."""
  learning_state: Any
  round: int
  sampler: str
  best_round: int = 0
  best_val_auc: float = -1.0
  best_weights: list = dataclasses.field(default_factory=list)
  stopped_by_budget: bool = False

  def tree(self) -> dict:
    return dataclasses.asdict(self) | {"learning_state": self.learning_state}

  @classmethod
  def from_tree(cls, tree: dict) -> "ProgramState":
    return cls(learning_state=tree["learning_state"], round=int(_py(tree["round"])),
               sampler=str(_py(tree["sampler"])), best_round=int(_py(tree["best_round"])),
               best_val_auc=float(_py(tree["best_val_auc"])),
               best_weights=[np.asarray(w) for w in tree["best_weights"]],
               stopped_by_budget=bool(_py(tree["stopped_by_budget"])))


@dataclasses.dataclass
class RoundHooks:
  """Points where a test (or a tool) can act inside the loop; no-ops by default."""
  before_sample: Callable[[int, ClientSampler], None] = lambda r, sampler: None
  after_sample: Callable[[int, np.ndarray], None] = lambda r, ids: None
  before_next: Callable[[int, Any], Any] = lambda r, learning_state: learning_state
  after_evaluate: Callable[[int], None] = lambda r: None


@dataclasses.dataclass
class LoopSettings:
  rounds: int
  rounds_per_eval: int
  rounds_per_checkpoint: int
  max_epsilon: Optional[float]
  # Per-round values that are not DP releases (train loss and accuracy, cohort
  # size, round time): written only when they protect nothing anyway.
  write_unaccounted_metrics: bool


@dataclasses.dataclass
class LoopParts:
  process: Any                      # the learning process, data composed in
  sampler: ClientSampler
  ledger: PrivacyLedger
  mechanism: Mechanism
  checkpointer: Checkpointer
  metrics_log: MetricsLog
  evaluate: Callable[[Any], dict]   # model weights -> {"accuracy", "auc"} on val
  check_finite: Callable[[int, Any, Any, np.ndarray], None]
  save_ledger: Callable[[PrivacyLedger], None]
  # Runtime upkeep between rounds (the round just committed), e.g. replacing a
  # local worker whose memory has grown; it releases nothing.
  between_rounds: Callable[[int], None] = lambda round_num: None


def run_rounds(state: ProgramState, parts: LoopParts, settings: LoopSettings,
               hooks: RoundHooks = RoundHooks(), show_progress: bool = True) -> ProgramState:
  """Runs rounds until `settings.rounds` or the epsilon budget; returns the last state.

  Raises:
    Stop: On SIGINT/SIGTERM, after checkpointing the last committed round.
    TrainingError: If a round's model is not finite (nothing of it is kept).
  """
  last_saved = state.round
  event_verified = False
  watch = DivergenceWatch()
  progress = tqdm.tqdm(total=settings.rounds, initial=state.round, desc="rounds", unit="round",
                       disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
  try:
    while state.round < settings.rounds and not state.stopped_by_budget:
      parts.between_rounds(state.round)
      sampler_before = parts.sampler.get_state()
      try:
        hooks.before_sample(state.round + 1, parts.sampler)
        participants = parts.sampler.sample()
        # Canary clients (the canary audit) take part in the round but are no
        # participants: the ledger, the cohort size and the metrics never see them.
        canaries = parts.sampler.sample_canaries()
        hooks.after_sample(state.round + 1, participants)
        if _over_budget(parts.ledger, participants, settings.max_epsilon):
          parts.sampler.set_state(sampler_before)
          state.stopped_by_budget = True
          print(f"note: stopping before round {state.round + 1}: it would take epsilon above "
                f"--max_epsilon={settings.max_epsilon:g}", file=sys.stderr, flush=True)
          break
        t0 = time.time()
        learning_state = hooks.before_next(state.round + 1, state.learning_state)
        output = parts.process.next(learning_state,
                                    [str(i) for i in [*participants, *canaries]])
        # Executed: the round's noise has been drawn, so it is accounted now,
        # whatever happens next (a crash before the commit included).
        with signals_deferred():
          parts.ledger.record_round(participants)
          parts.save_ledger(parts.ledger)
        # What get_model_weights computes (TFF's compose_learning_process), without a
        # second call that sends the whole state to the worker and back (LEVERS.md).
        weights = output.state.global_model_weights
        parts.check_finite(state.round + 1, output.metrics, weights, participants)
        if not event_verified:
          # What the aggregator says it released must be what the ledger accounts.
          parts.mechanism.verify_recorded_event(output.state.aggregator)
          event_verified = True
        row = _round_row(state.round + 1, output.metrics, participants, parts, settings)
        new_best = None
        if _evaluates(state.round + 1, settings):
          val = parts.evaluate(weights)
          hooks.after_evaluate(state.round + 1)
          row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_auc=val["auc"])
          if math.isfinite(val["auc"]) and val["auc"] > state.best_val_auc:
            new_best = (state.round + 1, val["auc"], flat_weights(weights))
        if settings.write_unaccounted_metrics:
          row["round_seconds"] = time.time() - t0
      except (Stop, TrainingError):
        parts.sampler.set_state(sampler_before)
        raise
      with signals_deferred():
        state.learning_state = output.state
        state.round += 1
        state.sampler = parts.sampler.get_state()
        if parts.mechanism.states_guarantee:
          row["epsilon"] = parts.ledger.epsilon()
          row["client_epsilon"] = parts.ledger.client_level_epsilon()
        if new_best:
          state.best_round, state.best_val_auc, state.best_weights = new_best
        # Checkpoint before the round's metrics go out: a round released with
        # no checkpoint after it would be re-run on resume, and DP-FTRL's tree
        # would re-run it with the same noise (its seeds are in the state).
        if state.round % settings.rounds_per_checkpoint == 0:
          parts.checkpointer.save(state.tree(), state.round)
          last_saved = state.round
        parts.metrics_log.write(row)
      progress.update(1)
      progress.set_postfix(_postfix(row), refresh=False)
      for warning in watch.check(row):
        progress.write(warning, file=sys.stderr)
  except Stop:
    progress.close()
    with signals_deferred():
      if state.round > last_saved:
        parts.checkpointer.save(state.tree(), state.round)
    raise
  progress.close()
  if state.round > last_saved:
    parts.checkpointer.save(state.tree(), state.round)
  return state


class DivergenceWatch:
  """One warning line when the released model's val loss, or the clip norm, runs away.

  Both are released values (the val loss is post-processing of the DP model,
  the adaptive clip norm comes from the noised count), so watching them leaks
  nothing. Compared with the best seen so far; each kind warns once.
  """

  LOSS_FACTOR = 3.0
  CLIP_FACTOR = 10.0

  def __init__(self):
    self._best = {}
    self._warned = set()

  def check(self, row: dict) -> list[str]:
    warnings = []
    for key, factor, what in (("val_loss", self.LOSS_FACTOR, "val loss"),
                              ("clip_norm", self.CLIP_FACTOR, "clip norm")):
      value = row.get(key)
      if not isinstance(value, float) or key in self._warned:
        continue
      best = self._best.get(key)
      if not math.isfinite(value):
        self._warned.add(key)
        warnings.append(f"warning: round {row['round']}: {what} is not finite: training is "
                        "diverging; lower --server_learning_rate or --server_momentum")
      elif best is not None and value > factor * best:
        self._warned.add(key)
        warnings.append(
            f"warning: round {row['round']}: {what} {value:.4g} is over {factor:g}x its "
            f"lowest so far ({best:.4g}): training is diverging; lower "
            "--server_learning_rate or --server_momentum (or use --clip_mode=fixed)")
      if math.isfinite(value):
        self._best[key] = value if best is None else min(best, value)
    return warnings


def _over_budget(ledger: PrivacyLedger, participants, max_epsilon: Optional[float]) -> bool:
  if max_epsilon is None:
    return False
  trial = PrivacyLedger.from_json(ledger.to_json())
  trial.record_round(participants)
  return trial.epsilon() > max_epsilon


def _evaluates(round_num: int, settings: LoopSettings) -> bool:
  return round_num % settings.rounds_per_eval == 0 or round_num == settings.rounds


def _round_row(round_num: int, metrics, participants, parts: LoopParts,
               settings: LoopSettings) -> dict:
  row = {"round": round_num,
         "clip_norm": parts.mechanism.clip_norm(metrics.get("aggregator", {})),
         "delta": parts.ledger.spec.delta if parts.mechanism.states_guarantee else None}
  if settings.write_unaccounted_metrics:
    train = metrics["client_work"]["train"]
    row.update(clients=len(participants),
               train_loss=float(train["loss"]) if len(participants) else None,
               train_accuracy=float(train["accuracy"]) if len(participants) else None)
  return row


def flat_weights(weights) -> list:
  return [np.asarray(w) for w in list(weights.trainable) + list(weights.non_trainable)]


def _postfix(row: dict) -> dict:
  out = {}
  for key, short in (("train_loss", "loss"), ("train_accuracy", "acc"), ("val_auc", "val_auc"),
                     ("epsilon", "eps"), ("client_epsilon", "client_eps")):
    if isinstance(row.get(key), float) and math.isfinite(row[key]):
      out[short] = f"{row[key]:.3f}"
  return out


def _py(value):
  """Checkpointed scalars come back as numpy values or bytes."""
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value.item()
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bytes):
    value = value.decode()
  return value
