"""--audit=canary in the training program: the canaries' plan, and the audit of the final model.

Client level (central, local, none): the plan (`plan_for`) says which client
ids are canaries and what they send (`federated.canaries`); the trainer
inserts them, and after training `audit` compares the released model's delta
with the canaries' directions, against the exact null of directions never
inserted (`privacy.canary_estimate`).

Example level (`--dp_mode=example`): gradient canary examples
(`data.canary_examples`), drawn from a secret kept in the run folder, each in
the training data with probability 1/2; after training `example_audit` reads
their coordinates of the released model's change and bounds epsilon from
below (`privacy.one_run_audit`).

README "Reading the canary audit" says how to read the results.
"""

import io
import os
import secrets
from typing import Optional, Sequence

import numpy as np

from tff_dpmed import files
from tff_dpmed.data import canary_examples
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import canaries as canaries_lib
from tff_dpmed.privacy import canary_estimate
from tff_dpmed.privacy import one_run_audit
from tff_dpmed.privacy.spec import DPMode
from tff_dpmed.program.config import RunConfig
from tff_dpmed.program.run_dir import CANARY_EXAMPLES_SECRET, CANARY_INITIAL_WEIGHTS

# With adaptive clipping the clip norm moves, so canaries are sent far above
# any clip norm and the aggregator clips each to exactly the round's clip, as
# it does the largest real update. (They then count as clipped in the
# clip-norm estimate, nudging the clip up: the price of worst-case canaries.)
ALWAYS_CLIPPED_NORM = 1e6
# Directions drawn at once when computing cosines (memory: this many x the model size).
_BATCH = 32


def canary_norm(cfg: RunConfig) -> float:
  """The L2 norm of a canary update: --canary_norm, else the clip norm as a real update
  reaches the noise with (see ALWAYS_CLIPPED_NORM); without DP, --clip as a reference size."""
  if cfg.canary_norm is not None:
    return float(cfg.canary_norm)
  return ALWAYS_CLIPPED_NORM if cfg.dp.adaptive else float(cfg.dp.clip)


def plan_for(cfg: RunConfig) -> Optional[canaries_lib.CanaryPlan]:
  """The canaries of `cfg`, or None without --audit=canary.

  Canary j is client id num_clients + j. The directions are seeded by --seed
  (0 without it): canaries stand for no one, so knowing them reveals nothing,
  and a resumed run must draw the same ones.
  """
  if cfg.canary_clients == 0:
    return None
  return canaries_lib.CanaryPlan(num_canaries=cfg.canary_clients, first_id=cfg.num_clients,
                                 norm=canary_norm(cfg), seed=0 if cfg.seed is None else cfg.seed)


def initial_trainable(run_dir: str, initial: Sequence[np.ndarray], resumed: bool) -> list:
  """The trainable weights training started from, kept in the run folder for a resume.

  Without --seed the initial weights are random and the checkpoints do not
  hold them, yet the audit needs the model delta (final - initial).
  """
  path = os.path.join(run_dir, CANARY_INITIAL_WEIGHTS)
  if not resumed:
    buffer = io.BytesIO()
    np.savez(buffer, *initial)
    files.write_atomic(path, buffer.getvalue())
    return [np.asarray(w) for w in initial]
  try:
    with np.load(path, allow_pickle=False) as saved:
      weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
  except (OSError, ValueError, KeyError) as e:
    raise UsageError(f"{path} is missing or unreadable ({type(e).__name__}): the canary audit "
                     "needs the weights the run started from; pass --restart") from None
  if [w.shape for w in weights] != [np.shape(w) for w in initial]:
    raise UsageError(f"{path} does not hold this model's weights: pass --restart")
  return weights


def audit(plan: canaries_lib.CanaryPlan, initial: Sequence[np.ndarray],
          released: Sequence[np.ndarray], theoretical_epsilon: Optional[float],
          delta: float, dp_mode: DPMode) -> dict:
  """The canary audit of the released model, JSON-ready (`canary_estimate.estimate`'s dict).

  Args:
    plan: the canaries that took part.
    initial, released: the trainable weights training started from, and those
      of the released model (the selected round's).
    theoretical_epsilon: the run's epsilon (None without DP).
    delta: the run's delta; the estimate is epsilon at this delta.
    dp_mode: recorded beside the result.
  """
  model_delta = _model_delta(initial, released)
  inserted = _cosines(plan, range(plan.num_canaries), model_delta)
  # The exact null rather than sampled unseen directions: drawing 1,000 of them
  # cost a 20-round run 9 s (canary_estimate).
  result = canary_estimate.estimate(inserted, None, delta, theoretical_epsilon, seed=plan.seed,
                                    dimension=model_delta.size)
  return result | {"dp_mode": dp_mode.value, "canary_norm": plan.norm,
                   "model_dimension": int(model_delta.size),
                   "threat_model": "an adversary who sees only the released model (the "
                                   "selected round's weights) and knows the canaries"}


