"""Serve TFF's executor protocol on a port, for `tff_dpmed.train --executor=remote`.

  # on each worker machine: mutual TLS (certificates: see README)
  python -m tff_dpmed.worker --port=8000 --tls_cert=w.pem --tls_key=w.key --tls_client_ca=ca.pem
  python -m tff_dpmed.train --executor=remote --workers=host1:8000,host2:8000 \
      --worker_tls_ca=ca.pem --worker_tls_cert=trainer.pem --worker_tls_key=trainer.key ...

Runs TFF's C++ `worker_binary` (or a build of it given by --worker_binary,
e.g. with CUDA), says on one line when it is ready and where, and stops it on
SIGINT/SIGTERM; the binary also dies if this process is killed. Its own log
goes to a file (--log_file).

The executor protocol has no authentication or encryption, and whoever
reaches it runs any TensorFlow computation as this user. With the TLS flags
the binary runs in a private network namespace (see `worker_process`) and
only a gRPC proxy in this process serves the port, over TLS, to clients
whose certificate --tls_client_ca signed. Without them the worker starts only
with --insecure, and then serves the binary itself, in plaintext and to
anyone, on all interfaces.
"""

import os
import signal
import socket
import sys
import threading

from absl import flags
from absl import logging

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
from tff_dpmed.federated import tls_proxy
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
flags.DEFINE_string("tls_cert", None, "This worker's TLS certificate (PEM); it must name the "
                    "host the trainer gives in --workers (subjectAltName DNS or IP).")
flags.DEFINE_string("tls_key", None, "The private key (PEM) of --tls_cert.")
flags.DEFINE_string("tls_client_ca", None, "CA certificate(s) (PEM): only clients with a "
                    "certificate signed by it may connect (mutual TLS).")
flags.DEFINE_bool("insecure", False, "Serve without TLS: the binary itself on all interfaces, "
                  "in plaintext, to anyone who reaches the port, who can then run any "
                  "TensorFlow computation as this user. Only on a network you trust entirely.")

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


def _read_tls_files() -> tuple[bytes, bytes, bytes] | None:
  """(cert, key, client CA) PEMs, or None for --insecure; UsageError unless exactly one mode."""
  given = {"--tls_cert": FLAGS.tls_cert, "--tls_key": FLAGS.tls_key,
           "--tls_client_ca": FLAGS.tls_client_ca}
  if FLAGS.insecure:
    if any(given.values()):
      raise UsageError("--insecure serves without TLS: drop it or the --tls_* flags")
    return None
  if not any(given.values()):
    raise UsageError("a worker serves mutual TLS: pass --tls_cert, --tls_key and "
                     "--tls_client_ca (see README), or --insecure to serve plaintext to "
                     "anyone who reaches the port")
  missing = [name for name, value in given.items() if not value]
  if missing:
    raise UsageError(f"mutual TLS needs --tls_cert, --tls_key and --tls_client_ca: add "
                     f"{', '.join(missing)}")
  pems = []
  for name, path in given.items():
    try:
      with open(path, "rb") as f:
        pems.append(f.read())
    except OSError as e:
      raise UsageError(f"{name}={path}: {e.strerror.lower()}: pass a readable PEM file") from None
    if b"-----BEGIN " not in pems[-1]:
      raise UsageError(f"{name}={path} is not a PEM file (no -----BEGIN line): pass one")
  return pems[0], pems[1], pems[2]


def _check_log_file(path: str | None) -> None:
  if path is None:
    return
  try:
    with open(path, "ab"):
      pass
  except OSError as e:
    raise UsageError(f"--log_file={path}: {e.strerror.lower()}: create its folder or pass "
                     "another --log_file") from None


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: all options are --flags (see --helpfull)")
  logging.set_verbosity(logging.WARNING)  # The ready line says what the info log would.
  port = FLAGS.port
  if not 1 <= port <= 65535:
    raise UsageError(f"--port={port} must be in 1-65535")
  tls = _read_tls_files()
  _check_log_file(FLAGS.log_file)
  try:
    worker_process.check_worker_binary(FLAGS.worker_binary)
  except worker_process.WorkerError as e:
    raise UsageError(str(e)) from None
  if tls is not None:
    try:
      worker_process.check_isolation()
    except worker_process.IsolationError as e:
      # With the binary on the host's network the TLS port would only be a decoy.
      raise UsageError(f"{e}; TLS needs that isolation (or, accepting the risk, serve "
                       "plaintext with --insecure)") from None
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
      max_concurrent_computation_calls=FLAGS.max_concurrent_computation_calls,
      isolated=tls is not None)
  try:
    worker.start()
  except worker_process.WorkerError as e:
    raise UsageError(f"{e}; see its log {worker.log_path}") from None
  proxy = None
  if tls is not None:
    cert, key, client_ca = tls
    try:
      proxy = tls_proxy.TlsProxy(port=port, upstream_address=worker.address, cert_pem=cert,
                                 key_pem=key, client_ca_pem=client_ca,
                                 grpc_options=worker_process.GRPC_OPTIONS).start()
    except OSError as e:
      worker.stop()
      raise UsageError(f"{e}: check that --tls_cert and --tls_key are a matching PEM "
                       "certificate and key, and that the port is free") from None
  pid = worker.binary_pid
  host = socket.gethostname()
  if proxy is not None:
    print(f"ready: TFF worker serving mutual TLS on {host}:{port} (all interfaces, clients "
          f"signed by {os.path.basename(FLAGS.tls_client_ca)} only; worker_binary pid {pid} in "
          f"a private network namespace, log {worker.log_path}); train with --executor=remote "
          f"--workers={host}:{port} and --worker_tls_*", flush=True)
  else:
    print(f"ready: TFF worker serving on {host}:{port} (all interfaces, INSECURE: no TLS, no "
          f"authentication; worker_binary pid {pid}, log {worker.log_path}); train with "
          f"--executor=remote --workers={host}:{port}", flush=True)
  try:
    while not stop.wait(0.5):
      if not worker.alive():
        code = worker.process.returncode
        print(f"error: the TFF worker_binary (pid {pid}) exited with code {code}; see its log "
              f"{worker.log_path}", file=sys.stderr, flush=True)
        sys.exit(_EXIT_WORKER_DIED)
  finally:
    if proxy is not None:
      proxy.stop()
    worker.stop()
  print(f"stopped: {signal.Signals(received[0]).name} received, worker_binary {pid} stopped",
        flush=True)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
