"""Owns TFF's execution context: which `worker_binary` processes run computations.

Two runtimes: `local_runtime` starts one worker of its own (see
`worker_process` for how its lifetime is kept to ours, and how it is kept
off the network); `remote_runtime` talks to workers someone else started
(`python -m tff_dpmed.worker`), over mutual TLS given channel credentials,
and with several of them spreads each round's clients over the workers.
"""

import contextlib
import os
import time
from typing import Callable, Iterator, Optional

import grpc
import tensorflow_federated as tff
# TFF 0.87 exposes no public factory taking an existing worker, so the pieces
# its `create_sync_local_cpp_execution_context` is made of are used directly.
from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

# Re-exported: callers of this module manage workers through it too.
from tff_dpmed.federated.worker_process import (GRPC_OPTIONS, WORKER_BINARY, WorkerError,  # pylint: disable=unused-import
                                                IsolationError, WorkerProcess,
                                                check_isolation, check_worker_binary,
                                                stop_all_workers, wait_for_no_workers,
                                                wait_until_ready, worker_pids)

# How long a remote worker may take to answer before a run gives up on it.
REACHABLE_TIMEOUT_S = 10.0


def _channel(address: str, credentials: Optional[grpc.ChannelCredentials]) -> grpc.Channel:
  if credentials is None:
    return grpc.insecure_channel(address, GRPC_OPTIONS)
  return grpc.secure_channel(address, credentials, GRPC_OPTIONS)


def tls_channel_credentials(ca_path: str, cert_path: Optional[str] = None,
                            key_path: Optional[str] = None) -> grpc.ChannelCredentials:
  """Credentials for workers serving TLS: trust `ca_path`, and show our cert and key.

  The worker's certificate must name the host as given in --workers (a
  subjectAltName DNS name or IP address); gRPC checks it.
  """
  def read(path):
    if path is None:
      return None
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise WorkerError(f"cannot read {path}: {e.strerror}") from None

  return grpc.ssl_channel_credentials(root_certificates=read(ca_path),
                                      private_key=read(key_path),
                                      certificate_chain=read(cert_path))


def _executor_factory(address: str, default_num_clients: int,
                      credentials: Optional[grpc.ChannelCredentials] = None,
                      exit_reason: Callable[[], str] = lambda: ""):
  """TFF's executor factory for one worker: a `RemoteExecutor` per cardinality.

  `exit_reason`: for a worker this process owns, why it is gone ('' if running).
  """
  channel = _channel(address, credentials)
  stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)

  def stack_fn(cardinalities):
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = default_num_clients
    # TFF retries a call that failed with UNAVAILABLE by asking for a new
    # executor; failing here turns a dead worker into an error, not an endless retry.
    # The stub only *records* the channel's state, which is still CONNECTING when
    # a computation runs right after the context is made: wait for it first.
    if not stub.is_ready:
      try:
        grpc.channel_ready_future(channel).result(timeout=REACHABLE_TIMEOUT_S)
      except grpc.FutureTimeoutError:
        reason = exit_reason()
        raise WorkerError(f"the TFF worker at {address} is not reachable "
                          f"(waited {REACHABLE_TIMEOUT_S:.0f}s)"
                          + (f": {reason}" if reason else "")) from None
    executor = remote_executor.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def _make_context(addresses: list[str], default_num_clients: int = 0,
                  credentials: Optional[grpc.ChannelCredentials] = None,
                  exit_reason: Callable[[], str] = lambda: ""):
  """A synchronous TFF context whose executors talk to the workers at `addresses`.

  One worker: TFF's plain context, as `create_sync_local_cpp_execution_context`
  builds it. Several: TFF's `MergeableCompExecutionContext`, which compiles a
  computation to its single-aggregation form, runs the part up to the
  aggregation on each worker with a share of the clients, merges the partial
  aggregates and finishes on one worker.
  """
  if not addresses:
    raise ValueError("no worker addresses")
  if len(addresses) == 1:
    return sync_execution_context.SyncExecutionContext(
        executor_fn=_executor_factory(addresses[0], default_num_clients, credentials,
                                      exit_reason),
        compiler_fn=compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
    )
  per_worker = [
      async_execution_context.AsyncExecutionContext(
          executor_fn=_executor_factory(address, default_num_clients, credentials),
          compiler_fn=compiler.desugar_and_transform_to_native,
          transform_args=tensorflow_computation.transform_args,
          transform_result=tensorflow_computation.transform_result,
      ) for address in addresses]
  # The mergeable context does not apply transform_args itself; each worker's
  # context does, on its share of the argument.
  return mergeable_comp_execution_context.MergeableCompExecutionContext(
      async_contexts=per_worker,
      compiler_fn=mergeable_comp_compiler.compile_to_mergeable_comp_form,
      transform_result=tensorflow_computation.transform_result,
  )