def _model_delta(initial: Sequence[np.ndarray], released: Sequence[np.ndarray]) -> np.ndarray:
  """Released minus initial trainable weights, flat, in float64."""
  return np.concatenate([np.asarray(r, np.float64).ravel() - np.asarray(i).ravel()
                         for r, i in zip(released, initial)])


def _cosines(plan: canaries_lib.CanaryPlan, indices: range, model_delta: np.ndarray
             ) -> np.ndarray:
  out = []
  for start in range(0, len(indices), _BATCH):
    rows = canaries_lib.directions(plan, indices[start:start + _BATCH], model_delta.size)
    out.append(canary_estimate.cosines(rows, model_delta))
  return np.concatenate(out)


MIN_EXAMPLE_CANARIES = 10


def example_canaries(cfg: RunConfig, labels: np.ndarray
                     ) -> Optional[canary_examples.CanaryExamples]:
  """The canary examples of `cfg` (None unless --audit=canary with --dp_mode=example),
  for training data with these `labels`.

  Drawn from the secret in the run folder when resuming, so the run keeps its
  canaries; a new run (or --restart) draws a fresh secret, unless --seed
  makes everything reproducible (debugging). Reads, never writes:
  `save_example_secret` does, once the run folder is taken.
  """
  if not cfg.example_canaries:
    return None
  count = cfg.canary_count
  if cfg.num_canaries is None:  # The default takes at most a tenth of the data.
    count = max(MIN_EXAMPLE_CANARIES, min(count, len(labels) // 10))
  if count > len(labels) // 2:
    raise UsageError(f"--num_canaries={count} is more than half of the {len(labels)} "
                     f"training examples: use at most {len(labels) // 2}, better a tenth")
  return canary_examples.draw(count, cfg.num_clients, _example_secret(cfg))


def _example_secret(cfg: RunConfig) -> int:
  if cfg.seed is not None:
    return cfg.seed
  path = os.path.join(cfg.run_dir, CANARY_EXAMPLES_SECRET)
  if not cfg.restart and os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        return int(f.read().strip())
    except (OSError, ValueError) as e:
      raise UsageError(f"{path} is unreadable ({type(e).__name__}): the canary audit needs "
                       "the canaries the run started with; pass --restart") from None
  return secrets.randbits(63)


def save_example_secret(cfg: RunConfig,
                        canaries: Optional[canary_examples.CanaryExamples]) -> None:
  """Keeps the secret `canaries` were drawn from in the run folder (owner-only), for a
  resume; nothing without example canaries, or with --seed (the seed is the secret)."""
  if canaries is None or cfg.seed is not None:
    return
  path = os.path.join(cfg.run_dir, CANARY_EXAMPLES_SECRET)
  files.write_atomic(path, f"{canaries.secret}\n".encode())
  os.chmod(path, 0o600)


def example_audit(canaries: canary_examples.CanaryExamples, initial: Sequence[np.ndarray],
                  released: Sequence[np.ndarray], theoretical_epsilon: Optional[float],
                  delta: float) -> dict:
  """The one-run audit of the released model: each canary scored by how far its
  coordinate moved the way its gradient pushes (SGD subtracts it: down)."""
  model_delta = _model_delta(initial, released)
  scores = -model_delta[canaries.coordinates(model_delta.size)]
  result = one_run_audit.audit(scores, canaries.included, delta, theoretical_epsilon)
  return result | {
      "dp_mode": DPMode.EXAMPLE.value,
      "canary_kind": ("gradient canaries: an example whose clipped gradient is the clip norm "
                      "on one model coordinate of its own"),
      "score": "minus the change of the canary's coordinate, released minus initial weights",
      "threat_model": "an adversary who sees only the released model (the selected round's "
                      "weights), knows the initial weights and the canaries, and guesses which "
                      "were trained on"}
