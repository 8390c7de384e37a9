"""Owns the TFF C++ runtime: the `worker_binary` process and the execution context.

TFF's own local context starts `worker_binary` lazily, from whichever thread
first executes a computation, writes into our stdout, and kills it only in
`__del__`, which does not run reliably at interpreter exit; the leftover
process then holds pipes open (and can hang CI). Here the worker is started
eagerly from the calling thread, its output goes to a log file, it is told by
the kernel to die with its parent (so even SIGKILL of the trainer leaves no
worker), and it is stopped explicitly on exit, on error and at interpreter
exit.
"""

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import Iterator, Optional

from absl import logging
import grpc
import portpicker
import tensorflow_federated as tff
# TFF 0.87 exposes no public factory taking an existing worker, so the pieces
# its `create_sync_local_cpp_execution_context` is made of are used directly.
from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

WORKER_BINARY = os.path.join(os.path.dirname(tff.__file__), "data", "worker_binary")
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [
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
  # Our terminal's Ctrl-C must reach the trainer first, so it can checkpoint.
  os.setpgrp()


class WorkerProcess:
  """One `worker_binary` process serving TFF's executor protocol on a port."""

  def __init__(self, *, port: Optional[int] = None, binary: str = WORKER_BINARY,
               max_concurrent_computation_calls: int = -1,
               log_path: Optional[str] = None, host: str = "127.0.0.1"):
    if not os.path.isfile(binary):
      raise WorkerError(f"TFF worker binary not found at {binary}")
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


def wait_until_ready(address: str, timeout_s: float,
                     process: Optional[subprocess.Popen] = None) -> None:
  """Blocks until a TFF executor service answers at `address`."""
  channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
  try:
    grpc.channel_ready_future(channel).result(timeout=timeout_s)
  except grpc.FutureTimeoutError:
    dead = process is not None and process.poll() is not None
    raise WorkerError(
        f"TFF worker at {address} {'exited' if dead else 'did not answer'} "
        f"within {timeout_s:.0f}s") from None
  finally:
    channel.close()


def _make_context(addresses: list[str], default_num_clients: int = 0):
  """A synchronous TFF context whose executors talk to workers at `addresses`."""
  if len(addresses) != 1:
    raise ValueError("exactly one worker address per context")
  channel = grpc.insecure_channel(addresses[0], _GRPC_OPTIONS)
  stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)

  def stack_fn(cardinalities):
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = default_num_clients
    if not stub.is_ready:
      raise WorkerError(f"the TFF worker at {addresses[0]} is not reachable")
    executor = remote_executor.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  factory = python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)
  return sync_execution_context.SyncExecutionContext(
      executor_fn=factory,
      compiler_fn=compiler.desugar_and_transform_to_native,
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )


@contextlib.contextmanager
def local_runtime(*, max_concurrent_computation_calls: int = -1,
                  log_dir: Optional[str] = None) -> Iterator[WorkerProcess]:
  """Starts a local worker, makes it TFF's default context, and always stops it."""
  log_path = os.path.join(log_dir, "tff_worker.log") if log_dir else None
  worker = WorkerProcess(max_concurrent_computation_calls=max_concurrent_computation_calls,
                         log_path=log_path).start()
  stack = tff.framework.get_context_stack()
  previous = stack.current  # An error context, or an enclosing runtime's.
  stack.set_default_context(_make_context([worker.address]))
  try:
    yield worker
  finally:
    stack.set_default_context(previous)
    worker.stop()


def _set_no_runtime_context() -> None:
  """Outside `local_runtime`, executing a computation is an error, not a new worker.

  Replacing TFF's import-time default context also drops its lazy worker
  manager while the interpreter is intact, so its `__del__` no longer fails
  noisily at exit.
  """
  tff.framework.get_context_stack().set_default_context(
      runtime_error_context.RuntimeErrorContext())


_set_no_runtime_context()


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
