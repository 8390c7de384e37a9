"""Reliability of `python -m tff_dpmed.train`: signals, divergence and seeded determinism.

Every run is a subprocess, as a user runs it. Runs cost ~40-60 s each (mostly
TFF's one-off compile), so they are few, shared between tests, and started
together at module setup on a small thread pool; each test waits for the runs
it needs. Nothing here asserts on elapsed time.

Three runs use a tiny script (`_HOOK`) that runs the real CLI with
`loop.RoundHooks` injected, to act at an exact point inside the trainer's loop: it sends the process a signal during a round's evaluation or
right after a round's clients are drawn, or sets the server learning rate in
the TFF state to inf before round 2. The trainer is otherwise the real CLI,
signals go through its real handler, and the non-finite update is computed by
TFF; the hook only removes the race of aiming a signal from outside at a
window a fraction of a second wide, and the need for a flag setting that
diverges exactly after a good round.

Run sharing: the SIGTERM run is resumed by a rerun of the same command; the
two hooked signal runs are also the unseeded local-DP pair; the seeded
non-private run is also the no-noise reference for the seeded local-DP pair.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.run_outputs import checkpoint_rounds as _checkpoint_rounds
from tests.run_outputs import read_rows as _rows

_COMMON = ["--dataset=breastmnist", "--num_clients=6", "--clients_per_round=3",
           "--client_batch_size=32", "--rounds_per_eval=1", "--progress=false"]
_NUM_CLIENTS, _CLIENTS_PER_ROUND = 6, 3
_RUN_TIMEOUT_S = 900       # Per run; generous, the machine is shared.
_CONCURRENT_RUNS = 3

_SIGNAL_FLAGS = ["--rounds=6", "--rounds_per_checkpoint=100", "--seed=5", "--dp_mode=none"]
_LOCAL_DP = ["--dp_mode=local", "--clip_mode=fixed", "--clip=1.0", "--noise_multiplier=1.0"]
# Unseeded local DP, checkpoints after rounds 2, 4, 6; the hook stops them in round 3.
_HOOKED_FLAGS = [*_LOCAL_DP, "--rounds=6", "--rounds_per_checkpoint=2"]

# Runs the real CLI with one thing done at an exact point, chosen by ACTION:
#   evaluation.evaluate / sampling.ClientSampler.sample: after the Nth call,
#     send this process SIGNAME;
#   inf_server_learning_rate: before the Nth learning_process.next, set the
#     server optimizer's learning rate in the TFF state to inf, so that round's
#     server update really is non-finite.
# It also appends the client sampler's state before every draw to RECORD (one
# JSON per line), so a test can tell which draw a checkpointed sampler state
# follows without knowing the seed.
# Usage: python hook.py ACTION N SIGNAME RECORD -- FLAGS...
_HOOK = r'''
import collections, os, signal, sys
import numpy as np
from tff_dpmed import train  # Imports TensorFlow before absl's app.run, as the CLI does.
from tff_dpmed.program import loop

action, nth, signame, record = sys.argv[1:5]
sys.argv = [sys.argv[0]] + sys.argv[6:]
calls = collections.Counter()

def due(key):
  calls[key] += 1
  return key == action and calls[key] == int(nth)

def before_sample(round_num, sampler):
  with open(record, "a") as f:
    f.write(sampler.get_state() + "\n")

def signal_if_due(key):
  def hook(*args):
    if due(key):
      os.kill(os.getpid(), getattr(signal, signame))
  return hook

def before_next(round_num, state):
  if due("inf_server_learning_rate"):
    finalizer = collections.OrderedDict(state.finalizer)
    finalizer["learning_rate"] = np.float32(np.inf)
    state = state._replace(finalizer=finalizer)
  return state

train.run(hooks=loop.RoundHooks(
    before_sample=before_sample,
    after_sample=signal_if_due("sampling.ClientSampler.sample"),
    after_evaluate=signal_if_due("evaluation.evaluate"),
    before_next=before_next))
'''


# ---------------------------------------------------------------- running runs


@dataclasses.dataclass
class RunResult:
  returncode: int
  stdout: str
  stderr: str
  workers: list          # psutil.Process of every worker_binary child seen
  workers_left: list     # those still running after the trainer exited

  def describe(self) -> str:
    return f"exit {self.returncode}\nstderr tail:\n{self.stderr[-4000:]}"


class _Procs:
  """Every trainer process this module started, so teardown can stop leftovers."""

  def __init__(self):
    self._lock = threading.Lock()
    self._procs = []
    self.closing = False

  def start(self, cmd, log_prefix) -> subprocess.Popen:
    with self._lock:
      if self.closing:
        raise RuntimeError("module teardown: not starting new runs")
      out = open(f"{log_prefix}.stdout", "w")
      err = open(f"{log_prefix}.stderr", "w")
      proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=err)
      out.close()
      err.close()
      self._procs.append(proc)
      return proc

  def kill_all(self):
    with self._lock:
      self.closing = True
      procs = list(self._procs)
    for proc in procs:
      if proc.poll() is None:
        proc.kill()   # By pid; its worker dies with it (PR_SET_PDEATHSIG).
        proc.wait()


def _worker_children(pid: int) -> list:
  try:
    children = psutil.Process(pid).children(recursive=True)
  except psutil.NoSuchProcess:
    return []
  found = []
  for child in children:
    try:
      if "worker_binary" in " ".join(child.cmdline()):
        found.append(child)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
      pass
  return found


def _still_running(processes) -> list:
  psutil.wait_procs(processes, timeout=10)
  left = []
  for p in processes:
    try:
      if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
        left.append(p.pid)
    except psutil.NoSuchProcess:
      pass
  return left


def _execute(procs: _Procs, cmd: list, log_prefix: str,
             on_poll: Optional[Callable[[subprocess.Popen, dict], None]] = None) -> RunResult:
  """Runs `cmd` to completion, recording its worker children while it runs."""
  proc = procs.start(cmd, log_prefix)
  workers = {}
  deadline = time.monotonic() + _RUN_TIMEOUT_S
  try:
    while proc.poll() is None:
      if time.monotonic() > deadline:
        raise AssertionError(f"run did not finish within {_RUN_TIMEOUT_S}s: {cmd}")
      for w in _worker_children(proc.pid):
        workers.setdefault(w.pid, w)
      if on_poll is not None:
        on_poll(proc, workers)
      time.sleep(0.2)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  with open(f"{log_prefix}.stdout") as f:
    stdout = f.read()
  with open(f"{log_prefix}.stderr") as f:
    stderr = f.read()
  workers = list(workers.values())
  return RunResult(proc.returncode, stdout, stderr, workers, _still_running(workers))


def _train_cmd(data_dir, out_dir, name, *flags):
  return [sys.executable, "-m", "tff_dpmed.train", f"--data_dir={data_dir}",
          f"--output_dir={out_dir}", f"--experiment_name={name}", *_COMMON, *flags]


def _hooked_cmd(hook_path, target, nth, signame, record, data_dir, out_dir, name, *flags):
  return [sys.executable, str(hook_path), target, str(nth), signame, str(record), "--",
          *_train_cmd(data_dir, out_dir, name, *flags)[3:]]


# ------------------------------------------------------------ reading outputs


def _rounds(run_dir) -> list:
  return [int(r["round"]) for r in _rows(run_dir)]


def _load_checkpoint(run_dir, round_num) -> dict:
  """The stored program state of checkpoints/round_N, read back from disk."""
  from tensorflow_federated.python.program import file_utils
  path = os.path.join(run_dir, "checkpoints", f"round_{round_num}")
  return asyncio.run(file_utils.read_saved_model(path))


def _leaves(tree) -> list:
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _leaves(v)]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in _leaves(v)]
  return [tree]


def _scalar(value):
  value = np.asarray(value).item()
  return value.decode() if isinstance(value, bytes) else value


def _final_weights(run_dir) -> list:
  with np.load(os.path.join(run_dir, "final_weights.npz"), allow_pickle=False) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


def _stop_note(stderr: str, signame: str) -> Optional[int]:
  """N from the trainer's '<SIG> received: checkpoint saved after round N' note."""
  marker = f"{signame} received: checkpoint saved after round "
  for line in stderr.splitlines():
    if marker in line:
      return int(line.split(marker, 1)[1].split(";")[0].strip())
  return None


