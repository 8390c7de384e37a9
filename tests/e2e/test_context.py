"""The TFF worker never outlives its owner: normal exit, exception, signals, SIGKILL."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest

from tff_dpmed.federated import context

_SCRIPT = r"""
import os, sys, time
import numpy as np
import psutil
import tensorflow_federated as tff
from tff_dpmed.federated import context
mode = sys.argv[1]
with context.local_runtime() as worker:
  @tff.tensorflow.computation(np.float32)
  def add_one(x):
    return x + 1
  assert add_one(np.float32(1)) == 2
  forwarder, = psutil.Process(worker.binary_pid).children()  # The Unix-socket bridge.
  print(f"worker {worker.binary_pid} {forwarder.pid} {worker.socket_dir}", flush=True)
  if mode == "raise":
    raise RuntimeError("boom")
  if mode == "wait":
    time.sleep(600)
if mode == "leak":
  # Deliberately no context manager: only the atexit hook stops this one.
  context.WorkerProcess().start()
  print("leaked", flush=True)
"""


def _start(mode):
  # stderr goes to a file, not a pipe nobody reads (a full pipe would block the script).
  stderr = tempfile.TemporaryFile(mode="w+")
  proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, mode], stdout=subprocess.PIPE,
                          stderr=stderr, text=True)
  proc.stderr_file = stderr
  return proc


def _worker_pid(proc) -> tuple[int, int, str]:
  """The worker_binary's pid, its Unix-socket forwarder's pid, and the socket's folder."""
  for line in proc.stdout:
    if line.startswith("worker "):
      binary, bridge, socket_dir = line.split()[1:]
      return int(binary), int(bridge), socket_dir
  proc.wait(timeout=60)
  proc.stderr_file.seek(0)
  tail = proc.stderr_file.read()[-3000:]
  raise AssertionError(f"the script never reported its worker (exit {proc.returncode}):\n{tail}")


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
      return True
    time.sleep(0.1)
  return False


@pytest.mark.parametrize("mode", ["normal", "raise", "leak"])
def test_worker_stopped_at_exit(mode):
  proc = _start(mode)
  pid, bridge, socket_dir = _worker_pid(proc)
  proc.wait(timeout=120)
  assert proc.returncode == (1 if mode == "raise" else 0)
  assert _gone(pid), f"worker {pid} outlived its owner ({mode})"
  assert _gone(bridge), f"the worker's bridge {bridge} outlived its owner ({mode})"
  assert not os.path.exists(socket_dir)


def _wait_gone(path: str, timeout_s: float = 15.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.1)
  return not os.path.exists(path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_worker_stopped_when_owner_is_signalled(signum):
  proc = _start("wait")
  pid, bridge, socket_dir = _worker_pid(proc)
  assert psutil.pid_exists(pid) and os.path.exists(socket_dir)
  os.kill(proc.pid, signum)
  proc.wait(timeout=60)
  name = signal.Signals(signum).name
  assert _gone(pid), f"worker {pid} outlived an owner killed by {name}"
  assert _gone(bridge), f"the worker's bridge {bridge} outlived an owner killed by {name}"
  # Even SIGKILL: the forwarder's die-with-parent signal is SIGTERM, and it cleans up.
  assert _wait_gone(socket_dir), f"{socket_dir} outlived an owner killed by {name}"


def test_worker_output_goes_to_its_log_not_our_stdout(tmp_path):
  with context.local_runtime(log_dir=str(tmp_path)) as worker:
    assert worker.alive()
    assert os.path.exists(tmp_path / "tff_worker.log")
  assert not worker.alive()


def test_missing_or_non_executable_worker_binary_is_a_worker_error(tmp_path):
  with pytest.raises(context.WorkerError, match="not found"):
    with context.local_runtime(binary=str(tmp_path / "nope")):
      pass
  plain = tmp_path / "worker_binary"
  plain.write_text("")
  with pytest.raises(context.WorkerError, match="not executable"):
    context.WorkerProcess(binary=str(plain))
  with pytest.raises(context.WorkerError, match="not a TFF worker_binary"):
    context.WorkerProcess(binary="/bin/true")


def test_unreachable_worker_is_named(tmp_path):
  import portpicker
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  with pytest.raises(context.WorkerError, match=address):
    context.check_reachable([address], timeout_s=0.5)


def _environ(pid: int) -> dict:
  with open(f"/proc/{pid}/environ", "rb") as f:
    return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def test_the_worker_runs_ops_on_one_thread_only_when_the_clients_fill_the_cores(tmp_path):
  cores = len(os.sched_getaffinity(0))
  fill = context.CLIENTS_PER_CORE_FOR_ONE_THREAD * cores
  assert context.worker_intra_op_threads(fill) == 1
  assert context.worker_intra_op_threads(fill - 1) is None
  assert context.worker_intra_op_threads(None) is None
  for clients, want in ((fill, "1"), (fill - 1, None)):
    with context.local_runtime(log_dir=str(tmp_path), concurrent_clients=clients) as worker:
      assert _environ(worker.binary_pid).get("TF_NUM_INTRAOP_THREADS") == want
