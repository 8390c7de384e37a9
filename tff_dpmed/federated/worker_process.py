"""The `worker_binary` process: start it, know when it serves, and never leave it behind.

TFF's own local context starts `worker_binary` lazily, from whichever thread
first executes a computation, writes into our stdout, and kills it only in
`__del__`, which does not run reliably at interpreter exit; the leftover
process then holds pipes open (and can hang CI). Here the worker is started
eagerly from the calling thread, its output goes to a log file, it is told by
the kernel to die with its parent (so even SIGKILL of its owner leaves no
worker), and it is stopped explicitly on exit, on error and at interpreter
exit.

Isolation: the binary serves TFF's executor protocol without authentication
on `[::]:PORT`, all interfaces, and cannot be told otherwise; anyone reaching
the port runs arbitrary TensorFlow computations as our user. So by default
(`isolated=True`) it runs in a network namespace of its own (`unshare --user
--map-root-user --net`, which needs no root where unprivileged user
namespaces are allowed) and is reached through a Unix socket in a private
0700 folder, bridged into the namespace by `netns_bridge`; the process we
start still ends up as the binary itself (the bridge execs it), so its pid,
lifetime and exit code are handled the same either way. Only an explicit
`isolated=False` runs it on the host's network, as TFF does.

This module imports neither TensorFlow nor TFF, so `python -m tff_dpmed.worker`
starts in a fraction of a second and stays small while its worker runs.
"""

import atexit
import ctypes
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from absl import logging
import grpc
import portpicker

from tff_dpmed.federated import netns_bridge

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
# A fresh network namespace has every port free, so a fixed one cannot clash.
_NAMESPACE_PORT = 10000
# util-linux's unshare: a user namespace (so no root is needed) owning a new network namespace.
UNSHARE_ARGS = ["--user", "--map-root-user", "--net"]
# Every worker_binary defines this flag (worker_main.cc); other programs do not.
_WORKER_FLAG = "max_concurrent_computation_calls"


class WorkerError(RuntimeError):
  """A TFF worker could not be started or reached."""


class IsolationError(WorkerError):
  """This machine cannot run the worker in a private network namespace."""


def set_parent_death_signal(sig: int) -> None:
  """Linux delivers `sig` to this process when its parent dies, however the parent died."""
  libc = ctypes.CDLL("libc.so.6", use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, sig)


def _die_with_parent() -> None:  # Runs in the child between fork and exec.
  set_parent_death_signal(signal.SIGKILL)
  # Our terminal's Ctrl-C must reach the owner first (the trainer, to checkpoint).
  os.setpgrp()