def _one_draw_later(state: dict) -> dict:
  """The trainer's client sampler state one draw after `state`."""
  from tff_dpmed.program.sampling import ClientSampler
  sampler = ClientSampler(_NUM_CLIENTS, _CLIENTS_PER_ROUND, "poisson")
  sampler.set_state(json.dumps(state))
  sampler.sample()
  return json.loads(sampler.get_state())


# ------------------------------------------------------------------- the runs


def _sigterm_then_rerun(procs, data_dir, root):
  """Scenario 1: SIGTERM once metrics.csv has 2 rows; record the aftermath; rerun."""
  name = "sigterm"
  run_dir = os.path.join(root, name)
  cmd = _train_cmd(data_dir, root, name, *_SIGNAL_FLAGS)
  sent = {}

  def on_poll(proc, workers):
    if "rows" not in sent and len(_rows(run_dir)) >= 2:
      sent["workers_at_signal"] = list(workers)
      sent["rows"] = len(_rows(run_dir))
      proc.send_signal(signal.SIGTERM)

  killed = _execute(procs, cmd, os.path.join(root, f"{name}-1"), on_poll)
  after_signal = {
      "signalled": "rows" in sent,
      "workers_at_signal": sent.get("workers_at_signal", []),
      "rounds": _rounds(run_dir),
      "rows": _rows(run_dir),
      "checkpoints": _checkpoint_rounds(run_dir),
      "summary": os.path.exists(os.path.join(run_dir, "summary.json")),
      "saved_model": os.path.exists(os.path.join(run_dir, "saved_model")),
  }
  note = _stop_note(killed.stderr, "SIGTERM")
  if note is not None and note in after_signal["checkpoints"]:
    after_signal["checkpoint_round_field"] = _scalar(_load_checkpoint(run_dir, note)["round"])
  rerun = _execute(procs, cmd, os.path.join(root, f"{name}-2"))
  return {"run_dir": run_dir, "killed": killed, "after_signal": after_signal, "rerun": rerun}


