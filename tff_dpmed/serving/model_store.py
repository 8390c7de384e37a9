"""Loaded model versions and the request logic that gRPC and REST share.

`ModelStore` watches `<model_base_path>/<version>/` the way TF Serving does:
integer folder names only, the newest available version answers requests that
name no version, every loaded version stays addressable, a background poller
loads new versions and unloads deleted ones without a restart. Everything a
request can get wrong is checked here and raised as a `ServingError` carrying
the gRPC status code (and message) TF Serving would give, so both protocol
front-ends answer identically. Predict (numpy arrays in and out),
GetModelStatus and GetModelMetadata (protos, and the metadata dict) are
answered here; the front-ends (grpc_service.py, rest.py) only translate their
wire format to and from these calls and never call each other.
"""

import dataclasses
import logging
import os
import threading
from typing import Callable, Mapping, Optional, Sequence, Union

import grpc
import numpy as np
import tensorflow as tf

from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2

from tff_dpmed.serving import export
from tff_dpmed.serving.servable import (  # pylint: disable=unused-import
    DEFAULT_SIGNATURE, Servable, ServingError, Signature, invalid, load_servable,
    shape_string, signature_def_map)

SIGNATURE_DEF_FIELD = "signature_def"
# Not in TF Serving: the export's metadata json (privacy guarantee included).
# gRPC sends it only when asked for by name, packed as a google.protobuf.Struct;
# REST adds it under metadata (TF Serving's REST clients ignore extra keys).
TFF_DPMED_METADATA_FIELD = "tff_dpmed_metadata"
METADATA_FIELDS = (SIGNATURE_DEF_FIELD, TFF_DPMED_METADATA_FIELD)
STATE_LOADING = "LOADING"
STATE_AVAILABLE = "AVAILABLE"
STATE_END = "END"

_log = logging.getLogger("tff_dpmed.serve")
# tf.errors codes are the gRPC codes, number for number.
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclasses.dataclass(frozen=True)
class VersionState:
  state: str
  error_code: grpc.StatusCode = grpc.StatusCode.OK
  error_message: str = ""