@contextlib.contextmanager
def _restoring_default_context() -> Iterator[None]:
  """Puts TFF's default context back as it was on exit, whatever was set inside."""
  stack = tff.framework.get_context_stack()
  previous = stack.current  # An error context, or an enclosing runtime's.
  try:
    yield
  finally:
    stack.set_default_context(previous)


@contextlib.contextmanager
def _default_context(ctx) -> Iterator[None]:
  with _restoring_default_context():
    tff.framework.get_context_stack().set_default_context(ctx)
    yield


# Appended to IsolationError for the trainer, whose flag accepts the risk.
_INSECURE_LOCAL_HINT = (", or accept the risk with --insecure_local_executor (the worker's "
                        "unauthenticated executor port then listens on ALL interfaces: the "
                        "binary cannot bind loopback only)")


def check_local_runtime(binary: Optional[str] = None, insecure: bool = False) -> None:
  """Raises WorkerError unless `local_runtime` can start: before a run writes anything."""
  check_worker_binary(binary or WORKER_BINARY)
  if not insecure:
    try:
      check_isolation()
    except IsolationError as e:
      raise IsolationError(f"{e}{_INSECURE_LOCAL_HINT}") from None


class LocalRuntime:
  """The local worker behind TFF's default context. `recycle` replaces it between
  rounds: the worker keeps no state between TFF calls (the server state comes back
  to Python every round), so a fresh worker runs the next round the same way.

  Attributes of the current `WorkerProcess` (binary_pid, address, ...) are read
  through this object.
  """

  def __init__(self, make_worker: Callable[[], WorkerProcess]):
    self._make_worker = make_worker
    self.worker: Optional[WorkerProcess] = None

  def __getattr__(self, name):
    if name == "worker":  # Not set yet: no recursion through __getattr__.
      raise AttributeError(name)
    return getattr(self.worker, name)

  def start(self, wait: bool = True) -> None:
    """Starts a worker behind TFF's default context; without `wait`, call `wait_ready`
    before the first TFF execution (building computations needs no worker)."""
    self.worker = self._make_worker()
    self.worker.start(wait=wait)
    tff.framework.get_context_stack().set_default_context(
        _make_context([self.worker.address], exit_reason=self.worker.exit_reason))

  def wait_ready(self) -> None:
    self.worker.wait_ready()

  def stop(self) -> None:
    if self.worker is not None:
      self.worker.stop()

  def recycle(self) -> None:
    """Stops the worker and starts a fresh one behind a new default context."""
    self.stop()
    self.start()

  def rss_bytes(self) -> int:
    """The worker's resident memory (0 if it is not running)."""
    pid = self.worker.binary_pid if self.worker is not None else None
    try:
      with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, TypeError):
      return 0


# With this many client computations per core in a round, each runs its ops on
# one thread: the clients already fill the cores, and splitting each op over the
# intra-op pool only added synchronisation (benchmarks/LEVERS.md: 100 clients of
# 47 images on 2 cores, 27% less CPU and 16% less wall time per round).
CLIENTS_PER_CORE_FOR_ONE_THREAD = 4


def worker_intra_op_threads(concurrent_clients: Optional[float]) -> Optional[int]:
  """1 if a round runs enough client computations at once to fill the usable
  cores on their own, else None (TF's default: all cores per op)."""
  if concurrent_clients is None:
    return None
  cores = len(os.sched_getaffinity(0))
  return 1 if concurrent_clients >= CLIENTS_PER_CORE_FOR_ONE_THREAD * cores else None


