"""`PrivacyLedger`: what a run has released so far, and its epsilon.

One `record_round` per executed round. The mechanism decides how rounds
become compositions (every round for central DP, the most-participating
client's rounds for local DP); the accountant turns those into epsilon. The
ledger is checkpointed with the program state and, on resume, must describe
exactly the privacy settings of the resumed run (`check_matches`).
"""

import collections
import json
import uuid
import math
import operator
from typing import Optional, Sequence

from tff_dpmed.errors import UsageError
from tff_dpmed.privacy import accounting
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.spec import DPSpec


class PrivacyLedger:
  """Incremental accounting for a training run."""

  _FORMAT = "tff_dpmed.privacy_ledger.v2"

  def __init__(self, spec: DPSpec):
    self._mechanism = mechanisms.for_spec(mechanisms.require_calibrated(spec))
    self._rounds = 0
    self._participation: collections.Counter = collections.Counter()
    self._history: list[tuple[int, float]] = []
    # Tells this run's release apart from an earlier one in the same folder
    # (before a --restart) in a budget ledger.
    self.ledger_id = uuid.uuid4().hex

  @property
  def spec(self) -> DPSpec:
    return self._mechanism.spec

  @property
  def mechanism(self) -> mechanisms.Mechanism:
    return self._mechanism

  @property
  def rounds(self) -> int:
    return self._rounds

  @property
  def max_participation(self) -> int:
    """The most rounds any one client took part in (tracked where it matters)."""
    return max(self._participation.values(), default=0)

  @property
  def epsilon_history(self) -> list[tuple[int, float]]:
    """(round, epsilon) for every round at which `epsilon()` was asked."""
    return list(self._history)

  def record_round(self, participant_ids: Sequence[int]) -> None:
    """Records one executed round in which `participant_ids` sent updates.

    Raises:
      ValueError: If the cohort contradicts the spec (duplicate clients, the
        wrong size for fixed or 'all' sampling, more clients than exist): the
        accounting would then not describe what was trained.
    """
    ids = [operator.index(i) for i in participant_ids]
    if len(set(ids)) != len(ids):
      dupes = sorted(i for i, c in collections.Counter(ids).items() if c > 1)
      raise ValueError(f"clients {dupes[:5]} appear more than once in one round: "
                       "each client may contribute one clipped update per round")
    if len(ids) > self.spec.num_clients:
      raise ValueError(f"{len(ids)} participants > num_clients={self.spec.num_clients}")
    self._mechanism.check_cohort(len(ids))
    if self._mechanism.tracks_participation():
      self._participation.update(ids)
      if len(self._participation) > self.spec.num_clients:
        raise ValueError(f"{len(self._participation)} distinct clients have taken part, "
                         f"more than num_clients={self.spec.num_clients}")
    self._rounds += 1

  def epsilon(self) -> float:
    """Epsilon so far, at `spec.delta`."""
    if not self._mechanism.states_guarantee:
      eps = math.inf if self._rounds else 0.0
    else:
      eps = accounting.epsilon_after(
          self.spec, self._mechanism.compositions(self._rounds, self.max_participation))
    if not self._history or self._history[-1][0] != self._rounds:
      self._history.append((self._rounds, eps))
    return eps

  def client_level_epsilon(self) -> Optional[float]:
    """Epsilon of the client-level layer at `client_level_delta`, or None without one."""
    inner = self._mechanism.client_level()
    if inner is None:
      return None
    return accounting.epsilon_after(
        inner.spec, inner.compositions(self._rounds, self.max_participation))

  @property
  def client_level_delta(self) -> Optional[float]:
    inner = self._mechanism.client_level()
    return None if inner is None else inner.spec.delta

  def check_matches(self, spec: DPSpec) -> None:
    """Raises UsageError unless this ledger accounts for exactly `spec`.

    A resumed run must not report an epsilon for settings other than those
    under which its earlier rounds were released.
    """
    ours, theirs = self.spec.to_json(), spec.to_json()
    changed = sorted(k for k in ours if ours[k] != theirs.get(k))
    if changed:
      detail = ", ".join(f"{k} {ours[k]!r} -> {theirs.get(k)!r}" for k in changed)
      raise UsageError(
          f"the run's privacy ledger was kept under other privacy settings ({detail}): "
          "rerun with the original flags to resume, or pass --restart (the released "
          "rounds still count in any --budget_ledger)")

  def to_json(self) -> str:
    """The ledger as JSON, for checkpoints; `from_json` restores it exactly."""
    return json.dumps({
        "format": self._FORMAT,
        "ledger_id": self.ledger_id,
        "spec": self.spec.to_json(),
        "rounds": self._rounds,
        "participation": sorted([i, c] for i, c in self._participation.items()),
        # Strict JSON: an unbounded epsilon (no noise) is the string "inf".
        "epsilon_history": [[r, e if math.isfinite(e) else "inf"] for r, e in self._history],
    }, allow_nan=False)

  @classmethod
  def from_json(cls, text: str) -> "PrivacyLedger":
    """Restores a ledger written by `to_json`.

    Raises:
      UsageError: If `text` is not a ledger this version wrote.
    """
    try:
      data = json.loads(text)
      if data.get("format") != cls._FORMAT:
        raise ValueError(f"format {data.get('format')!r}")
      ledger = cls(DPSpec.from_json(data["spec"]))
      ledger.ledger_id = str(data["ledger_id"])
      ledger._rounds = accounting.check_rounds(data["rounds"])
      ledger._participation = collections.Counter(
          {operator.index(i): operator.index(c) for i, c in data["participation"]})
      ledger._history = [(int(r), float(e)) for r, e in data["epsilon_history"]]
    except (ValueError, KeyError, TypeError, AttributeError, UsageError) as e:
      raise UsageError(
          f"privacy ledger in the checkpoint is unreadable ({e}): restore it from an intact "
          "checkpoint or start a new run with --restart") from None
    if ledger.max_participation > ledger._rounds:
      raise UsageError("privacy ledger in the checkpoint is inconsistent (a client took "
                       "part in more rounds than were run): restore an intact checkpoint")
    return ledger
