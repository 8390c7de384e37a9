"""--audit=canary in the training program: the canaries' plan, and the audit of the final model.

The plan (`plan_for`) says which client ids are canaries and what they send
(`federated.canaries`); the trainer inserts them, and after training `audit`
compares the released model's delta with the canaries' directions and with
never-inserted ones (`privacy.canary_estimate`). README "Reading the canary
audit" says how to read the result.
"""

import io
import os
from typing import Optional, Sequence

import numpy as np

from tff_dpmed import files
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import canaries as canaries_lib
from tff_dpmed.privacy import canary_estimate
from tff_dpmed.privacy.spec import DPMode
from tff_dpmed.program.config import RunConfig
from tff_dpmed.program.run_dir import CANARY_INITIAL_WEIGHTS

# Directions never inserted: their cosines are the audit's null sample. They
# cost nothing in training (only cosines after it), so there are plenty.
NUM_UNSEEN_DIRECTIONS = 1000
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
  if cfg.canary_count == 0:
    return None
  return canaries_lib.CanaryPlan(num_canaries=cfg.canary_count, first_id=cfg.num_clients,
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
          delta: float, dp_mode: DPMode,
          num_unseen: int = NUM_UNSEEN_DIRECTIONS) -> dict:
  """The canary audit of the released model, JSON-ready (`canary_estimate.estimate`'s dict).

  Args:
    plan: the canaries that took part.
    initial, released: the trainable weights training started from, and those
      of the released model (the selected round's).
    theoretical_epsilon: the run's epsilon (None without DP).
    delta: the run's delta; the estimate is epsilon at this delta.
    dp_mode: recorded beside the result.
    num_unseen: directions never inserted.
  """
  model_delta = np.concatenate([np.asarray(r, np.float64).ravel() - np.asarray(i).ravel()
                                for r, i in zip(released, initial)])
  inserted = _cosines(plan, range(plan.num_canaries), model_delta)
  unseen = _cosines(plan, range(plan.num_canaries, plan.num_canaries + num_unseen), model_delta)
  result = canary_estimate.estimate(inserted, unseen, delta, theoretical_epsilon, seed=plan.seed)
  return result | {"dp_mode": dp_mode.value, "canary_norm": plan.norm,
                   "model_dimension": int(model_delta.size),
                   "threat_model": "an adversary who sees only the released model (the "
                                   "selected round's weights) and knows the canaries"}


def _cosines(plan: canaries_lib.CanaryPlan, indices: range, model_delta: np.ndarray
             ) -> np.ndarray:
  out = []
  for start in range(0, len(indices), _BATCH):
    rows = canaries_lib.directions(plan, indices[start:start + _BATCH], model_delta.size)
    out.append(canary_estimate.cosines(rows, model_delta))
  return np.concatenate(out)
