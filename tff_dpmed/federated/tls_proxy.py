"""A gRPC proxy serving TFF's executor service over mutual TLS, in front of a worker.

`worker_binary` speaks the executor protocol in plaintext and checks no
identity. `python -m tff_dpmed.worker` with TLS flags runs the binary in a
private network namespace (see `netns_bridge`) and puts this proxy on the
public port: gRPC's own TLS, with client certificates verified against a CA,
and every executor RPC forwarded unchanged (raw bytes, no protobuf decoding)
to the binary's Unix socket. Only the methods of TFF's executor service are
forwarded; anything else is UNIMPLEMENTED.

Imports neither TensorFlow nor TFF (the worker CLI stays small); the method
table below is checked against TFF's service descriptor by the tests.
"""

from concurrent import futures
from typing import Iterator, Optional

import grpc

EXECUTOR_SERVICE = "tensorflow_federated.v0.ExecutorGroup"
# Method -> (client_streaming, server_streaming), as in TFF 0.87's executor.proto: all unary
# today, but the proxy forwards streaming methods too should a TFF version add them.
EXECUTOR_METHODS = {
    "GetExecutor": (False, False),
    "CreateValue": (False, False),
    "CreateCall": (False, False),
    "CreateStruct": (False, False),
    "CreateSelection": (False, False),
    "Compute": (False, False),
    "Dispose": (False, False),
    "DisposeExecutor": (False, False),
}
# Each in-flight RPC holds a thread while its forwarded call runs. TFF issues one RPC per
# value/call, concurrently; none waits for an RPC not yet sent, so more just queue.
_MAX_CONCURRENT_RPCS = 64
# Set by gRPC itself on every call; forwarding them would duplicate or clash.
_HOP_BY_HOP_METADATA = ("user-agent", "grpc-", ":")
# ServicerContext.time_remaining() of a call without deadline is ~forever.
_NO_DEADLINE_S = 1e7


def _forwardable(metadata) -> tuple:
  return tuple((k, v) for k, v in (metadata or ()) if not k.startswith(_HOP_BY_HOP_METADATA))


def _timeout(context: grpc.ServicerContext) -> Optional[float]:
  remaining = context.time_remaining()
  return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def _abort_like(context: grpc.ServicerContext, error: grpc.RpcError):
  """Ends the proxied RPC with the upstream status, so the client sees the worker's error."""
  context.abort(error.code(), error.details() or "")


class _Forwarder(grpc.GenericRpcHandler):
  """Forwards every executor RPC, as raw bytes, to `channel` (the worker)."""

  def __init__(self, channel: grpc.Channel):
    self._channel = channel

  def service(self, handler_call_details):
    method = handler_call_details.method
    service, _, name = method.lstrip("/").rpartition("/")
    if service != EXECUTOR_SERVICE or name not in EXECUTOR_METHODS:
      return None  # gRPC answers UNIMPLEMENTED.
    client_streaming, server_streaming = EXECUTOR_METHODS[name]
    # No (de)serializers anywhere: requests and responses stay bytes.
    if not client_streaming and not server_streaming:
      upstream = self._channel.unary_unary(method)

      def unary_unary(request: bytes, context):
        call = upstream.future(request, timeout=_timeout(context),
                               metadata=_forwardable(context.invocation_metadata()))
        context.add_callback(call.cancel)  # The client gave up: so does the worker.
        try:
          return call.result()
        except grpc.RpcError as e:
          _abort_like(context, e)

      return grpc.unary_unary_rpc_method_handler(unary_unary)
    if not client_streaming:
      upstream = self._channel.unary_stream(method)

      def unary_stream(request: bytes, context) -> Iterator[bytes]:
        call = upstream(request, timeout=_timeout(context),
                        metadata=_forwardable(context.invocation_metadata()))
        context.add_callback(call.cancel)
        try:
          yield from call
        except grpc.RpcError as e:
          _abort_like(context, e)

      return grpc.unary_stream_rpc_method_handler(unary_stream)
    if not server_streaming:
      upstream = self._channel.stream_unary(method)

      def stream_unary(requests: Iterator[bytes], context):
        call = upstream.future(requests, timeout=_timeout(context),
                               metadata=_forwardable(context.invocation_metadata()))
        context.add_callback(call.cancel)
        try:
          return call.result()
        except grpc.RpcError as e:
          _abort_like(context, e)

      return grpc.stream_unary_rpc_method_handler(stream_unary)
    upstream = self._channel.stream_stream(method)

    def stream_stream(requests: Iterator[bytes], context) -> Iterator[bytes]:
      call = upstream(requests, timeout=_timeout(context),
                      metadata=_forwardable(context.invocation_metadata()))
      context.add_callback(call.cancel)
      try:
        yield from call
      except grpc.RpcError as e:
        _abort_like(context, e)

    return grpc.stream_stream_rpc_method_handler(stream_stream)


class TlsProxy:
  """Serves `[::]:port` over mutual TLS and forwards executor RPCs to `upstream_address`."""

  def __init__(self, *, port: int, upstream_address: str, cert_pem: bytes, key_pem: bytes,
               client_ca_pem: bytes, grpc_options: list):
    self._channel = grpc.insecure_channel(upstream_address, grpc_options)
    self._server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_MAX_CONCURRENT_RPCS,
                                   thread_name_prefix="tls_proxy"),
        handlers=[_Forwarder(self._channel)], options=grpc_options)
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=client_ca_pem, require_client_auth=True)
    try:
      bound = self._server.add_secure_port(f"[::]:{port}", credentials)
    except RuntimeError:
      bound = 0
    if bound != port:
      self._channel.close()
      raise OSError(f"cannot serve TLS on port {port}")

  def start(self) -> "TlsProxy":
    self._server.start()
    return self

  def stop(self, grace_s: float = 2.0) -> None:
    self._server.stop(grace_s).wait()
    self._channel.close()
