"""The `worker_binary` process: start it, know when it serves, and never leave it behind.

TFF's own local context starts `worker_binary` lazily, from whichever thread
first executes a computation, writes into our stdout, and kills it only in
`__del__`, which does not run reliably at interpreter exit; the leftover
process then holds pipes open (and can hang CI). Here the worker is started
eagerly from the calling thread, its output goes to a log file, it is told by
the kernel to die with its parent (so even SIGKILL of its owner leaves no
worker), and it is stopped explicitly on exit, on error and at interpreter
exit.

This module imports neither TensorFlow nor TFF, so `python -m tff_dpmed.worker`
starts in a fraction of a second and stays small while its worker runs.
"""

import atexit
import ctypes
import importlib.util
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import Optional

from absl import logging
import grpc
import portpicker

# Found without importing TFF (which takes seconds and hundreds of MB).
WORKER_BINARY = os.path.join(
    importlib.util.find_spec("tensorflow_federated").submodule_search_locations[0],
    "data", "worker_binary")
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
]
_PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
  """A TFF worker could not be started or reached."""


def _die_with_parent() -> None:  # Runs in the child between fork and exec.
  libc = ctypes.CDLL("libc.so.6", use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  # Our terminal's Ctrl-C must reach the owner first (the trainer, to checkpoint).
  os.setpgrp()


class WorkerProcess:
  """One `worker_binary` process serving TFF's executor protocol on a port."""

  def __init__(self, *, port: Optional[int] = None, binary: str = WORKER_BINARY,
               max_concurrent_computation_calls: int = -1,
               log_path: Optional[str] = None, host: str = "127.0.0.1"):
    check_worker_binary(binary)
    self.binary = binary
    self.host = host
    self.port = port or portpicker.pick_unused_port()
    self.max_concurrent_computation_calls = max_concurrent_computation_calls
    self.log_path = log_path or os.path.join(
        tempfile.gettempdir(), f"tff_dpmed_worker_{os.getpid()}_{self.port}.log")
    self.process: Optional[subprocess.Popen] = None

  @property
  def address(self) -> str:
    return f"{self.host}:{self.port}"

  def start(self, timeout_s: float = 60.0) -> "WorkerProcess":
    args = [self.binary, f"--port={self.port}",
            f"--max_concurrent_computation_calls={self.max_concurrent_computation_calls}"]
    with open(self.log_path, "ab") as log:
      self.process = subprocess.Popen(
          args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
          preexec_fn=_die_with_parent, close_fds=True)
    _register(self)
    try:
      wait_until_ready(self.address, timeout_s, process=self.process)
    except BaseException:
      self.stop()
      raise
    logging.info("TFF worker pid %d serving on %s (log %s)",
                 self.process.pid, self.address, self.log_path)
    return self

  def alive(self) -> bool:
    return self.process is not None and self.process.poll() is None

  def stop(self, timeout_s: float = 10.0) -> None:
    """Stops the worker: SIGINT, then SIGKILL if it does not exit in time."""
    process, self.process = self.process, None
    _unregister(self)
    if process is None or process.poll() is not None:
      return
    try:
      process.send_signal(signal.SIGINT)
      process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    except ProcessLookupError:
      pass


def check_worker_binary(binary: str) -> None:
  if not os.path.isfile(binary):
    raise WorkerError(f"TFF worker binary not found at {binary}")
  if not os.access(binary, os.X_OK):
    raise WorkerError(f"TFF worker binary {binary} is not executable (chmod +x it)")


def wait_until_ready(address: str, timeout_s: float,
                     process: Optional[subprocess.Popen] = None) -> None:
  """Blocks until a TFF executor service answers at `address`."""
  channel = grpc.insecure_channel(address, GRPC_OPTIONS)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout_s)
  except grpc.FutureTimeoutError:
    dead = process is not None and process.poll() is not None
    raise WorkerError(
        f"TFF worker at {address} {'exited' if dead else 'did not answer'} "
        f"within {timeout_s:.0f}s") from None
  finally:
    channel.close()


# Every worker this process started, so none survives the interpreter.
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def _register(worker: WorkerProcess) -> None:
  with _LIVE_LOCK:
    _LIVE.add(worker)


def _unregister(worker: WorkerProcess) -> None:
  with _LIVE_LOCK:
    _LIVE.discard(worker)


def stop_all_workers() -> None:
  with _LIVE_LOCK:
    workers = list(_LIVE)
  for worker in workers:
    worker.stop()


atexit.register(stop_all_workers)


def worker_pids() -> list[int]:
  """PIDs of all `worker_binary` processes on this machine (for checks and tests)."""
  out = subprocess.run(["pgrep", "-f", "tensorflow_federated/data/worker_binary"],
                       capture_output=True, text=True, check=False).stdout
  return [int(p) for p in out.split()]


def wait_for_no_workers(timeout_s: float = 10.0) -> list[int]:
  """Waits until no worker_binary runs; returns those still alive at the deadline."""
  deadline = time.monotonic() + timeout_s
  while (pids := worker_pids()) and time.monotonic() < deadline:
    time.sleep(0.1)
  return pids
