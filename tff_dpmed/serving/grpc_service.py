"""TF Serving's gRPC API (PredictionService, ModelService) over a ModelStore.

Same protos, method names and status codes as `tensorflow_model_server`, so a
client built on `tensorflow_serving.apis` works against either unchanged.
Implemented: Predict, GetModelMetadata, GetModelStatus. Classify, Regress,
MultiInference and HandleReloadConfigRequest answer UNIMPLEMENTED. Depends
only on the store (model_store.py), as the REST front-end does.
"""

import functools
import logging
import math
from typing import Optional

import grpc
import numpy as np
import tensorflow as tf

from google.protobuf import json_format
from google.protobuf import struct_pb2
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tff_dpmed.serving import model_store as store_lib
from tff_dpmed.serving.model_store import ModelStore, ServingError, invalid

_log = logging.getLogger("tff_dpmed.serve")

# Where a TensorProto keeps its values for each dtype, when not in tensor_content.
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val", types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val", types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val", types_pb2.DT_STRING: "string_val",
    types_pb2.DT_HALF: "half_val", types_pb2.DT_BFLOAT16: "half_val",
}
# int_val is int32 on the wire: narrower types would silently wrap around.
_INT_RANGES = {
    types_pb2.DT_UINT8: (0, 255), types_pb2.DT_INT8: (-128, 127),
    types_pb2.DT_INT16: (-32768, 32767), types_pb2.DT_UINT16: (0, 65535),
}


def _rpc(method):
  """Turns ServingError into its status code; anything else into INTERNAL."""

  @functools.wraps(method)
  def wrapper(self, request, context):
    try:
      return method(self, request, context)
    except ServingError as e:
      error = e
    except Exception:  # pylint: disable=broad-except
      # Log the traceback here; the client gets no internals.
      _log.exception("%s failed", method.__name__)
      error = ServingError(grpc.StatusCode.INTERNAL,
                           f"internal error in {method.__name__}; see the server log")
    context.abort(error.code, error.message)

  return wrapper


def resolve_spec(store: ModelStore, spec: model_pb2.ModelSpec
                 ) -> store_lib.Servable:
  version, label = spec_version(spec)
  return store.resolve(spec.name, version, label)


def spec_version(spec: model_pb2.ModelSpec) -> tuple[Optional[int], Optional[str]]:
  choice = spec.WhichOneof("version_choice")
  if choice == "version":
    return spec.version.value, None
  if choice == "version_label":
    return None, spec.version_label
  return None, None


def tensor_proto_to_ndarray(name: str, proto: tensor_pb2.TensorProto
                            ) -> np.ndarray:
  """Materialises a (pre-checked) request tensor, refusing inconsistent protos."""
  shape = [d.size for d in proto.tensor_shape.dim]
  n = math.prod(shape)
  try:
    itemsize = tf.as_dtype(proto.dtype).size
  except TypeError:
    raise invalid(f"input '{name}' has unsupported dtype {proto.dtype}") from None
  if proto.tensor_content and proto.dtype != types_pb2.DT_STRING:
    if len(proto.tensor_content) != n * itemsize:
      raise invalid(f"input '{name}': tensor_content holds "
                    f"{len(proto.tensor_content)} bytes but shape "
                    f"{store_lib.shape_string(shape)} needs {n * itemsize}")
  elif proto.dtype in _VALUE_FIELDS:
    values = getattr(proto, _VALUE_FIELDS[proto.dtype])
    # TF repeats a single value to fill the shape; anything else is a bug.
    if len(values) != n and not (len(values) == 1 and n > 1):
      raise invalid(f"input '{name}' has {len(values)} values but shape "
                    f"{store_lib.shape_string(shape)} needs {n}")
    if proto.dtype in _INT_RANGES and len(values):
      low, high = _INT_RANGES[proto.dtype]
      array = np.asarray(values, dtype=np.int64)
      if array.min() < low or array.max() > high:
        raise invalid(f"input '{name}' has values outside [{low}, {high}] for "
                      f"{tf.as_dtype(proto.dtype).name}")
  try:
    return tf.make_ndarray(proto)
  except (ValueError, TypeError) as e:
    raise invalid(f"input '{name}' is not a valid tensor: {e}") from None


def tensor_header(name: str, proto: tensor_pb2.TensorProto
                  ) -> tuple[tf.DType, list[int]]:
  """The (dtype, shape) a request tensor declares, without reading its values."""
  if proto.dtype == types_pb2.DT_INVALID:
    raise invalid(f"input '{name}' has no dtype")
  try:
    dtype = tf.as_dtype(proto.dtype)
  except TypeError:
    raise invalid(f"input '{name}' has unsupported dtype {proto.dtype}") from None
  if proto.tensor_shape.unknown_rank:
    raise invalid(f"input '{name}' has unknown rank; send its full shape")
  return dtype, [d.size for d in proto.tensor_shape.dim]


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
  """tensorflow.serving.PredictionService."""

  def __init__(self, store: ModelStore):
    self._store = store

  @_rpc
  def Predict(self, request, context):
    if not request.HasField("model_spec"):
      raise invalid("Missing ModelSpec")
    servable = resolve_spec(self._store, request.model_spec)
    signature = servable.signature(request.model_spec.signature_name)
    # Shapes and dtypes first: a proto can declare [10**9, ...] with no values.
    self._store.check_inputs(signature, {
        name: tensor_header(name, proto) for name, proto in request.inputs.items()})
    inputs = {name: tensor_proto_to_ndarray(name, proto)
              for name, proto in request.inputs.items()}
    signature_name, outputs = self._store.predict(
        servable, signature.name, inputs, list(request.output_filter))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature_name
    for alias, value in outputs.items():
      response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return response

  @_rpc
  def GetModelMetadata(self, request, context):
    if not request.HasField("model_spec"):
      raise invalid("Missing ModelSpec")
    version, label = spec_version(request.model_spec)
    servable, fields = self._store.model_metadata(
        request.model_spec.name, version, label, list(request.metadata_field))
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    for field, value in fields.items():
      if isinstance(value, dict):
        struct = struct_pb2.Struct()
        json_format.ParseDict(value, struct)
        value = struct
      response.metadata[field].Pack(value)
    return response

  @_rpc
  def Classify(self, request, context):
    raise _unimplemented("Classify")

  @_rpc
  def Regress(self, request, context):
    raise _unimplemented("Regress")

  @_rpc
  def MultiInference(self, request, context):
    raise _unimplemented("MultiInference")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
  """tensorflow.serving.ModelService."""

  def __init__(self, store: ModelStore):
    self._store = store

  @_rpc
  def GetModelStatus(self, request, context):
    if not request.HasField("model_spec"):
      raise invalid("Missing ModelSpec")
    version, label = spec_version(request.model_spec)
    return self._store.model_status(request.model_spec.name, version, label)

  @_rpc
  def HandleReloadConfigRequest(self, request, context):
    raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                       "HandleReloadConfigRequest is not supported: this server "
                       "serves one model and picks up new versions by itself")


def _unimplemented(method: str) -> ServingError:
  return ServingError(grpc.StatusCode.UNIMPLEMENTED,
                      f"{method} is not supported by tff_dpmed.serve; the "
                      "exported models have predict signatures: use Predict")


def add_to_server(server: grpc.Server, store: ModelStore) -> None:
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
      PredictionServicer(store), server)
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(
      ModelServicer(store), server)