class WorkerProcess:
  """One `worker_binary` process serving TFF's executor protocol.

  Isolated (the default): in its own network namespace, at `unix:<socket>`.
  Otherwise: on all interfaces of this host at `port`. Either way `process`
  is the binary itself.
  """

  def __init__(self, *, port: Optional[int] = None, binary: str = WORKER_BINARY,
               max_concurrent_computation_calls: int = -1,
               log_path: Optional[str] = None, host: str = "127.0.0.1",
               isolated: bool = True, intra_op_threads: Optional[int] = None):
    check_worker_binary(binary)
    if isolated:
      check_isolation()
    self.binary = binary
    self.host = host
    self.isolated = isolated
    self.port = _NAMESPACE_PORT if isolated else (port or portpicker.pick_unused_port())
    self.max_concurrent_computation_calls = max_concurrent_computation_calls
    self.intra_op_threads = intra_op_threads
    self.log_path = log_path or os.path.join(
        tempfile.gettempdir(), f"tff_dpmed_worker_{os.getpid()}_{id(self):x}.log")
    self.process: Optional[subprocess.Popen] = None
    self.socket_dir: Optional[str] = None
    self._ready = False
    self._ready_timeout_s = 60.0

  @property
  def binary_pid(self) -> Optional[int]:
    return self.process.pid if self.process is not None else None

  @property
  def socket_path(self) -> Optional[str]:
    return os.path.join(self.socket_dir, "executor.sock") if self.socket_dir else None

  @property
  def address(self) -> str:
    """The gRPC target: `unix:/path` when isolated, `host:port` otherwise."""
    if self.isolated:
      return f"unix:{self.socket_path}"
    return f"{self.host}:{self.port}"

  def start(self, timeout_s: float = 60.0, wait: bool = True) -> "WorkerProcess":
    """Launches the worker; with `wait`, returns once it serves (else call `wait_ready`:
    the binary takes a second or more to load, which the caller can overlap)."""
    worker_args = [self.binary,
                   f"--max_concurrent_computation_calls={self.max_concurrent_computation_calls}"]
    env = dict(os.environ)
    if self.intra_op_threads is not None:
      # Read by TF's runtime in the binary (process_util.cc) for its sessions' op pools.
      env["TF_NUM_INTRAOP_THREADS"] = str(self.intra_op_threads)
    if self.isolated:
      # Unix socket paths are limited to 107 bytes; a long $TMPDIR would not fit.
      parent = tempfile.gettempdir() if len(tempfile.gettempdir()) < 60 else "/tmp"
      self.socket_dir = tempfile.mkdtemp(prefix="tff_dpmed_worker_", dir=parent)  # Mode 0700.
      args = [shutil.which("unshare"), *UNSHARE_ARGS, "--",
              sys.executable, "-I", os.path.abspath(netns_bridge.__file__),
              f"--socket={self.socket_path}", f"--port={self.port}",
              f"--parent_pid={os.getpid()}", f"--ready_timeout_s={timeout_s}"]
      env[netns_bridge.ARGV_ENV] = json.dumps(worker_args)
    else:
      args = [*worker_args, f"--port={self.port}"]
    with open(self.log_path, "ab") as log:
      # The die-with-parent signal survives unshare's and the bridge's exec into the binary.
      self.process = subprocess.Popen(
          args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
          preexec_fn=_die_with_parent, close_fds=True)
    _register(self)
    self._ready_timeout_s = timeout_s
    self._ready = False
    if wait:
      self.wait_ready()
    return self

  def wait_ready(self) -> None:
    """Returns once the launched worker serves; stops it and raises WorkerError if it
    does not within `start`'s timeout of this call."""
    if self._ready:
      return
    try:
      wait_until_ready(self.address, self._ready_timeout_s, process=self.process)
    except WorkerError as e:
      self.stop()
      raise WorkerError(f"{e}{_last_line(self.log_path)}") from None
    except BaseException:
      self.stop()
      raise
    self._ready = True
    logging.info("TFF worker pid %d serving on %s (log %s)",
                 self.process.pid, self.address, self.log_path)

  def alive(self) -> bool:
    return self.process is not None and self.process.poll() is None

  def exit_reason(self) -> str:
    """Why the worker is gone ('' while it runs): its exit code, or the signal that killed it."""
    code = None if self.process is None else self.process.poll()
    if code is None:
      return ""
    if code >= 0:
      return f"it exited with code {code}{_last_line(self.log_path)}"
    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = f"signal {-code}"
    oom = (" (on Linux usually the out-of-memory killer: see `dmesg`; use fewer clients per "
           "round, a smaller model, or a machine with more memory)"
           if -code == signal.SIGKILL else "")
    return f"it was killed by {name}{oom}"

  def stop(self, timeout_s: float = 10.0) -> None:
    """Stops the worker: SIGINT, then SIGKILL if it does not exit in time.

    Isolated, the bridge's forwarder gets SIGTERM from the kernel when the
    binary exits and removes the socket folder; it is removed here as well.
    """
    process, self.process = self.process, None
    _unregister(self)
    try:
      if process is not None and process.poll() is None:
        try:
          process.send_signal(signal.SIGINT)
          process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()
        except ProcessLookupError:
          pass
    finally:
      if self.socket_dir is not None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.socket_dir = None


