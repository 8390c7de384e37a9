"""The run folder: one run at a time, resumed only with the privacy and data it accounts for.

Besides checkpoints and metrics, a run folder holds `privacy_ledger.json`, the
durable record of every executed round (written before anything of a round
is), and `config.json` with a fingerprint of the training data. A folder that
has released rounds never silently starts a fresh ledger: it resumes with the
same privacy settings and the same data, or needs `--restart`.
"""

import errno
import fcntl
import json
import os
import shutil
import sys
from typing import Optional

from tff_dpmed.data.types import ImageSplits
from tff_dpmed.errors import UsageError
from tff_dpmed.files import write_json_atomic
from tff_dpmed.privacy import budget as budget_lib
from tff_dpmed.privacy import mechanisms
from tff_dpmed.privacy.budget import BudgetLedger
from tff_dpmed.privacy.ledger import PrivacyLedger
from tff_dpmed.privacy.spec import DPMode
from tff_dpmed.program import loop
from tff_dpmed.program import metrics_log
from tff_dpmed.program.checkpoints import Checkpointer
from tff_dpmed.program.config import RunConfig

LEDGER_FILE = "privacy_ledger.json"
CONFIG_FILE = "config.json"
# --audit=canary: the trainable weights training started from (program/canary_audit.py).
CANARY_INITIAL_WEIGHTS = "canary_initial_weights.npz"
# --audit=canary with --dp_mode=example: what draws the canary examples and their
# inclusion (the auditor's secret; never exported).
CANARY_EXAMPLES_SECRET = "canary_examples_secret"
# Changing these between a run and its resume would make the resumed state
# meaningless; the privacy settings are checked against the ledger itself.
RESUME_KEYS = ("dataset", "image_size", "partition", "dirichlet_alpha", "model",
               "client_epochs", "client_batch_size", "seed", "client_learning_rate",
               "server_learning_rate", "server_momentum")
_DERIVED = ("metrics.csv", "summary.json", "tensorboard", "checkpoints", LEDGER_FILE,
            "final_weights.npz", CANARY_INITIAL_WEIGHTS, CANARY_EXAMPLES_SECRET)


def check_writable(output_dir: str, run_dir: str) -> None:
  """Fails unless `run_dir` can be created (or is a folder) under a writable `output_dir`."""
  for path in (output_dir, run_dir):
    if os.path.exists(path) and not os.path.isdir(path):
      raise UsageError(f"{path} exists and is not a folder: pass another --output_dir or "
                       "--experiment_name")
  existing = os.path.abspath(run_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"output directory {output_dir} is not writable "
                     f"({existing} is not a writable folder): pass a writable --output_dir")


def sampling_seed(cfg: RunConfig) -> Optional[int]:
  """The client sampler's seed: --seed only where predictable cohorts protect nothing anyway."""
  if cfg.dp.mode is DPMode.NONE or cfg.dp.reproducible_sampling:
    return cfg.seed
  return None


