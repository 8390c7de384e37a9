"""Training on TFF workers started with `python -m tff_dpmed.worker`, as a user would.

Two workers run on 127.0.0.1 for the whole module. The trainer runs are
subprocesses of the real CLI and cost ~40-90 s each (mostly TFF's one-off
compile), so there are four, shared between tests and started at module
setup on two threads; each test waits for the runs it needs:

  remote chain: a seeded 3-round run over both workers, one of which is
    SIGKILLed once round 1 is logged (so it dies with rounds 2-3 to go); the
    worker is restarted on its port and the same command rerun, which must
    resume and end with the weights of the local run;
  local chain: the same seeded run on the local executor (the reference);
    then a run with an unreachable worker.

Nothing here asserts on elapsed time.
"""

import concurrent.futures
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import numpy as np
import portpicker
import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.run_outputs import checkpoint_rounds as _checkpoint_rounds
from tests.run_outputs import read_rows as _rows
from tests.e2e.test_train_bad_inputs import _message_lines
from tff_dpmed.errors import UsageError
from tff_dpmed.program import artifacts
from tff_dpmed.program.config import RunConfig

_COMMON = ["--dataset=breastmnist", "--num_clients=6", "--clients_per_round=3",
           "--client_batch_size=32", "--rounds_per_eval=1", "--progress=false"]
_SEEDED = ["--dp_mode=none", "--seed=11", "--rounds=3", "--rounds_per_checkpoint=1"]
_RUN_TIMEOUT_S = 900
_READY_TIMEOUT_S = 120


# ------------------------------------------------------------------ workers