def _job_table(data_dir, root, hook_path):
  """name -> job(procs) for every run this module can use."""

  def plain(name, *flags):
    return lambda procs: {"run_dir": os.path.join(root, name), "result": _execute(
        procs, _train_cmd(data_dir, root, name, *flags), os.path.join(root, name))}

  def hooked(name, target, nth, signame, *flags):
    record = os.path.join(root, f"{name}.sampler_states")
    return lambda procs: {
        "run_dir": os.path.join(root, name), "sampler_states": record,
        "result": _execute(procs, _hooked_cmd(hook_path, target, nth, signame, record,
                                              data_dir, root, name, *flags),
                           os.path.join(root, name))}

  return {
      "sigterm": lambda procs: _sigterm_then_rerun(procs, data_dir, root),
      # The two hooked runs are also the unseeded local-DP pair: both keep the
      # periodic checkpoint after round 2, whose weights must differ. Each is
      # stopped in round 3, after that checkpoint, so only the signal path can
      # save round 3.
      # SIGINT while round 3 is being evaluated: its update is applied and
      # counted, its metrics row not yet written.
      "sigint_in_eval": hooked("sigint_in_eval", "evaluation.evaluate", 3, "SIGINT",
                               *_HOOKED_FLAGS),
      # SIGTERM right after round 4's clients are drawn, before they train (the
      # state a signal arriving during the seconds-long learning_process.next
      # leaves); the last finished round is 3.
      "sigterm_mid_round": hooked("sigterm_mid_round", "sampling.ClientSampler.sample", 4,
                                  "SIGTERM", *_HOOKED_FLAGS),
      # A huge client learning rate makes every client's update non-finite in
      # round 1. TFF zeroes such updates and drops their metrics, so only the
      # trainer's example count can notice; it must stop, not log loss 0.0.
      "nonfinite": plain("nonfinite", "--dp_mode=none", "--client_learning_rate=1e30",
                         "--rounds=3", "--rounds_per_checkpoint=1", "--seed=5"),
      # A run that diverges after a good round: round 2's server update is
      # made non-finite (see _HOOK); round 1 is checkpointed.
      "diverges_in_round_2": hooked("diverges_in_round_2", "inf_server_learning_rate", 2, "-",
                                    "--dp_mode=none", "--rounds=3", "--rounds_per_checkpoint=1",
                                    "--seed=5"),
      "none_seeded_a": plain("none_seeded_a", "--dp_mode=none", "--seed=11", "--rounds=2"),
      "none_seeded_b": plain("none_seeded_b", "--dp_mode=none", "--seed=11", "--rounds=2"),
      # DP sampling is seeded only on request (and then accounted without amplification).
      "local_seeded_a": plain("local_seeded_a", *_LOCAL_DP, "--seed=11", "--rounds=2",
                              "--insecure_reproducible_sampling", "--debug_metrics"),
      "local_seeded_b": plain("local_seeded_b", *_LOCAL_DP, "--seed=11", "--rounds=2",
                              "--insecure_reproducible_sampling", "--debug_metrics"),
  }


