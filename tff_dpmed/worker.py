"""Serve TFF's executor protocol on a port, for `tff_dpmed.train --executor=remote`.

  python -m tff_dpmed.worker --port=8000            # on each worker machine
  python -m tff_dpmed.train --executor=remote --workers=host1:8000,host2:8000 ...

Runs TFF's C++ `worker_binary` (or a build of it given by --worker_binary,
e.g. with CUDA) on all interfaces, says on one line when it is ready and
where, and stops it on SIGINT/SIGTERM; the binary also dies if this process
is killed. Its own log goes to a file (--log_file). The executor protocol has
no authentication or encryption: expose the port only to the trainer's hosts.
"""

import signal
import socket
import sys
import threading

from absl import flags
from absl import logging

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import worker_process

FLAGS = flags.FLAGS

flags.DEFINE_integer("port", None, "Port to serve on (all interfaces).", required=True)
flags.DEFINE_integer("max_concurrent_computation_calls", -1,
                     "Bound on parallel client computations in this worker, which bounds "
                     "its memory, e.g. on a GPU (-1 = no bound).")
flags.DEFINE_string("worker_binary", worker_process.WORKER_BINARY,
                    "The TFF worker_binary to run, e.g. a CUDA build (see BUILD_NOTES.md).")
flags.DEFINE_string("log_file", None, "Where the binary's own log goes. Default: a file in "
                    "the temp folder, named in the ready line.")

_EXIT_WORKER_DIED = 1


def _check_port_free(port: int) -> None:
  """Fails if something listens on `port` already.

  gRPC servers set SO_REUSEPORT, so a second worker_binary would share the
  port with the first and answer our readiness probe with the first one's
  voice; a plain bind (which does not set it) tells the truth.
  """
  try:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # Both stacks, as the worker.
    address = ("::", port)
  except OSError:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    address = ("0.0.0.0", port)
  with sock:
    # Lets a worker restart on a port its killed predecessor left in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind(address)
    except OSError as e:
      raise UsageError(f"cannot serve on port {port}: {e.strerror.lower()}: pick another "
                       "--port") from None


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: all options are --flags (see --helpfull)")
  logging.set_verbosity(logging.WARNING)  # The ready line says what the info log would.
  port = FLAGS.port
  if not 1 <= port <= 65535:
    raise UsageError(f"--port={port} must be in 1-65535")
  try:
    worker_process.check_worker_binary(FLAGS.worker_binary)
  except worker_process.WorkerError as e:
    raise UsageError(f"{e}: pass an existing build with --worker_binary") from None
  _check_port_free(port)

  stop = threading.Event()
  received = []

  def on_signal(signum, frame):
    del frame
    received.append(signum)
    stop.set()

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, on_signal)

  worker = worker_process.WorkerProcess(
      port=port, binary=FLAGS.worker_binary, log_path=FLAGS.log_file,
      max_concurrent_computation_calls=FLAGS.max_concurrent_computation_calls)
  try:
    worker.start()
  except worker_process.WorkerError as e:
    raise UsageError(f"{e}; see its log {worker.log_path}") from None
  pid = worker.process.pid
  host = socket.gethostname()
  print(f"ready: TFF worker serving on {host}:{port} (all interfaces; worker_binary pid {pid}, "
        f"log {worker.log_path}); train with --executor=remote --workers={host}:{port}",
        flush=True)
  try:
    while not stop.wait(0.5):
      if not worker.alive():
        code = worker.process.returncode
        print(f"error: the TFF worker_binary (pid {pid}) exited with code {code}; see its log "
              f"{worker.log_path}", file=sys.stderr, flush=True)
        sys.exit(_EXIT_WORKER_DIED)
  finally:
    worker.stop()
  print(f"stopped: {signal.Signals(received[0]).name} received, worker_binary {pid} stopped",
        flush=True)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