@contextlib.contextmanager
def local_runtime(*, max_concurrent_computation_calls: int = -1,
                  log_dir: Optional[str] = None,
                  binary: Optional[str] = None,
                  insecure: bool = False,
                  concurrent_clients: Optional[float] = None,
                  wait: bool = True) -> Iterator[LocalRuntime]:
  """Starts a local worker, makes it TFF's default context, and always stops it.

  The worker runs in a network namespace of its own, reached by a Unix
  socket only; `insecure=True` runs it on this host's network instead, where
  its unauthenticated port listens on all interfaces (the binary cannot bind
  loopback only). Raises IsolationError if isolation is not possible here.
  `concurrent_clients`: the client computations a round runs (expected), which
  sets the worker's op threads (`worker_intra_op_threads`). `wait=False`
  returns while the worker still loads, so the caller can build its
  computations meanwhile; it must call `wait_ready()` before executing one.
  """
  log_path = os.path.join(log_dir, "tff_worker.log") if log_dir else None
  intra_op_threads = worker_intra_op_threads(concurrent_clients)

  def make_worker() -> WorkerProcess:
    try:
      return WorkerProcess(max_concurrent_computation_calls=max_concurrent_computation_calls,
                           log_path=log_path, binary=binary or WORKER_BINARY,
                           isolated=not insecure, intra_op_threads=intra_op_threads)
    except IsolationError as e:
      raise IsolationError(f"{e}{_INSECURE_LOCAL_HINT}") from None

  runtime = LocalRuntime(make_worker)
  try:
    with _restoring_default_context():  # runtime.start (and recycle) set their own.
      runtime.start(wait=wait)
      yield runtime
  finally:
    runtime.stop()


def _connection_problem(channel: grpc.Channel) -> str:
  """Why `channel` does not connect, as gRPC says (e.g. a failed TLS handshake), or ''."""
  probe = channel.unary_unary("/tff_dpmed.Probe/Unreachable")
  try:
    probe(b"", timeout=2.0)
  except grpc.RpcError as e:
    if e.code() == grpc.StatusCode.UNAVAILABLE:
      return e.details() or ""
  return ""


def check_reachable(addresses: list[str], timeout_s: float = REACHABLE_TIMEOUT_S,
                    credentials: Optional[grpc.ChannelCredentials] = None) -> None:
  """Raises WorkerError naming every worker that does not answer within `timeout_s`."""
  pending = {a: _channel(a, credentials) for a in addresses}
  futures = {a: grpc.channel_ready_future(c) for a, c in pending.items()}
  deadline = time.monotonic() + timeout_s
  unreachable = []
  problems = []
  try:
    for address, future in futures.items():  # Waited on together: one timeout in all.
      try:
        future.result(timeout=max(0.0, deadline - time.monotonic()))
      except grpc.FutureTimeoutError:
        unreachable.append(address)
        problems.append(_connection_problem(pending[address]).lower())
  finally:
    for channel in pending.values():
      channel.close()
  if unreachable:
    if any("ssl" in p or "handshake" in p or "certificate" in p for p in problems):
      hint = ("; the TLS handshake failed: check that --worker_tls_ca signed the worker's "
              "certificate, which must name the host as in --workers, and that the worker's "
              "--tls_client_ca signed --worker_tls_cert")
    elif credentials is None:
      hint = "; if the workers serve TLS, pass --worker_tls_ca, --worker_tls_cert, --worker_tls_key"
    else:
      hint = ""
    raise WorkerError(
        f"no TFF worker answers at {', '.join(unreachable)} (waited {timeout_s:.0f}s{hint}): "
        "start one there with `python -m tff_dpmed.worker --port=PORT ...`, or fix --workers")


@contextlib.contextmanager
def remote_runtime(addresses: list[str],
                   credentials: Optional[grpc.ChannelCredentials] = None) -> Iterator[None]:
  """Makes workers already running at `addresses` TFF's default context.

  Their lifetime is not ours: they are neither started nor stopped here.
  `credentials` (see `tls_channel_credentials`) for workers serving TLS.
  """
  check_reachable(addresses, credentials=credentials)
  with _default_context(_make_context(list(addresses), credentials=credentials)):
    yield


def _set_no_runtime_context() -> None:
  """Outside a runtime, executing a computation is an error, not a new worker.

  Replacing TFF's import-time default context also drops its lazy worker
  manager while the interpreter is intact, so its `__del__` no longer fails
  noisily at exit.
  """
  tff.framework.get_context_stack().set_default_context(
      runtime_error_context.RuntimeErrorContext())


_set_no_runtime_context()