# Which runs each test needs; module setup starts only those of selected tests.
_NEEDS = {
    "test_sigterm_saves_a_checkpoint_and_exits_143": ["sigterm"],
    "test_rerun_after_sigterm_resumes_and_finishes": ["sigterm"],
    "test_sigint_saves_a_checkpoint_and_exits_130": ["sigint_in_eval"],
    "test_stop_during_evaluation_keeps_checkpoint_and_metrics_in_step": ["sigint_in_eval"],
    "test_stop_mid_round_checkpoints_the_sampler_of_the_last_finished_round":
        ["sigterm_mid_round"],
    "test_nonfinite_update_stops_the_run_with_one_error_line": ["nonfinite"],
    "test_divergence_after_a_good_round_keeps_its_checkpoint": ["diverges_in_round_2"],
    "test_seeded_runs_are_identical": ["none_seeded_a", "none_seeded_b"],
    "test_seeded_local_dp_runs_draw_the_same_noise": [
        "local_seeded_a", "local_seeded_b", "none_seeded_a"],
    "test_unseeded_local_dp_runs_differ": ["sigint_in_eval", "sigterm_mid_round"],
}
# Longest chain first, so the pool is not left waiting on it at the end.
_ORDER = ["sigterm", "sigint_in_eval", "sigterm_mid_round", "nonfinite", "diverges_in_round_2",
          "none_seeded_a", "none_seeded_b", "local_seeded_a", "local_seeded_b"]


