"""Runs the study's grid: trains and audits each point, resumably, one or several at a time.

A point is done when its run folder has a summary.json and an audit.json made
with the study's audit settings. A finished run is reused only if it is the
run the flags ask for, by the trainer's own resume rule: the same
`run_dir.RESUME_KEYS` and the same privacy (`DPSpec`), and the same length.
"""

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import signal
import sys
from typing import Callable, Optional, Sequence

from absl import logging
import tqdm

from tff_dpmed.errors import UsageError
from tff_dpmed.federated import worker_process
from tff_dpmed.privacy.spec import DPSpec
from tff_dpmed.program import audit
from tff_dpmed.program import run_dir as run_dir_lib
from tff_dpmed.program import trainer
from tff_dpmed.program.config import RunConfig
from experiments.grid import GridPoint, StudySettings, run_config

SUMMARY_FILE = "summary.json"


def read_summary(run_dir: str) -> Optional[dict]:
  """The run's summary.json (written last by the trainer), or None if it has not finished."""
  path = os.path.join(run_dir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _privacy(flat: dict) -> dict:
  """The privacy settings of a flat config, as its DPSpec has them (defaults resolved)."""
  return DPSpec.from_json(flat).to_json()


def finished_run_differences(cfg: RunConfig, done: dict) -> list:
  """The settings in which a finished run (its flat summary config) differs from `cfg`.

  The trainer's resume rule: the keys of `run_dir.RESUME_KEYS`, then the
  privacy spec (what its ledger accounts for). A finished run must also have
  run the rounds asked. With a target epsilon, z is calibrated by `prepare`:
  the finished run's z is taken when its target and length are the same.
  """
  wanted = cfg.to_json()
  changed = [k for k in run_dir_lib.RESUME_KEYS + ("rounds",) if done.get(k) != wanted.get(k)]
  if run_dir_lib.canary_settings(done) != run_dir_lib.canary_settings(wanted):
    changed.append("canaries (--audit)")
  if wanted["noise_multiplier"] is None:
    if done.get("target_epsilon") != wanted["target_epsilon"]:
      changed.append("target_epsilon")
    wanted["noise_multiplier"] = done.get("noise_multiplier")
  try:
    old, new = _privacy(done), _privacy(wanted)
  except (UsageError, KeyError, TypeError):
    return changed + ["privacy settings (unreadable in its summary.json)"]
  return changed + [k for k in new if old.get(k) != new[k]]


def check_finished_run_matches(run_dir: str, cfg: RunConfig, summary: dict) -> None:
  """A finished run is only reused if it is the experiment the flags ask for."""
  changed = finished_run_differences(cfg, summary["config"])
  if changed:
    raise UsageError(
        f"{run_dir} holds a finished run with different {', '.join(sorted(set(changed)))}: "
        "use another --output_dir for a different study, or delete that run folder")


def _audit_is_current(run_dir: str, settings: StudySettings) -> bool:
  """audit.json exists and was made with the study's audit settings."""
  result = audit.load_audit(run_dir)
  return result is not None and (
      result.get("max_examples"), result.get("seed"), result.get("nonmembers")) == (
          settings.audit_max_examples, settings.audit_seed,
          f"{settings.audit_nonmembers} split")


def is_complete(point: GridPoint, settings: StudySettings) -> bool:
  """Trained and audited with the current audit settings (else it is (re)audited).

  A canary twin is done when trained: its audit is the trainer's canary audit.
  """
  run_dir = settings.run_dir(point)
  return (os.path.exists(os.path.join(run_dir, SUMMARY_FILE))
          and (point.canaries or _audit_is_current(run_dir, settings)))


def train_and_audit(point: GridPoint, settings: StudySettings) -> str:
  """Trains (or resumes, or skips) one run, then audits it; returns its status.

  "skipped": summary.json and audit.json existed; "audited": only the audit
  was missing; "trained": the run was trained (or resumed) and audited.
  """
  cfg = run_config(point, settings)
  run_dir = settings.run_dir(point)
  summary = read_summary(run_dir)
  if summary is not None:
    check_finished_run_matches(run_dir, cfg, summary)
    if is_complete(point, settings):
      return "skipped"
  run = trainer.prepare(cfg)
  status = "audited"
  if summary is None:
    trainer.train(run, show_progress=False)
    status = "trained"
  if not point.canaries:  # A twin's audit is the canary audit, in its summary.
    audit.audit_run(run_dir, run.splits, max_examples=settings.audit_max_examples,
                    seed=settings.audit_seed, nonmember_split=settings.audit_nonmembers)
  if not settings.keep_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  return status


def _train_and_audit_in_subprocess(point: GridPoint, settings: StudySettings) -> str:
  logging.set_verbosity(logging.WARNING)
  return train_and_audit(point, settings)


def _stop_with_the_study(study_pid: int) -> None:
  # SIGTERM, as a user's stop: the run checkpoints and stops its TFF worker.
  worker_process.set_parent_death_signal(signal.SIGTERM)
  if os.getppid() != study_pid:  # The study died while this process was starting.
    os.kill(os.getpid(), signal.SIGTERM)


def study_pool(parallel: int) -> concurrent.futures.ProcessPoolExecutor:
  """`parallel` fresh processes, one per run, that stop when the study's process dies.

  Without the death signal a killed study left its runs training, orphaned.
  """
  return concurrent.futures.ProcessPoolExecutor(
      max_workers=parallel, mp_context=multiprocessing.get_context("spawn"),
      max_tasks_per_child=1, initializer=_stop_with_the_study, initargs=(os.getpid(),))


def run_grid(points: Sequence[GridPoint], settings: StudySettings, parallel: int = 1,
             show_progress: bool = True,
             run_fn: Callable[[GridPoint, StudySettings], str] = train_and_audit) -> dict:
  """Runs every point not yet complete; returns {point name: status or "failed: ..."}.

  `parallel` > 1 runs that many points at once, each in its own fresh
  process. A run that fails (e.g. diverges) is reported and the others go on.
  """
  statuses = {}
  todo = []
  for p in points:
    summary = read_summary(settings.run_dir(p))
    if summary is not None:  # Before anything runs: never mix two experiments in one study.
      check_finished_run_matches(settings.run_dir(p), run_config(p, settings), summary)
    if is_complete(p, settings):
      statuses[p.name] = "skipped"
    else:
      todo.append(p)
  if todo:
    os.makedirs(settings.output_dir, exist_ok=True)  # Holds the study's budget ledger.
  bar = tqdm.tqdm(total=len(points), initial=len(points) - len(todo), desc="study",
                  unit="run", disable=not show_progress, file=sys.stderr, dynamic_ncols=True)

  def done(point, status):
    statuses[point.name] = status
    bar.set_postfix_str(f"{point.name}: {status}"[:60], refresh=False)
    bar.update(1)
    if status.startswith("failed"):
      tqdm.tqdm.write(f"warning: {point.name} {status}", file=sys.stderr)

  try:
    if parallel <= 1:
      for p in todo:
        bar.set_postfix_str(f"running {p.name}", refresh=True)
        try:
          done(p, run_fn(p, settings))
        except (trainer.TrainingError, UsageError) as e:
          done(p, f"failed: {type(e).__name__}: {e}")
    else:
      with study_pool(parallel) as pool:
        futures = {pool.submit(_train_and_audit_in_subprocess, p, settings): p for p in todo}
        for future in concurrent.futures.as_completed(futures):
          try:
            done(futures[future], future.result())
          except Exception as e:  # pylint: disable=broad-except
            done(futures[future], f"failed: {type(e).__name__}: {e}")
  finally:
    bar.close()
  return statuses
