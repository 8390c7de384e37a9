"""Serves an exported model with TF Serving's gRPC and REST APIs.

  python -m tff_dpmed.serve --model_base_path=runs/x/saved_model/cnn \
      [--model_name=cnn] [--port=8500] [--rest_api_port=8501] [--host=127.0.0.1]

A stand-in for `tensorflow_model_server` where that binary (or docker) is not
available: same protocols, flags named alike, so clients work against either.
Serves the newest version under --model_base_path, picks up new versions
without a restart, keeps older ones addressable by number. Prints one line
when ready and stops cleanly on SIGINT/SIGTERM.
"""

import logging
import os
import signal
import sys
import threading

from absl import flags

from tff_dpmed import cli
from tff_dpmed.errors import UsageError
from tff_dpmed.serving import export
from tff_dpmed.serving import server as server_lib

_MODEL_BASE_PATH = flags.DEFINE_string(
    "model_base_path", None,
    "Folder of version folders: <export_base>/<model_name> (required).")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None,
    "Name clients ask for; default: the last component of --model_base_path.")
_PORT = flags.DEFINE_integer("port", server_lib.DEFAULT_GRPC_PORT,
                             "gRPC port (0: any free port).")
_REST_API_PORT = flags.DEFINE_integer("rest_api_port", server_lib.DEFAULT_REST_PORT,
                                      "REST port (0: any free port).")
_HOST = flags.DEFINE_string(
    "host", server_lib.DEFAULT_HOST,
    "Address to listen on; 0.0.0.0 exposes the model to the network.")
_MAX_BATCH_SIZE = flags.DEFINE_integer(
    "max_batch_size", server_lib.DEFAULT_MAX_BATCH_SIZE,
    "Largest batch (0th dimension) one request may send.")
_MAX_REQUEST_BYTES = flags.DEFINE_integer(
    "max_request_bytes", server_lib.DEFAULT_MAX_REQUEST_BYTES,
    "Largest request body (REST) or message (gRPC), in bytes.")
_REST_API_NUM_THREADS = flags.DEFINE_integer(
    "rest_api_num_threads", server_lib.DEFAULT_REST_THREADS,
    "REST handler threads (TF Serving's flag of the same name); more "
    "connections wait in a bounded queue, beyond it they get 503.")
_REST_MAX_INFLIGHT_BYTES = flags.DEFINE_integer(
    "rest_max_inflight_bytes", None,
    "REST request bodies held in memory at once, in bytes; a request waits "
    "for room before its body is read. Default and minimum: "
    "--max_request_bytes.")
_POLL_SECONDS = flags.DEFINE_float(
    "poll_seconds", server_lib.DEFAULT_POLL_SECONDS,
    "How often to look for new or deleted version folders.")


def _check_flags() -> tuple[str, str]:
  if not _MODEL_BASE_PATH.value:
    raise UsageError("--model_base_path is required: the folder holding the "
                     "version folders, <export_base>/<model_name>")
  base_path = _MODEL_BASE_PATH.value
  server_lib.check_model_base_path(base_path)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(
      os.path.abspath(base_path)))
  export.check_model_name(name)
  for flag, value in (("--port", _PORT.value),
                      ("--rest_api_port", _REST_API_PORT.value)):
    if not 0 <= value <= 65535:
      raise UsageError(f"{flag}={value} is not a port number (0-65535)")
  if _PORT.value and _PORT.value == _REST_API_PORT.value:
    raise UsageError("--port and --rest_api_port must differ")
  if _MAX_BATCH_SIZE.value < 1:
    raise UsageError("--max_batch_size must be at least 1")
  if _MAX_REQUEST_BYTES.value < 1024:
    raise UsageError("--max_request_bytes must be at least 1024")
  if _REST_API_NUM_THREADS.value < 1:
    raise UsageError("--rest_api_num_threads must be at least 1")
  if (_REST_MAX_INFLIGHT_BYTES.value is not None and
      _REST_MAX_INFLIGHT_BYTES.value < _MAX_REQUEST_BYTES.value):
    raise UsageError("--rest_max_inflight_bytes must be at least "
                     "--max_request_bytes, or one largest request could never"
                     " be read")
  if not _POLL_SECONDS.value > 0:
    raise UsageError("--poll_seconds must be positive")
  return base_path, name


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; everything is a --flag")
  base_path, name = _check_flags()
  logging.getLogger("tff_dpmed.serve").setLevel(logging.INFO)
  server = server_lib.ModelServer(
      base_path, name, host=_HOST.value, grpc_port=_PORT.value,
      rest_port=_REST_API_PORT.value, max_batch_size=_MAX_BATCH_SIZE.value,
      max_request_bytes=_MAX_REQUEST_BYTES.value,
      poll_seconds=_POLL_SECONDS.value,
      rest_threads=_REST_API_NUM_THREADS.value,
      rest_max_inflight_bytes=_REST_MAX_INFLIGHT_BYTES.value)
  stop = threading.Event()

  def on_signal(signum, frame):  # pylint: disable=unused-argument
    if stop.is_set():
      os._exit(1)  # A second signal: the user wants out now.  pylint: disable=protected-access
    stop.set()

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGTERM, on_signal)
  server.start()
  print(server.ready_line(), flush=True)
  while not stop.wait(1.0):
    pass
  logging.getLogger("tff_dpmed.serve").info("stopping on signal")
  server.stop()
  print(f"stopped serving {name}", file=sys.stderr, flush=True)


def run() -> None:
  cli.run(main)


if __name__ == "__main__":
  run()