class _Runs:

  def __init__(self, jobs, names):
    self._procs = _Procs()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=_CONCURRENT_RUNS)
    self._futures = {name: self._pool.submit(jobs[name], self._procs) for name in names}

  def get(self, name):
    if name not in self._futures:
      raise AssertionError(f"run {name} was not started: add it to _NEEDS for this test")
    return self._futures[name].result(timeout=2 * _RUN_TIMEOUT_S)

  def close(self):
    for future in self._futures.values():
      future.cancel()
    self._procs.kill_all()
    self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def runs(request, data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("reliability")
  hook_path = root / "hook.py"
  hook_path.write_text(_HOOK)
  selected = {getattr(item, "originalname", None) for item in request.session.items
              if getattr(item, "module", None) is request.module}
  needed = {run for test in selected for run in _NEEDS.get(test, [])}
  runs = _Runs(_job_table(data_dir, str(root), hook_path),
               [name for name in _ORDER if name in needed])
  yield runs
  runs.close()


def _ok(result: RunResult):
  assert result.returncode == 0, result.describe()


def _assert_worker_seen_and_gone(result: RunResult):
  assert len(result.workers) == 1, f"expected one worker child, saw {result.workers}"
  assert result.workers_left == [], f"worker outlived the trainer: {result.workers_left}"


# -------------------------------------------------------- 1. signals and resume


def test_sigterm_saves_a_checkpoint_and_exits_143(runs):
  r = runs.get("sigterm")
  killed, after = r["killed"], r["after_signal"]
  assert after["signalled"], f"the run ended before 2 rounds were logged\n{killed.describe()}"
  assert len(after["workers_at_signal"]) == 1

  assert killed.returncode == 128 + signal.SIGTERM, killed.describe()
  n = _stop_note(killed.stderr, "SIGTERM")
  assert n is not None, f"no 'checkpoint saved after round N' note\n{killed.describe()}"
  assert "Traceback" not in killed.stderr
  # Only the signal path can have saved (--rounds_per_checkpoint=100).
  assert after["checkpoints"] == [n]
  assert after.get("checkpoint_round_field") == n
  assert after["rounds"] == list(range(1, n + 1)), (
      f"checkpoint after round {n}, metrics.csv rounds {after['rounds']}: the signal landed "
      "in a round's evaluation (see test_stop_during_evaluation_...)")
  assert n >= 2
  assert not after["summary"] and not after["saved_model"]
  assert killed.workers_left == [], f"worker outlived the trainer: {killed.workers_left}"


def test_rerun_after_sigterm_resumes_and_finishes(runs):
  r = runs.get("sigterm")
  rerun, run_dir = r["rerun"], r["run_dir"]
  n = _stop_note(r["killed"].stderr, "SIGTERM")
  _ok(rerun)
  warnings = [line for line in rerun.stderr.splitlines() if line.startswith("warning:")]
  assert f"resuming {run_dir} from the checkpoint after round {n}" in rerun.stderr, warnings
  assert _rounds(run_dir) == [1, 2, 3, 4, 5, 6]
  # The rows logged before the signal are kept as they were, not recomputed.
  assert _rows(run_dir)[:n] == r["after_signal"]["rows"]
  with open(os.path.join(run_dir, "summary.json")) as f:
    assert json.load(f)["rounds_completed"] == 6
  _assert_worker_seen_and_gone(rerun)


def test_sigint_saves_a_checkpoint_and_exits_130(runs):
  r = runs.get("sigint_in_eval")
  result, run_dir = r["result"], r["run_dir"]
  assert result.returncode == 128 + signal.SIGINT, result.describe()
  n = _stop_note(result.stderr, "SIGINT")
  assert n is not None, result.describe()
  assert "Traceback" not in result.stderr
  # Periodic round_2, then the signal path's own save (round 3 was under way).
  assert _checkpoint_rounds(run_dir)[0] == 2
  assert _checkpoint_rounds(run_dir)[-1] == n and n in (2, 3)
  assert _scalar(_load_checkpoint(run_dir, n)["round"]) == n
  assert not os.path.exists(os.path.join(run_dir, "summary.json"))
  _assert_worker_seen_and_gone(result)


def test_stop_during_evaluation_keeps_checkpoint_and_metrics_in_step(runs):
  r = runs.get("sigint_in_eval")
  result, run_dir = r["result"], r["run_dir"]
  assert result.returncode == 128 + signal.SIGINT, result.describe()
  n = _stop_note(result.stderr, "SIGINT")
  assert n is not None and _checkpoint_rounds(run_dir)[-1] == n
  # The newest checkpoint and metrics.csv must describe the same finished
  # rounds, or the resumed run's metrics.csv has a gap.
  assert _rounds(run_dir) == list(range(1, n + 1)), (
      f"checkpoint after round {n}, but metrics.csv has rounds {_rounds(run_dir)}")


def test_stop_mid_round_checkpoints_the_sampler_of_the_last_finished_round(runs):
  r = runs.get("sigterm_mid_round")
  result, run_dir = r["result"], r["run_dir"]
  assert result.returncode == 128 + signal.SIGTERM, result.describe()
  _assert_worker_seen_and_gone(result)
  assert _stop_note(result.stderr, "SIGTERM") == 3, result.describe()
  assert _checkpoint_rounds(run_dir) == [2, 3]
  assert _rounds(run_dir) == [1, 2, 3]
  with open(r["sampler_states"]) as f:
    after = [json.loads(line) for line in f]   # after[k]: the state after k draws
  assert len(after) == 4
  after.append(_one_draw_later(after[3]))
  assert after[3] != after[4]
  state = _load_checkpoint(run_dir, 3)
  assert _scalar(state["round"]) == 3
  stored = json.loads(_scalar(state["sampler"]))
  draws = next((k for k, s in enumerate(after) if s == stored), "an unknown number of")
  assert stored == after[3], (
      f"the checkpoint after round 3 holds the sampler state after {draws} draws")


# ------------------------------------------------------- 2. non-finite update


def _assert_stopped_on_nonfinite(result: RunResult, run_dir) -> list:
  """Exit 1, one error line, nothing final written; returns the rounds done before."""
  assert result.returncode == 1, result.describe()
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.describe()
  assert "non-finite" in errors[0]
  assert "Traceback" not in result.stderr
  for artefact in ("summary.json", "saved_model", "final_weights.npz"):
    assert not os.path.exists(os.path.join(run_dir, artefact)), artefact
  _assert_worker_seen_and_gone(result)
  done = _rounds(run_dir)                  # rounds that completed before divergence
  assert done == list(range(1, len(done) + 1))
  assert f"round {len(done) + 1} produced a non-finite" in errors[0]
  # --rounds_per_checkpoint=1: every good round is checkpointed, the bad one never.
  assert _checkpoint_rounds(run_dir) == done
  if done:
    state = _load_checkpoint(run_dir, done[-1])
    assert _scalar(state["round"]) == done[-1]
    for leaf in _leaves(state["learning_state"]) + _leaves(state["best_weights"]):
      value = np.asarray(leaf)
      if value.dtype.kind == "f":
        assert np.all(np.isfinite(value))
  return done


def test_nonfinite_update_stops_the_run_with_one_error_line(runs):
  r = runs.get("nonfinite")
  # Diverges in round 1, so there is no good round and no checkpoint at all.
  assert _assert_stopped_on_nonfinite(r["result"], r["run_dir"]) == []


def test_divergence_after_a_good_round_keeps_its_checkpoint(runs):
  r = runs.get("diverges_in_round_2")
  assert _assert_stopped_on_nonfinite(r["result"], r["run_dir"]) == [1]


# ---------------------------------------------------------------- 3. determinism


def _assert_same_metrics(dir_a, dir_b):
  rows_a, rows_b = _rows(dir_a), _rows(dir_b)
  assert rows_a and len(rows_a) == len(rows_b)
  for a, b in zip(rows_a, rows_b):
    assert a.keys() == b.keys()
    for col in a:
      if col == "round_seconds":
        continue
      if a[col] == "" or b[col] == "":
        assert a[col] == b[col], (a["round"], col, a[col], b[col])
      else:
        assert math.isclose(float(a[col]), float(b[col]), rel_tol=1e-6), (
            a["round"], col, a[col], b[col])


def _assert_same_weights(dir_a, dir_b):
  wa, wb = _final_weights(dir_a), _final_weights(dir_b)
  assert len(wa) == len(wb) > 0
  for x, y in zip(wa, wb):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _max_weight_difference(dir_a, dir_b) -> float:
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(_final_weights(dir_a), _final_weights(dir_b)))


