"""Program-state checkpoints on top of `tff.program.FileProgramStateManager`.

The manager writes each version to a temporary folder and renames it into
place, so a crash mid-write never leaves a half-written newest checkpoint.
What it does not do is survive a newest checkpoint damaged after the fact;
`load_latest` falls back to the previous one and says so.
"""

import asyncio
import os
import sys
import time
from typing import Any, Optional

from absl import logging
import tensorflow_federated as tff

from tff_dpmed.errors import UsageError

_PREFIX = "round_"


class Checkpointer:

  def __init__(self, run_dir: str, keep_total: int = 3, owner_only: bool = False):
    """`owner_only`: the state holds secrets (a noise seed), so only the owner may read it."""
    self.root = os.path.join(run_dir, "checkpoints")
    if owner_only:
      os.makedirs(self.root, mode=0o700, exist_ok=True)
      os.chmod(self.root, 0o700)
    self._manager = tff.program.FileProgramStateManager(
        self.root, prefix=_PREFIX, keep_total=keep_total, keep_first=False)

  def versions(self) -> list[int]:
    return asyncio.run(self._manager.get_versions()) or []

  def save(self, state: Any, round_num: int) -> None:
    if round_num in self.versions():
      return  # Already saved (e.g. on a signal right after a periodic save).
    asyncio.run(self._manager.save(state, round_num))

  def load_latest(self, structure: Any) -> Optional[tuple[int, Any]]:
    """Returns (round, state) of the newest readable checkpoint, or None if there is none.

    Raises UsageError when checkpoints exist but none can be read (e.g. the
    model code changed): silently starting over would rewrite the run's
    metrics and restart its privacy ledger.
    """
    versions = self.versions()
    for version in reversed(versions):
      try:
        return version, asyncio.run(self._manager.load(version, structure))
      except Exception as e:  # pylint: disable=broad-except
        # Moved aside (kept for inspection) so the round can be saved again.
        bad = os.path.join(self.root, f"{_PREFIX}{version}")
        aside = os.path.join(self.root, f"unreadable_{_PREFIX}{version}_{int(time.time())}")
        os.rename(bad, aside)
        message = (f"warning: checkpoint {_PREFIX}{version} is unreadable "
                   f"({type(e).__name__}), moved to {aside}; falling back to the previous one")
        print(message, file=sys.stderr, flush=True)
        logging.warning("%s: %s", message, e)
    if versions:
      raise UsageError(
          f"none of the checkpoints in {self.root} can be read (was the model or dataset "
          "changed?): rerun with the original code and flags, or pass --restart to start over")
    return None

  def remove_all(self) -> None:
    asyncio.run(self._manager.remove_all())