class ModelStore:
  """The versions of one model, kept in step with its base path."""

  def __init__(self, model_name: str, base_path: str, poll_seconds: float = 1.0,
               max_batch_size: int = 128,
               after_load: Optional[Callable[[], None]] = None):
    self.model_name = model_name
    self.base_path = base_path
    self.poll_seconds = poll_seconds
    self.max_batch_size = max_batch_size
    self._after_load = after_load  # Called after a refresh loaded something.
    self._lock = threading.Lock()
    self._servables: dict[int, Servable] = {}
    self._states: dict[int, VersionState] = {}
    # version -> folder fingerprint of a failed load: retried once it changes.
    self._failed: dict[int, tuple] = {}
    self._stop = threading.Event()
    self._poller: Optional[threading.Thread] = None

  # --- versions ----------------------------------------------------------

  def refresh(self) -> list[int]:
    """Loads new complete versions, unloads deleted ones; returns new versions."""
    try:
      on_disk = set(export.list_versions(self.base_path))
      if not os.path.isdir(self.base_path):
        raise FileNotFoundError(self.base_path)
    except OSError as e:
      # Keep serving what is loaded: a flaky mount must not drop the model.
      _log.warning("cannot list %s: %s", self.base_path, e)
      return []
    for version in sorted(set(self._servables) - on_disk):
      _log.info("version %d of %s was deleted; unloading it", version,
                self.model_name)
      with self._lock:
        self._servables = {v: s for v, s in self._servables.items() if v != version}
        self._states[version] = VersionState(STATE_END)
    loaded = []
    for version in sorted(on_disk - set(self._servables)):
      path = os.path.join(self.base_path, str(version))
      if not os.path.exists(os.path.join(path, "saved_model.pb")):
        continue  # Still being copied in by something that is not our export.
      fingerprint = _fingerprint(path)
      if self._failed.get(version) == fingerprint:
        continue
      with self._lock:
        self._states[version] = VersionState(STATE_LOADING)
      try:
        servable = load_servable(self.model_name, version, path)
      except Exception as e:  # pylint: disable=broad-except
        # A broken version must not stop the others, nor the server.
        _log.error("cannot load version %d of %s from %s: %s", version,
                   self.model_name, path, e)
        self._failed[version] = fingerprint
        with self._lock:
          self._states[version] = VersionState(
              STATE_END, grpc.StatusCode.UNKNOWN, f"cannot load {path}: {e}")
        continue
      self._failed.pop(version, None)
      with self._lock:
        self._servables = {**self._servables, version: servable}
        self._states[version] = VersionState(STATE_AVAILABLE)
      _log.info("loaded version %d of %s from %s", version, self.model_name, path)
      loaded.append(version)
    if loaded and self._after_load is not None:
      self._after_load()
    return loaded

  def available_versions(self) -> list[int]:
    return sorted(self._servables)

  def start_polling(self) -> None:
    """Polls the base path every `poll_seconds` on a daemon thread."""

    def poll():
      while not self._stop.wait(self.poll_seconds):
        try:
          self.refresh()
        except Exception:  # pylint: disable=broad-except
          _log.exception("polling %s failed; will retry", self.base_path)

    self._poller = threading.Thread(target=poll, name="version-poller",
                                    daemon=True)
    self._poller.start()

  def stop(self) -> None:
    self._stop.set()
    if self._poller is not None:
      self._poller.join(timeout=30)

  # --- requests ------------------------------------------------------------

  def resolve(self, name: str, version: Optional[int] = None,
              label: Optional[str] = None) -> Servable:
    """The servable a ModelSpec asks for; NOT_FOUND as TF Serving says it."""
    if label is not None:
      # This server defines no labels; TF Serving's answer for an unknown one.
      raise invalid(f"Unrecognized servable version label: {label} (this server "
                    "defines no version labels; ask for a version number)")
    servables = self._servables  # One consistent snapshot.
    if name == self.model_name:
      if version is None and servables:
        return servables[max(servables)]
      if version is not None and version in servables:
        return servables[version]
    request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
    hint = ""
    if name != self.model_name:
      hint = f"; this server serves model '{self.model_name}'"
    elif servables:
      hint = f"; available versions: {sorted(servables)}"
    raise ServingError(grpc.StatusCode.NOT_FOUND,
                       f"Servable not found for request: {request}{hint}")

  def version_states(self, name: str, version: Optional[int] = None
                     ) -> list[tuple[int, VersionState]]:
    """GetModelStatus: newest first; NOT_FOUND as TF Serving says it."""
    with self._lock:
      states = dict(self._states)
    if name != self.model_name or not states:
      raise ServingError(grpc.StatusCode.NOT_FOUND,
                         f"Could not find any versions of model {name}")
    if version is not None:
      if version not in states:
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"Could not find version {version} of model {name}")
      return [(version, states[version])]
    return sorted(states.items(), reverse=True)

  def model_status(self, name: str, version: Optional[int] = None,
                   label: Optional[str] = None
                   ) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus, for both front-ends."""
    if label is not None:
      raise invalid(f"Unrecognized servable version label: {label}")
    response = get_model_status_pb2.GetModelStatusResponse()
    for v, state in self.version_states(name, version):
      entry = response.model_version_status.add()
      entry.version = v
      entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
      entry.status.error_code = state.error_code.value[0]
      entry.status.error_message = state.error_message
    return response

  def model_metadata(
      self, name: str, version: Optional[int], label: Optional[str],
      fields: Sequence[str] = METADATA_FIELDS, missing_ok: bool = False
  ) -> tuple[Servable, dict[str, Union[get_model_metadata_pb2.SignatureDefMap,
                                       dict]]]:
    """GetModelMetadata: (servable, {field: SignatureDefMap or metadata dict}).

    A version exported by something other than tff_dpmed has no
    tff_dpmed_metadata: NOT_FOUND if asked for, left out if `missing_ok`.
    """
    if not fields:
      raise invalid("GetModelMetadataRequest must specify at least one "
                    "metadata_field")
    for field in fields:
      if field not in METADATA_FIELDS:
        raise invalid(f"Metadata field {field} is not supported")
    servable = self.resolve(name, version, label)
    result = {}
    if SIGNATURE_DEF_FIELD in fields:
      result[SIGNATURE_DEF_FIELD] = signature_def_map(servable)
    if TFF_DPMED_METADATA_FIELD in fields:
      if servable.export_metadata is not None:
        result[TFF_DPMED_METADATA_FIELD] = servable.export_metadata
      elif not missing_ok:
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"version {servable.version} has no "
                           "tff_dpmed metadata (not exported by tff_dpmed)")
    return servable, result

  def check_inputs(self, signature: Signature,
                   inputs: Mapping[str, tuple[tf.DType, Sequence[int]]]) -> None:
    """Checks input names, dtypes, shapes and batch size against `signature`.

    Takes (dtype, shape) only, so a gRPC tensor is checked before it is
    materialised: a proto may declare a huge shape with no values.
    """
    sent, wanted = set(inputs), set(signature.inputs)
    if sent != wanted:
      # TF Serving's wording, so existing client-side handling still matches.
      raise invalid(
          f"input size does not match signature: {len(sent)}!={len(wanted)} "
          f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}})."
          f" Sent extra: {{{','.join(sorted(sent - wanted))}}}. Missing but "
          f"required: {{{','.join(sorted(wanted - sent))}}}.")
    batch_sizes = set()
    for name, (dtype, shape) in sorted(inputs.items()):
      spec = signature.inputs[name]
      if dtype != spec.dtype:
        raise invalid(f"input '{name}' of signature '{signature.name}' must be "
                      f"{spec.dtype.name} but {dtype.name} was sent")
      expected = spec.shape
      shape = tuple(int(d) for d in shape)
      if any(d < 0 for d in shape):
        raise invalid(f"input '{name}' has negative dimension in shape "
                      f"{shape_string(shape)}")
      if expected.rank is not None and (
          len(shape) != expected.rank or
          any(e is not None and e != d for e, d in zip(expected.as_list(), shape))):
        raise invalid(
            f"input '{name}' of signature '{signature.name}' must have shape "
            f"{shape_string(expected.as_list())} but has {shape_string(shape)}")
      if shape:
        batch_sizes.add(shape[0])
    if len(batch_sizes) > 1:
      raise invalid("all inputs must have the same batch size (0th dimension); "
                    f"got {sorted(batch_sizes)}")
    if batch_sizes and max(batch_sizes) > self.max_batch_size:
      # TF Serving's batching message, also INVALID_ARGUMENT there.
      raise invalid(f"Task size {max(batch_sizes)} is larger than maximum input "
                    f"batch size {self.max_batch_size}; split the request "
                    "(the server's --max_batch_size)")

  def predict(self, servable: Servable, signature_name: str,
              inputs: Mapping[str, np.ndarray],
              output_filter: Sequence[str] = ()) -> tuple[str, dict[str, np.ndarray]]:
    """Runs one signature; returns (signature name, outputs by alias)."""
    signature = servable.signature(signature_name)
    self.check_inputs(signature, {name: (_tf_dtype(value), value.shape)
                                  for name, value in inputs.items()})
    for alias in output_filter:
      if alias not in signature.outputs:
        raise invalid(f"output tensor alias not found in signature: {alias} "
                      "Outputs expected to be in the set "
                      f"{{{','.join(signature.outputs)}}}.")
    if len(set(output_filter)) != len(output_filter):
      raise invalid("duplicate output tensor alias in output_filter")
    tensors = {}
    for name, value in inputs.items():
      tensors[name] = tf.constant(value, dtype=signature.inputs[name].dtype)
    try:
      outputs = signature.function(**tensors)
    except tf.errors.OpError as e:
      code = _GRPC_CODES.get(e.error_code, grpc.StatusCode.UNKNOWN)
      if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        _log.error("version %d signature %s failed: %s", servable.version,
                   signature.name, e)
      raise ServingError(code, clean_tf_message(e.message)) from None
    wanted = list(output_filter) or list(signature.outputs)
    return signature.name, {alias: outputs[alias].numpy() for alias in wanted}


def clean_tf_message(message: str) -> str:
  """The user-facing part of a TF runtime error: no node names, no graph trace."""
  marker = "assertion failed: ["
  if marker in message:
    start = message.index(marker) + len(marker)
    end = message.find("]\n", start)
    return message[start:end if end >= 0 else None].strip()
  lines = []
  for line in message.splitlines():
    line = line.strip()
    if (not line or line.startswith(("Graph execution error", "Detected at node",
                                     "<stack traces", "[[", "File ")) or
        line.startswith("\t")):
      continue
    lines.append(line)
  text = lines[-1] if lines else message.strip()
  cut = text.find(" [Op:")
  return text[:cut] if cut >= 0 else text


def _fingerprint(path: str) -> tuple:
  entries = []
  for root, _, files in os.walk(path):
    for f in files:
      try:
        st = os.stat(os.path.join(root, f))
      except OSError:
        continue
      entries.append((os.path.relpath(os.path.join(root, f), path), st.st_size,
                      st.st_mtime_ns))
  return tuple(sorted(entries))


def _tf_dtype(value: np.ndarray) -> tf.DType:
  # Strings arrive as object arrays of bytes (tf.make_ndarray, the JSON parser).
  if value.dtype == object or value.dtype.kind in "SU":
    return tf.string
  return tf.as_dtype(value.dtype)
