"""A privacy budget across runs on the same data: tuning and repeats add up.

`--budget_ledger=PATH` makes every run record, after each executed round, how
many accounting steps of which event it has released. A run restarted with
`--restart` starts a new entry and its old one stays: those rounds were
released. `total()` composes every entry with `dp_accounting`:

- entries under the same neighbouring relation go into one RDP accountant
  (RDP composes heterogeneous events exactly as it composes one);
- add/remove and replace-one groups, if both occur, are combined by basic
  composition (epsilons and deltas add), a valid upper bound.

The privacy unit is one client of the runs' partitions; a person's data is in
one client of every run, so the total bounds what all the runs together
reveal about it.
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
from typing import Iterator, Optional

import dp_accounting

from tff_dpmed.errors import UsageError
from tff_dpmed.files import write_json_atomic
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.spec import DPSpec

_FORMAT = "tff_dpmed.budget_ledger.v1"


@dataclasses.dataclass(frozen=True)
class BudgetTotal:
  epsilon: float
  delta: float
  entries: int
  compositions: int
  method: str


class BudgetLedger:
  """The JSON file at `path`: one entry per run attempt, updated as rounds execute."""

  def __init__(self, path: str):
    self.path = path
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise UsageError(f"--budget_ledger={path}: its folder {folder} does not exist; create "
                       "it or pass another path")
    if os.path.lexists(path) and not os.path.isfile(path):
      raise UsageError(f"--budget_ledger={path} is not a regular file: pass a file path")
    self.entries()  # Unreadable: fail now, before any round.

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    # A sidecar lock file: the ledger itself is replaced atomically on write.
    with open(f"{self.path}.lock", "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      yield

  def entries(self) -> dict:
    if not os.path.exists(self.path):
      return {}
    try:
      with open(self.path, encoding="utf-8") as f:
        data = json.load(f)
      if data.get("format") != _FORMAT:
        raise ValueError(f"format {data.get('format')!r}")
      return dict(data["entries"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise UsageError(f"--budget_ledger={self.path} is unreadable ({type(e).__name__}): "
                       "restore it; a lost budget ledger under-reports the budget spent") from None

  def record(self, entry_id: str, spec: DPSpec, compositions: int, run_dir: str) -> None:
    """Sets entry `entry_id` to `compositions` steps of `spec`'s event."""
    with self._locked():
      entries = self.entries()
      entries[entry_id] = {"spec": spec.to_json(), "compositions": int(compositions),
                           "run_dir": os.path.abspath(run_dir)}
      write_json_atomic(self.path, {"format": _FORMAT, "entries": entries})

  def total(self, delta: Optional[float] = None) -> BudgetTotal:
    """Epsilon of everything recorded, at `delta` (default: the smallest entry delta)."""
    entries = self.entries()
    specs = [(DPSpec.from_json(e["spec"]), int(e["compositions"])) for e in entries.values()]
    specs = [(s, k) for s, k in specs if k > 0]
    if delta is None:
      delta = min((s.delta for s, _ in specs), default=1e-5)
    groups: dict = {}
    for spec, count in specs:
      mechanism = mechanisms.for_spec(spec)
      if not mechanism.states_guarantee:
        return BudgetTotal(math.inf, delta, len(entries), sum(k for _, k in specs),
                           "a non-private run released data: no bound")
      groups.setdefault(mechanism.neighboring_relation, []).append(
          mechanism.composed_event(count))
    epsilon = 0.0
    for relation, events in groups.items():
      accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
      for event in events:
        accountant.compose(event)
      epsilon += accountant.get_epsilon(delta / len(groups))
    method = "RDP composition" + (" per neighbouring relation, then basic composition"
                                  if len(groups) > 1 else "")
    return BudgetTotal(epsilon, delta, len(entries), sum(k for _, k in specs), method)


def compositions_of(ledger) -> int:
  """The accounting steps a `PrivacyLedger` stands for (worst-off client)."""
  return ledger.mechanism.compositions(ledger.rounds, ledger.max_participation)


