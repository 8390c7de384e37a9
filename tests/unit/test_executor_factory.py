"""A new context's first call waits for its worker channel; a dead worker is an error."""

import threading
import time
from concurrent import futures

import grpc
import pytest
import tensorflow_federated as tff

from tff_dpmed.federated import context


def _serve_later(socket_path: str, delay_s: float, servers: list) -> threading.Timer:
  def start():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    servers.append(server)
  timer = threading.Timer(delay_s, start)
  timer.start()
  return timer


def test_first_call_waits_for_a_channel_still_connecting(tmp_path):
  # A computation run right after the context is made met a CONNECTING channel
  # and failed as "not reachable" (seen once in CI, on a loaded machine).
  socket_path = str(tmp_path / "w.sock")
  servers = []
  timer = _serve_later(socket_path, 0.5, servers)
  try:
    factory = context._executor_factory(f"unix:{socket_path}", default_num_clients=1)
    # The stand-in server has no executor service: UNIMPLEMENTED means the call
    # reached it, past the readiness check that used to fail at once.
    with pytest.raises(grpc.RpcError) as raised:
      factory.create_executor({tff.CLIENTS: 1})
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
  finally:
    timer.join()
    for server in servers:
      server.stop(None)


def test_a_worker_that_never_answers_is_an_error_after_the_wait(tmp_path, monkeypatch):
  monkeypatch.setattr(context, "REACHABLE_TIMEOUT_S", 1.0)
  address = f"unix:{tmp_path / 'nobody.sock'}"
  factory = context._executor_factory(address, default_num_clients=1)
  start = time.monotonic()
  with pytest.raises(context.WorkerError, match=f"{address} is not reachable"):
    factory.create_executor({tff.CLIENTS: 1})
  assert 0.9 < time.monotonic() - start < 10


def test_a_killed_local_worker_is_named_with_its_signal(monkeypatch):
  # An out-of-memory kill of the worker used to read only "not reachable".
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(context, "REACHABLE_TIMEOUT_S", 1.0)

  @tff.tensorflow.computation
  def one():
    return np.int32(1)

  with context.local_runtime() as worker:
    assert one() == 1 and worker.exit_reason() == ""
    os.kill(worker.binary_pid, signal.SIGKILL)
    worker.process.wait()
    assert "killed by SIGKILL" in worker.exit_reason()
    with pytest.raises(context.WorkerError, match="not reachable .*killed by SIGKILL .*dmesg"):
      one()


def test_recycle_replaces_the_local_worker_behind_the_context():
  import numpy as np  # pylint: disable=g-import-not-at-top

  @tff.tensorflow.computation(np.int32)
  def double(x):
    return x * 2

  with context.local_runtime() as runtime:
    assert double(2) == 4
    first_pid = runtime.binary_pid
    assert runtime.rss_bytes() > 1 << 20
    runtime.recycle()
    assert runtime.binary_pid != first_pid and runtime.alive()
    assert double(3) == 6  # The new worker serves the same computation.
  assert not runtime.alive()


def test_the_trainer_replaces_a_worker_over_its_memory_share(capsys):
  from tff_dpmed.program import trainer  # pylint: disable=g-import-not-at-top

  class FakeRuntime(context.LocalRuntime):
    def __init__(self):
      super().__init__(make_worker=None)
      self.held, self.recycled = 0, 0

    def rss_bytes(self):
      return self.held

    def recycle(self):
      self.recycled += 1

  import os  # pylint: disable=g-import-not-at-top
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  runtime = FakeRuntime()
  guard = trainer._worker_memory_guard(runtime)
  runtime.held = int(0.9 * trainer.WORKER_MEMORY_FRACTION * memory)
  guard(3)
  assert runtime.recycled == 0 and capsys.readouterr().err == ""
  runtime.held = int(1.1 * trainer.WORKER_MEMORY_FRACTION * memory)
  guard(4)
  assert runtime.recycled == 1
  assert "the TFF worker held" in capsys.readouterr().err
  # A remote runtime (not ours to restart) is left alone.
  trainer._worker_memory_guard(None)(5)
