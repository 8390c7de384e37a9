"""Owns TFF's execution context: which `worker_binary` processes run computations.

Two runtimes: `local_runtime` starts one worker of its own (see
`worker_process` for how its lifetime is kept to ours); `remote_runtime`
talks to workers someone else started (`python -m tff_dpmed.worker`), and
with several of them spreads each round's clients over the workers.
"""

import contextlib
import os
import time
from typing import Iterator, Optional

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
                                                WorkerProcess, check_worker_binary,
                                                stop_all_workers, wait_for_no_workers,
                                                wait_until_ready, worker_pids)

# How long a remote worker may take to answer before a run gives up on it.
REACHABLE_TIMEOUT_S = 10.0


def _executor_factory(address: str, default_num_clients: int):
  """TFF's executor factory for one worker: a `RemoteExecutor` per cardinality."""
  channel = grpc.insecure_channel(address, GRPC_OPTIONS)
  stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)

  def stack_fn(cardinalities):
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = default_num_clients
    # TFF retries a call that failed with UNAVAILABLE by asking for a new
    # executor; failing here turns a dead worker into an error, not an endless retry.
    if not stub.is_ready:
      raise WorkerError(f"the TFF worker at {address} is not reachable")
    executor = remote_executor.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def _make_context(addresses: list[str], default_num_clients: int = 0):
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
        executor_fn=_executor_factory(addresses[0], default_num_clients),
        compiler_fn=compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
    )
  per_worker = [
      async_execution_context.AsyncExecutionContext(
          executor_fn=_executor_factory(address, default_num_clients),
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
def _default_context(ctx) -> Iterator[None]:
  stack = tff.framework.get_context_stack()
  previous = stack.current  # An error context, or an enclosing runtime's.
  stack.set_default_context(ctx)
  try:
    yield
  finally:
    stack.set_default_context(previous)


@contextlib.contextmanager
def local_runtime(*, max_concurrent_computation_calls: int = -1,
                  log_dir: Optional[str] = None,
                  binary: Optional[str] = None) -> Iterator[WorkerProcess]:
  """Starts a local worker, makes it TFF's default context, and always stops it."""
  log_path = os.path.join(log_dir, "tff_worker.log") if log_dir else None
  worker = WorkerProcess(max_concurrent_computation_calls=max_concurrent_computation_calls,
                         log_path=log_path, binary=binary or WORKER_BINARY).start()
  try:
    with _default_context(_make_context([worker.address])):
      yield worker
  finally:
    worker.stop()


def check_reachable(addresses: list[str], timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
  """Raises WorkerError naming every worker that does not answer within `timeout_s`."""
  pending = {a: grpc.insecure_channel(a, GRPC_OPTIONS) for a in addresses}
  futures = {a: grpc.channel_ready_future(c) for a, c in pending.items()}
  deadline = time.monotonic() + timeout_s
  unreachable = []
  try:
    for address, future in futures.items():  # Waited on together: one timeout in all.
      try:
        future.result(timeout=max(0.0, deadline - time.monotonic()))
      except grpc.FutureTimeoutError:
        unreachable.append(address)
  finally:
    for channel in pending.values():
      channel.close()
  if unreachable:
    raise WorkerError(
        f"no TFF worker answers at {', '.join(unreachable)} (waited {timeout_s:.0f}s): start "
        "one there with `python -m tff_dpmed.worker --port=PORT`, or fix --workers")


@contextlib.contextmanager
def remote_runtime(addresses: list[str]) -> Iterator[None]:
  """Makes workers already running at `addresses` TFF's default context.

  Their lifetime is not ours: they are neither started nor stopped here.
  """
  check_reachable(addresses)
  with _default_context(_make_context(list(addresses))):
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