def _last_line(log_path: str) -> str:
  """` (<the log's last line>)`, which usually says why a worker died at start."""
  try:
    with open(log_path, "rb") as f:
      f.seek(max(0, os.path.getsize(log_path) - 2000))
      lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
  except OSError:
    return ""
  return f" ({lines[-1]})" if lines else ""


@functools.lru_cache(maxsize=None)
def _isolation_problem() -> Optional[str]:
  """Why a private network namespace cannot be made here, or None if it can."""
  unshare = shutil.which("unshare")
  if unshare is None:
    return "`unshare` (util-linux) is not installed"
  try:
    probe = subprocess.run([unshare, *UNSHARE_ARGS, "--", sys.executable, "-I", "-c", ""],
                           capture_output=True, text=True, timeout=30, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"`unshare` failed: {e}"
  if probe.returncode != 0:
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"`unshare` exited with code {probe.returncode}"
  return None


def check_isolation() -> None:
  """Raises IsolationError unless the worker can run in a private network namespace."""
  problem = _isolation_problem()
  if problem is not None:
    raise IsolationError(
        f"cannot run the TFF worker in a private network namespace ({problem}); "
        "allow user namespaces (sysctl user.max_user_namespaces>0, "
        "kernel.unprivileged_userns_clone=1, or AppArmor's "
        "kernel.apparmor_restrict_unprivileged_userns=0)")


_BINARY_FIX = "pass a TFF worker_binary build with --worker_binary (see BUILD_NOTES.md)"


@functools.lru_cache(maxsize=None)
def _worker_binary_problem(binary: str, mtime: float) -> Optional[str]:
  del mtime  # Part of the cache key only: a rebuilt binary is probed again.
  try:
    probe = subprocess.run([binary, f"--help={_WORKER_FLAG}"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"TFF worker binary {binary} does not run ({e}): {_BINARY_FIX}"
  if f"--{_WORKER_FLAG}".encode() not in probe.stdout + probe.stderr:
    return (f"{binary} is not a TFF worker_binary (its --help={_WORKER_FLAG} does not list "
            f"that flag): {_BINARY_FIX}")
  return None


def check_worker_binary(binary: str) -> None:
  """Raises WorkerError unless `binary` exists, is executable and is a TFF worker_binary.

  For a binary other than TFF's own, the last check runs it once with
  `--help=...` (~0.2 s): a program that is not
  a worker, such as /bin/true, would otherwise only show as a worker that
  never serves, after the run folder was made.
  """
  if not os.path.isfile(binary):
    raise WorkerError(f"TFF worker binary not found at {binary}: {_BINARY_FIX}")
  if not os.access(binary, os.X_OK):
    raise WorkerError(f"TFF worker binary {binary} is not executable: chmod +x it or "
                      f"{_BINARY_FIX}")
  if os.path.samefile(binary, WORKER_BINARY):
    return  # The one TFF ships: trusted as it is, no extra process per run.
  problem = _worker_binary_problem(os.path.abspath(binary), os.path.getmtime(binary))
  if problem is not None:
    raise WorkerError(problem)


def wait_until_ready(address: str, timeout_s: float,
                     process: Optional[subprocess.Popen] = None,
                     credentials: Optional[grpc.ChannelCredentials] = None) -> None:
  """Blocks until a TFF executor service answers at `address`, or `process` has exited."""
  channel = (grpc.secure_channel(address, credentials, GRPC_OPTIONS) if credentials
             else grpc.insecure_channel(address, GRPC_OPTIONS))
  deadline = time.monotonic() + timeout_s
  try:
    ready = grpc.channel_ready_future(channel)
    while True:
      # Short waits, so a worker that exits at once fails at once, not after `timeout_s`.
      try:
        ready.result(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        return
      except grpc.FutureTimeoutError:
        pass
      if process is not None and process.poll() is not None:
        raise WorkerError(f"TFF worker at {address} exited with code {process.returncode} "
                          "before serving")
      if time.monotonic() >= deadline:
        raise WorkerError(f"TFF worker at {address} did not answer within {timeout_s:.0f}s")
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