class RunFolder:
  """Takes a run folder for one run: locks it, checks what it holds, writes config.json."""

  def __init__(self, cfg: RunConfig, splits: ImageSplits,
               budget: Optional[BudgetLedger] = None):
    self._cfg = cfg
    self._budget = budget
    self._splits = splits
    self._lock_fd: Optional[int] = None
    self._ledger: Optional[PrivacyLedger] = None
    self.checkpointer: Optional[Checkpointer] = None

  @property
  def path(self) -> str:
    return self._cfg.run_dir

  def __enter__(self) -> "RunFolder":
    cfg = self._cfg
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise UsageError(f"cannot create the run folder {self.path} ({e.strerror}): pass a "
                       "writable --output_dir and a plain --experiment_name") from None
    self._take_lock()
    try:
      # Everything the folder holds is checked before anything in it is written.
      fingerprint = self._splits.train_fingerprint()
      old = self._read_config()
      if cfg.restart:
        self._clear()
      else:
        if old is not None:
          self._check_compatible(old, fingerprint)
        self._ledger = self._read_ledger()
        if self._ledger is not None:
          self._ledger.check_matches(cfg.dp)
        metrics_log.read_metrics(self.path)  # Unreadable: a one-line error now, not later.
        checkpoints = os.path.join(self.path, "checkpoints")
        if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
          raise UsageError(f"{checkpoints} is not a folder: remove it, or pass --restart")
      write_json_atomic(os.path.join(self.path, CONFIG_FILE),
                        {"config": cfg.to_json(), "dataset": self._splits.info.to_json(),
                         "train_data_sha256": fingerprint})
      self.checkpointer = Checkpointer(
          self.path, owner_only=mechanisms.class_for(cfg.dp.mode).state_holds_noise_seed)
    except BaseException:
      self._release_lock()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self._release_lock()

  def _take_lock(self) -> None:
    # The folder itself is locked, so a refused run writes nothing into it.
    self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
      fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._release_lock()
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise UsageError(f"another run is using {self.path}: wait for it to finish, or pass "
                         "another --experiment_name") from None
      raise

  def _release_lock(self) -> None:
    if self._lock_fd is not None:
      os.close(self._lock_fd)  # Closing the descriptor releases the flock.
      self._lock_fd = None

  def _read_config(self) -> Optional[dict]:
    path = os.path.join(self.path, CONFIG_FILE)
    if not os.path.lexists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError("no 'config' object")
      return data
    except (OSError, ValueError) as e:
      if self._cfg.restart:
        return None
      raise UsageError(f"{path} is unreadable ({type(e).__name__}): restore it, or pass "
                       "--restart to discard the run") from None

  def _clear(self) -> None:
    for name in _DERIVED:
      path = os.path.join(self.path, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      elif os.path.lexists(path):
        os.remove(path)

  def _check_compatible(self, old: dict, fingerprint: str) -> None:
    old_config = old["config"]
    new_config = self._cfg.to_json()
    changed = [k for k in RESUME_KEYS if old_config.get(k) != new_config.get(k)]
    if changed:
      raise UsageError(
          f"{self.path} holds a run with different {', '.join(changed)}: rerun with the same "
          "flags to resume, pass --restart to discard it, or use another --experiment_name")
    old_canaries, new_canaries = canary_settings(old_config), canary_settings(new_config)
    if old_canaries != new_canaries:
      raise UsageError(
          f"{self.path} holds a run with other canaries (--audit, --num_canaries, "
          f"--canary_norm: {old_canaries} -> {new_canaries}): the canary audit needs the same "
          "canaries from the first round to the last; rerun with the same flags to resume, or "
          "pass --restart")
    if old.get("train_data_sha256") != fingerprint:
      raise UsageError(
          f"{self.path} was trained on other data (the training split's fingerprint differs): "
          "point --data_dir and --dataset at the original files to resume, or pass --restart")

  def _read_ledger(self) -> Optional[PrivacyLedger]:
    path = os.path.join(self.path, LEDGER_FILE)
    if not os.path.lexists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        text = json.dumps(json.load(f)["ledger"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UsageError(f"{path} is unreadable ({type(e).__name__}): the rounds it accounts "
                       "for cannot be verified; restore it, or pass --restart") from None
    return PrivacyLedger.from_json(text)

  def save_ledger(self, ledger: PrivacyLedger) -> None:
    """Persists the run's ledger, and its entry in the budget ledger if there is one."""
    write_json_atomic(os.path.join(self.path, LEDGER_FILE),
                      {"ledger": json.loads(ledger.to_json())})
    if self._budget is not None:
      self._budget.record(f"{os.path.abspath(self.path)}#{ledger.ledger_id}", ledger.spec,
                          budget_lib.compositions_of(ledger), self.path)

  def restore(self, fresh: loop.ProgramState,
              fresh_ledger: PrivacyLedger) -> tuple[loop.ProgramState, PrivacyLedger]:
    """The newest checkpoint's state and the folder's ledger, or the fresh ones.

    Raises:
      UsageError: If the folder's ledger accounts for other privacy settings,
        if there is a checkpoint but no ledger, or released rounds but no
        readable checkpoint.
    """
    ledger = self._ledger
    restored = self.checkpointer.load_latest(fresh.tree())
    if restored is None:
      if ledger is not None and ledger.rounds > 0:
        raise UsageError(
            f"{self.path} has released {ledger.rounds} rounds but holds no readable "
            "checkpoint to resume from: pass --restart to start over (the released rounds "
            "still count in any --budget_ledger)")
      return fresh, fresh_ledger
    round_num, tree = restored
    if ledger is None:
      raise UsageError(f"{self.path} holds checkpoints but no {LEDGER_FILE}: the rounds "
                       "released cannot be verified; pass --restart to start over")
    state = loop.ProgramState.from_tree(tree)
    print(f"note: resuming {self.path} from the checkpoint after round {round_num}",
          file=sys.stderr, flush=True)
    if ledger.rounds > state.round:
      print(f"note: {ledger.rounds - state.round} round(s) ran after that checkpoint; they "
            "stay accounted, so epsilon also counts the rounds run again now",
            file=sys.stderr, flush=True)
    return state, ledger


def canary_settings(config: dict) -> Optional[tuple]:
  """The canary settings a run's flat config trains with (None: no canaries)."""
  if config.get("audit") != "canary":  # Also a bool --audit of older runs: no canaries.
    return None
  return (config.get("num_canaries"), config.get("canary_norm"))