def test_seeded_runs_are_identical(runs):
  a, b = runs.get("none_seeded_a"), runs.get("none_seeded_b")
  _ok(a["result"])
  _ok(b["result"])
  assert _rounds(a["run_dir"]) == [1, 2]
  _assert_same_metrics(a["run_dir"], b["run_dir"])
  _assert_same_weights(a["run_dir"], b["run_dir"])


def test_seeded_local_dp_runs_draw_the_same_noise(runs):
  a, b = runs.get("local_seeded_a"), runs.get("local_seeded_b")
  _ok(a["result"])
  _ok(b["result"])
  assert _rounds(a["run_dir"]) == [1, 2]
  _assert_same_metrics(a["run_dir"], b["run_dir"])
  _assert_same_weights(a["run_dir"], b["run_dir"])
  # Noise was really added: same seed, same clients and init as the
  # non-private run, yet a clearly different model.
  none = runs.get("none_seeded_a")
  _ok(none["result"])
  assert [r["clients"] for r in _rows(none["run_dir"])] == [
      r["clients"] for r in _rows(a["run_dir"])]
  assert _max_weight_difference(a["run_dir"], none["run_dir"]) > 1e-3


def test_unseeded_local_dp_runs_differ(runs):
  # The two hooked runs: same flags, no seed; compared at their periodic
  # checkpoint after round 2 (they are stopped before writing final weights).
  # Init and sampling are unseeded too, so this shows the runs are not
  # reproducible, not which draw differs.
  a, b = runs.get("sigint_in_eval"), runs.get("sigterm_mid_round")
  weights = []
  for r in (a, b):
    assert 2 in _checkpoint_rounds(r["run_dir"]), r["result"].describe()
    state = _load_checkpoint(r["run_dir"], 2)
    trainable = state["learning_state"][0][0]   # global_model_weights.trainable
    weights.append([np.asarray(w) for w in trainable])
  assert len(weights[0]) == len(weights[1]) > 0
  assert all(np.all(np.isfinite(w)) for w in weights[0] + weights[1])
  assert max(float(np.max(np.abs(x - y))) for x, y in zip(*weights)) > 1e-3
