"""A TF Serving-compatible model server: one ModelStore behind gRPC and REST.

`ModelServer` wires the pieces together; `tff_dpmed.serve` is its CLI. The
store (model_store.py) holds the versions and answers Predict, status and
metadata; the two front-ends (grpc_service.py, rest.py, with json_codec.py)
only translate their wire formats, and neither imports the other.
"""

import concurrent.futures
import gc
import logging
import os
from typing import Optional

import grpc

from tff_dpmed.errors import UsageError
from tff_dpmed.serving import export
from tff_dpmed.serving import grpc_service
from tff_dpmed.serving import rest
from tff_dpmed.serving.model_store import ModelStore

DEFAULT_GRPC_PORT = 8500
DEFAULT_REST_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BATCH_SIZE = 128
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_REST_THREADS = rest.DEFAULT_NUM_THREADS
DEFAULT_POLL_SECONDS = 1.0  # TF Serving's --file_system_poll_wait_seconds.

_log = logging.getLogger("tff_dpmed.serve")


def check_model_base_path(model_base_path: str) -> None:
  """UsageError unless the path is a model folder holding version folders."""
  if not os.path.isdir(model_base_path):
    raise UsageError(f"--model_base_path {model_base_path} is not a folder: pass "
                     "<export_base>/<model_name>, which holds version folders")
  if os.path.exists(os.path.join(model_base_path, export.MODELS_CONFIG_FILENAME)):
    # The export root: TF Serving's --model_config_file goes here, but
    # --model_base_path is one model's folder under it.
    models = [d for d in sorted(os.listdir(model_base_path))
              if export.list_versions(os.path.join(model_base_path, d))]
    example = os.path.join(model_base_path, models[0] if models else "<model_name>")
    raise UsageError(
        f"--model_base_path {model_base_path} is the export root (it holds "
        f"{export.MODELS_CONFIG_FILENAME}); pass one model's folder under it, "
        f"e.g. --model_base_path={example}")
  if os.path.exists(os.path.join(model_base_path, "saved_model.pb")):
    raise UsageError(
        f"--model_base_path {model_base_path} is a version folder; pass its "
        f"parent {os.path.dirname(os.path.abspath(model_base_path))}")
  if not export.list_versions(model_base_path):
    nested = [d for d in sorted(os.listdir(model_base_path))
              if export.list_versions(os.path.join(model_base_path, d))]
    if nested:
      raise UsageError(
          f"--model_base_path {model_base_path} holds models, not versions; "
          f"pass one model, e.g. {os.path.join(model_base_path, nested[0])}")


class ModelServer:
  """Serves the versions under `model_base_path` over gRPC and REST."""

  def __init__(self, model_base_path: str, model_name: str,
               host: str = DEFAULT_HOST, grpc_port: int = DEFAULT_GRPC_PORT,
               rest_port: int = DEFAULT_REST_PORT,
               max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               poll_seconds: float = DEFAULT_POLL_SECONDS,
               grpc_workers: int = 16,
               rest_threads: int = DEFAULT_REST_THREADS,
               rest_max_inflight_bytes: Optional[int] = None):
    self.model_name = model_name
    self.host = host
    # TF leaves ~500k long-lived Python objects; a full GC pass over them
    # took 100-400 ms, stalling REST requests (whose JSON makes many objects).
    # Freezing them after each load takes them out of GC's way.
    self.store = ModelStore(model_name, model_base_path, poll_seconds=poll_seconds,
                            max_batch_size=max_batch_size, after_load=gc.freeze)
    self._grpc_port = grpc_port
    self._rest_port = rest_port
    self._max_request_bytes = max_request_bytes
    self._grpc_workers = grpc_workers
    self._rest_threads = rest_threads
    self._rest_max_inflight_bytes = rest_max_inflight_bytes
    self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._grpc_server: Optional[grpc.Server] = None
    self._rest_server: Optional[rest.RestServer] = None

  @property
  def grpc_port(self) -> int:
    return self._grpc_port

  @property
  def rest_port(self) -> int:
    return self._rest_port

  def start(self) -> None:
    """Loads the current versions, then starts both servers and the poller."""
    self.store.refresh()
    gc.freeze()
    if not self.store.available_versions():
      _log.warning("no loadable versions under %s yet; waiting for one",
                   self.store.base_path)
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=self._grpc_workers, thread_name_prefix="grpc")
    self._grpc_server = grpc.server(self._executor, options=[
        ("grpc.max_receive_message_length", self._max_request_bytes),
        ("grpc.max_send_message_length", -1),
        # Without this a second server could bind the same port silently.
        ("grpc.so_reuseport", 0),
    ])
    grpc_service.add_to_server(self._grpc_server, self.store)
    address = f"[{self.host}]" if ":" in self.host else self.host
    try:
      port = self._grpc_server.add_insecure_port(f"{address}:{self._grpc_port}")
    except RuntimeError:
      port = 0
    if not port:
      self._executor.shutdown(wait=False)
      raise UsageError(f"cannot listen for gRPC on {self.host}:{self._grpc_port}"
                       " (in use?); pick another with --port")
    self._grpc_port = port
    try:
      self._rest_server = rest.RestServer(
          self.store, self.host, self._rest_port, self._max_request_bytes,
          num_threads=self._rest_threads,
          max_inflight_bytes=self._rest_max_inflight_bytes)
    except OSError as e:
      self._executor.shutdown(wait=False)
      raise UsageError(f"cannot listen for REST on {self.host}:{self._rest_port}"
                       f" ({e.strerror}); pick another with --rest_api_port"
                       ) from None
    self._rest_port = self._rest_server.port
    self._grpc_server.start()
    self._rest_server.start()
    self.store.start_polling()

  def ready_line(self) -> str:
    return (f"serving {self.model_name} versions {self.store.available_versions()}"
            f" on grpc {self.host}:{self.grpc_port} and rest "
            f"{self.host}:{self.rest_port}")

  def stop(self, grace_seconds: float = 2.0) -> None:
    """Stops taking requests, lets in-flight ones finish, stops the poller."""
    if self._rest_server is not None:
      self._rest_server.stop()
    if self._grpc_server is not None:
      self._grpc_server.stop(grace_seconds).wait()
    if self._executor is not None:
      self._executor.shutdown(wait=True)
    self.store.stop()