class Worker:
  """One `python -m tff_dpmed.worker` process on a fixed port."""

  def __init__(self, port: int, log_dir: str, name: str):
    self.port = port
    self.log_dir = log_dir
    self.name = name
    self.proc: Optional[subprocess.Popen] = None
    self.binary_pid: Optional[int] = None
    self.ready_line = ""
    self.starts = 0

  @property
  def address(self) -> str:
    return f"127.0.0.1:{self.port}"

  def start(self) -> "Worker":
    self.starts += 1
    stderr = open(os.path.join(self.log_dir, f"{self.name}-{self.starts}.stderr"), "w")
    self.proc = subprocess.Popen(
        # Plaintext on loopback; mutual TLS has its own tests (test_worker_tls.py).
        [sys.executable, "-m", "tff_dpmed.worker", f"--port={self.port}", "--insecure",
         f"--log_file={os.path.join(self.log_dir, f'{self.name}-{self.starts}.log')}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    # A worker that fails exits and closes stdout, so this cannot block forever.
    self.ready_line = self.proc.stdout.readline()
    if not self.ready_line.startswith("ready:"):
      self.proc.wait(timeout=_READY_TIMEOUT_S)
      raise AssertionError(f"worker on port {self.port} did not start: exit "
                           f"{self.proc.returncode}, stdout {self.ready_line!r}")
    self.binary_pid = int(re.search(r"worker_binary pid (\d+)", self.ready_line).group(1))
    return self

  def signal(self, signum) -> tuple[int, str]:
    """Signals the wrapper; returns its exit code and the rest of its stdout."""
    self.proc.send_signal(signum)
    out, _ = self.proc.communicate(timeout=60)
    return self.proc.returncode, out

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.signal(signal.SIGTERM)


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
        return True
    except psutil.NoSuchProcess:
      return True
    time.sleep(0.1)
  return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  log_dir = str(tmp_path_factory.mktemp("workers"))
  workers = [Worker(portpicker.pick_unused_port(), log_dir, name) for name in ("a", "b")]
  try:
    for w in workers:
      w.start()
    yield workers
  finally:
    for w in workers:
      w.stop()
    left = [w.binary_pid for w in workers if w.binary_pid and not _gone(w.binary_pid)]
    assert left == [], f"worker_binary processes outlived their workers: {left}"


# --------------------------------------------------------------------- runs


@dataclasses.dataclass
class RunResult:
  returncode: int
  stdout: str
  stderr: str

  def describe(self) -> str:
    return f"exit {self.returncode}\nstderr tail:\n{self.stderr[-4000:]}"


def _train_cmd(data_dir, out_dir, name, *flags):
  return [sys.executable, "-m", "tff_dpmed.train", f"--data_dir={data_dir}",
          f"--output_dir={out_dir}", f"--experiment_name={name}", *_COMMON, *flags]


def _remote(cluster_workers):
  return ["--executor=remote", f"--workers={','.join(w.address for w in cluster_workers)}"]


class _Procs:
  """Trainer processes started here, so teardown can kill any still running."""

  def __init__(self):
    self._lock = threading.Lock()
    self._procs = []

  def start(self, cmd, log_prefix) -> subprocess.Popen:
    with self._lock:
      with open(f"{log_prefix}.stdout", "w") as out, open(f"{log_prefix}.stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=err)
      self._procs.append(proc)
      return proc

  def finish(self, proc, log_prefix) -> RunResult:
    try:
      proc.wait(timeout=_RUN_TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    with open(f"{log_prefix}.stdout") as f, open(f"{log_prefix}.stderr") as g:
      return RunResult(proc.returncode, f.read(), g.read())

  def run(self, cmd, log_prefix) -> RunResult:
    return self.finish(self.start(cmd, log_prefix), log_prefix)

  def kill_all(self):
    with self._lock:
      for proc in self._procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()


def _remote_chain(procs, cluster_workers, data_dir, root):
  run_dir = os.path.join(root, "remote")
  out = {"run_dir": run_dir}
  cmd = _train_cmd(data_dir, root, "remote", *_SEEDED, *_remote(cluster_workers))
  victim = cluster_workers[1]
  proc = procs.start(cmd, os.path.join(root, "remote-1"))
  deadline = time.monotonic() + _RUN_TIMEOUT_S
  while not _rows(run_dir) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  out["killed_while_running"] = proc.poll() is None
  binary_pid = victim.binary_pid
  # SIGKILL: the wrapper gets no chance to stop its binary; the kernel must.
  victim.proc.kill()
  victim.proc.wait()
  out["victim_binary_gone"] = _gone(binary_pid)
  out["killed"] = procs.finish(proc, os.path.join(root, "remote-1"))
  out["killed_rows"] = [int(r["round"]) for r in _rows(run_dir)]
  out["killed_checkpoints"] = _checkpoint_rounds(run_dir)
  out["killed_summary"] = os.path.exists(os.path.join(run_dir, "summary.json"))

  victim.start()  # Same port, as an operator would restart it.
  out["resumed"] = procs.run(cmd, os.path.join(root, "remote-2"))
  return out


def _local_chain(procs, cluster_workers, data_dir, root):
  out = {"local_dir": os.path.join(root, "local")}
  out["local"] = procs.run(_train_cmd(data_dir, root, "local", *_SEEDED),
                           os.path.join(root, "local"))
  nobody = f"127.0.0.1:{portpicker.pick_unused_port()}"
  out["unreachable_address"] = nobody
  out["unreachable_dir"] = os.path.join(root, "unreachable", "run")
  out["unreachable"] = procs.run(
      _train_cmd(data_dir, os.path.join(root, "unreachable"), "run", *_SEEDED,
                 "--executor=remote", f"--workers={cluster_workers[0].address},{nobody}"),
      os.path.join(root, "unreachable"))
  return out


class _Runs:

  def __init__(self, jobs):
    self._procs = _Procs()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs))
    self._futures = {name: self._pool.submit(job, self._procs) for name, job in jobs.items()}

  def get(self, name):
    return self._futures[name].result(timeout=4 * _RUN_TIMEOUT_S)

  def close(self):
    self._procs.kill_all()
    self._pool.shutdown(wait=True)


# Which run chain each test needs; module setup starts only those of selected tests.
_NEEDS = {
    "test_worker_killed_mid_run_is_one_error_line_and_keeps_the_checkpoint": ["remote"],
    "test_rerun_after_the_worker_is_back_resumes_and_finishes": ["remote"],
    "test_remote_run_matches_the_local_run": ["remote", "local"],
    "test_unreachable_worker_at_start_is_one_error_line_and_nothing_written": ["local"],
}


@pytest.fixture(scope="module")
def runs(request, cluster, data_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("remote_runs"))
  selected = {getattr(item, "originalname", None) for item in request.session.items
              if getattr(item, "module", None) is request.module}
  needed = {chain for test in selected for chain in _NEEDS.get(test, [])}
  jobs = {"remote": lambda procs: _remote_chain(procs, cluster, data_dir, root),
          "local": lambda procs: _local_chain(procs, cluster, data_dir, root)}
  runs = _Runs({name: job for name, job in jobs.items() if name in needed})
  yield runs
  runs.close()


def _ok(result: RunResult):
  assert result.returncode == 0, result.describe()


def _assert_same_weights(dir_a, dir_b):
  a, b = artifacts.load_final_weights(dir_a), artifacts.load_final_weights(dir_b)
  assert len(a) == len(b)
  for wa, wb in zip(a, b):
    # Summation order differs across workers: equal up to float rounding.
    np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def _one_error_line(result: RunResult) -> str:
  lines = [line for line in _message_lines(result.stderr) if not line.startswith("note:")]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.describe()
  assert "Traceback" not in result.stderr
  return lines[0]


# -------------------------------------------------------------------- tests


def test_worker_killed_mid_run_is_one_error_line_and_keeps_the_checkpoint(runs, cluster):
  r = runs.get("remote")
  assert r["killed_while_running"], (
      f"the run ended before the worker could be killed\n{r['killed'].describe()}")
  assert r["victim_binary_gone"], "SIGKILL of the worker left its worker_binary running"
  killed = r["killed"]
  assert killed.returncode == 1, killed.describe()
  line = _one_error_line(killed)
  assert cluster[1].address in line and "rerun the same command" in line
  # Round 1 was committed before the kill; the failed round left no trace.
  assert r["killed_checkpoints"], killed.describe()
  n = r["killed_checkpoints"][-1]
  assert f"checkpoint after round {n} is kept" in line
  assert r["killed_rows"] == list(range(1, n + 1)) and n < 3
  assert not r["killed_summary"]


def test_rerun_after_the_worker_is_back_resumes_and_finishes(runs):
  r = runs.get("remote")
  resumed = r["resumed"]
  _ok(resumed)
  n = r["killed_checkpoints"][-1]
  assert f"resuming {r['run_dir']} from the checkpoint after round {n}" in resumed.stderr
  assert [int(row["round"]) for row in _rows(r["run_dir"])] == [1, 2, 3]


def test_remote_run_matches_the_local_run(runs):
  remote, local = runs.get("remote"), runs.get("local")
  _ok(remote["resumed"])
  _ok(local["local"])
  # Same clients each round, all of their examples trained on, same losses.
  remote_rows, local_rows = _rows(remote["run_dir"]), _rows(local["local_dir"])
  assert [r["clients"] for r in remote_rows] == [r["clients"] for r in local_rows]
  for r, l in zip(remote_rows, local_rows):
    assert float(r["train_loss"]) == pytest.approx(float(l["train_loss"]), rel=1e-4)
  _assert_same_weights(remote["run_dir"], local["local_dir"])


def test_unreachable_worker_at_start_is_one_error_line_and_nothing_written(runs):
  local = runs.get("local")
  result = local["unreachable"]
  assert result.returncode == 2, result.describe()
  line = _one_error_line(result)
  assert local["unreachable_address"] in line
  assert "tff_dpmed.worker" in line  # Says how to start one.
  assert not os.path.exists(local["unreachable_dir"])


def test_clients_are_spread_over_the_workers(cluster, monkeypatch):
  import tensorflow_federated as tff
  from tff_dpmed.federated import context
  seen = []
  make_factory = context._executor_factory

  def recording_factory(address, default_num_clients, credentials=None):
    factory = make_factory(address, default_num_clients, credentials)
    create = factory.create_executor

    def create_executor(cardinalities):
      seen.append((address, cardinalities.get(tff.CLIENTS)))
      return create(cardinalities)

    factory.create_executor = create_executor
    return factory

  monkeypatch.setattr(context, "_executor_factory", recording_factory)

  @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
  def total(values):
    return tff.federated_sum(values)

  with context.remote_runtime([w.address for w in cluster]):
    assert total([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(15.0)
  # Each worker's first executor is for its share of the 5 clients (the
  # finishing step, on one of them, later gets the first share's argument).
  first = {}
  for address, n in seen:
    first.setdefault(address, n)
  assert set(first) == {w.address for w in cluster}
  assert sorted(first.values()) == [2, 3]


# ------------------------------------------------------- the worker CLI itself


def test_worker_cli_bad_input_is_one_error_line(cluster, tmp_path):
  not_executable = tmp_path / "worker_binary"
  not_executable.write_text("")
  cases = {
      "port in use": ([f"--port={cluster[0].port}"], ("port", str(cluster[0].port), "in use")),
      "binary missing": ([f"--port={portpicker.pick_unused_port()}",
                          f"--worker_binary={tmp_path / 'nope'}"], ("not found", "nope")),
      "not executable": ([f"--port={portpicker.pick_unused_port()}",
                          f"--worker_binary={not_executable}"], ("not executable",)),
      "port out of range": (["--port=70000"], ("--port=70000",)),
  }
  procs = {name: subprocess.Popen([sys.executable, "-m", "tff_dpmed.worker", "--insecure",
                                   *flags],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (flags, _) in cases.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    result = RunResult(proc.returncode, out, err)
    assert proc.returncode == 2, f"{name}: {result.describe()}"
    line = _one_error_line(result)
    for word in cases[name][1]:
      assert word in line, f"{name}: {line}"
    assert "ready:" not in out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_worker_cli_stops_its_binary_on_signal(signum, tmp_path):
  worker = Worker(portpicker.pick_unused_port(), str(tmp_path), "w").start()
  assert f":{worker.port}" in worker.ready_line and psutil.pid_exists(worker.binary_pid)
  code, out = worker.signal(signum)
  assert code == 0
  assert f"stopped: {signal.Signals(signum).name} received" in out
  assert _gone(worker.binary_pid), "worker_binary outlived its worker"


# ---------------------------------------------------- flags, without a runtime


@pytest.mark.parametrize("kwargs, words", [
    (dict(executor="remote"), ("--workers",)),
    (dict(workers="127.0.0.1:8000"), ("--executor=remote",)),
    (dict(executor="remote", workers="127.0.0.1"), ("127.0.0.1", "HOST:PORT")),
    (dict(executor="remote", workers="h:0"), ("h:0",)),
    (dict(executor="remote", workers="h:1,h:1"), ("twice",)),
    (dict(executor="remote", workers="h:1", worker_binary="/x"), ("--worker_binary",)),
    (dict(executor="remote", workers="h:1", max_concurrent_computation_calls=4),
     ("--max_concurrent_computation_calls",)),
    (dict(executor="gpu"), ("--executor=gpu",)),
    (dict(executor="remote", workers="h:1", worker_tls_ca="ca.pem"),
     ("--worker_tls_cert", "--worker_tls_key")),
    (dict(worker_tls_ca="a", worker_tls_cert="b", worker_tls_key="c"), ("--executor=remote",)),
    (dict(executor="remote", workers="h:1", insecure_local_executor=True),
     ("--insecure_local_executor",)),
], ids=["remote-no-workers", "workers-without-remote", "no-port", "port-zero", "duplicate",
        "binary-with-remote", "max-calls-with-remote", "unknown-executor", "partial-tls",
        "tls-with-local", "insecure-local-with-remote"])
def test_runtime_flags_are_validated(kwargs, words):
  with pytest.raises(UsageError) as e:  # A RunConfig is validated when it is made.
    RunConfig.from_json(dict(dp_mode="none", **kwargs))
  for word in words:
    assert word in str(e.value)


def test_runtime_flags_accepted():
  make = lambda **kw: RunConfig.from_json(dict(dp_mode="none", **kw))
  make(executor="remote", workers="a:1, [::1]:8000")
  make(worker_binary="/some/cuda/worker_binary", max_concurrent_computation_calls=2,
       insecure_local_executor=True)
  make(executor="remote", workers="a:1", worker_tls_ca="ca.pem", worker_tls_cert="c.pem",
       worker_tls_key="c.key")
  assert make(executor="remote", workers="a:1, b:2").worker_addresses == ["a:1", "b:2"]
