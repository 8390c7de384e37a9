"""One loaded model version (`Servable`) and the error type requests raise.

Split from model_store.py, which keeps the set of versions: this is what one
version is, how it is loaded, and its signature map as TF Serving reports it.
"""

import dataclasses
import logging
import os
from typing import Iterable, Mapping, Optional, Sequence

import grpc
import tensorflow as tf

from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from tff_dpmed.serving import export_metadata

DEFAULT_SIGNATURE = "serving_default"

_log = logging.getLogger("tff_dpmed.serve")


class ServingError(Exception):
  """A request failed; `code` is the gRPC status code, `message` says why."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


def invalid(message: str) -> ServingError:
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class Signature:
  """One callable signature of a loaded version."""

  name: str
  function: tf.types.experimental.ConcreteFunction
  inputs: Mapping[str, tf.TensorSpec]
  outputs: Sequence[str]


@dataclasses.dataclass(frozen=True)
class Servable:
  """One loaded version of the model."""

  name: str
  version: int
  path: str
  signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
  signatures: Mapping[str, Signature]
  export_metadata: Optional[dict]  # assets.extra/tff_dpmed_metadata.json
  # Keeps the loaded object, which owns the variables, alive with the servable.
  loaded: object = dataclasses.field(repr=False, compare=False)

  def signature(self, name: str) -> Signature:
    name = name or DEFAULT_SIGNATURE
    if name not in self.signatures:
      # TF Serving's message and code (FAILED_PRECONDITION) for Predict.
      raise ServingError(
          grpc.StatusCode.FAILED_PRECONDITION,
          f'Serving signature key "{name}" not found. This model has: '
          f"{', '.join(sorted(self.signatures))}.")
    return self.signatures[name]


def load_servable(name: str, version: int, path: str) -> Servable:
  """Loads one version folder; raises whatever TF raises on a bad SavedModel."""
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto = saved_model_pb2.SavedModel.FromString(f.read())
  serve_graphs = [g for g in proto.meta_graphs
                  if "serve" in g.meta_info_def.tags] or list(proto.meta_graphs)
  signature_defs = dict(serve_graphs[0].signature_def) if serve_graphs else {}
  loaded = tf.saved_model.load(path, tags=["serve"])
  signatures = {}
  for sig_name, fn in loaded.signatures.items():
    _, kwargs = fn.structured_input_signature
    signatures[sig_name] = Signature(
        name=sig_name, function=fn, inputs=dict(kwargs),
        outputs=tuple(sorted(fn.structured_outputs)))
  metadata = None
  meta_path = os.path.join(path, export_metadata.METADATA_DIR,
                           export_metadata.METADATA_FILENAME)
  if os.path.exists(meta_path):
    try:
      metadata = export_metadata.load_metadata_file(meta_path)
    except (OSError, ValueError) as e:
      _log.warning("ignoring unreadable %s: %s", meta_path, e)
  return Servable(name=name, version=version, path=path,
                  signature_defs=signature_defs, signatures=signatures,
                  export_metadata=metadata, loaded=loaded)


def shape_string(shape: Iterable[Optional[int]]) -> str:
  return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


def signature_def_map(servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
  """The version's SignatureDefs, as GetModelMetadata's signature_def field."""
  result = get_model_metadata_pb2.SignatureDefMap()
  for name, signature_def in servable.signature_defs.items():
    result.signature_def[name].CopyFrom(signature_def)
  return result
