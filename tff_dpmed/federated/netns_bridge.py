"""Runs `worker_binary` in a network namespace of its own, reachable only by a Unix socket.

  unshare --user --map-root-user --net -- python -m tff_dpmed.federated.netns_bridge \
      --socket=DIR/executor.sock --port=PORT --parent_pid=PID -- BINARY ARGS...

`worker_binary` serves TFF's executor protocol, unauthenticated, on
`[::]:PORT` (it cannot be told to bind loopback only), and whoever reaches
that port can run any TensorFlow computation as the worker's user. Run in a
fresh network namespace, where the only interface is `lo`, no other host and
no other process on this host can reach the port. This process runs in that
namespace, starts the binary there and forwards bytes between a Unix socket
(in a 0700 folder of the owner's, so only its user can connect) and
127.0.0.1:PORT of the namespace.

Lifetime: the owner's kernel-level die-with-parent signal is SIGTERM (see
`worker_process`), so this process outlives no owner and cleans up on it:
it stops the binary, removes the socket and its folder, and exits. The
binary in turn gets SIGKILL if this process dies in any way. When the binary
exits by itself, this process exits with its code.

Imports nothing of TensorFlow, TFF or gRPC: it starts in a few tens of ms.
"""

import argparse
import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
import time

_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_CHUNK_BYTES = 1 << 18
STOP_TIMEOUT_S = 10.0
# Printed on stdout once the socket accepts connections, followed by the binary's pid.
READY_PREFIX = "ready "
EXIT_NOT_ISOLATED = 3
EXIT_ORPHANED = 4


def _log(message: str) -> None:
  print(f"netns_bridge: {message}", file=sys.stderr, flush=True)


def _bring_up_loopback() -> None:
  """A new network namespace has `lo` down, so 127.0.0.1 is unreachable until this."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    request = struct.pack("16sH", b"lo", 0) + bytes(22)
    flags = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS,
                struct.pack("16sH", b"lo", flags | _IFF_UP) + bytes(22))


def _kill_binary_with_us() -> None:  # Runs in the binary's process between fork and exec.
  libc = ctypes.CDLL("libc.so.6", use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _wait_listening(port: int, binary: asyncio.subprocess.Process, timeout_s: float,
                          stop: asyncio.Event) -> bool:
  """Waits until the binary accepts TCP connections on 127.0.0.1:port, has exited, or we stop."""
  deadline = time.monotonic() + timeout_s
  while binary.returncode is None and not stop.is_set() and time.monotonic() < deadline:
    try:
      _, writer = await asyncio.open_connection("127.0.0.1", port)
      writer.close()
      return True
    except OSError:
      await asyncio.sleep(0.02)
  return False


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
  while data := await reader.read(_CHUNK_BYTES):
    writer.write(data)
    await writer.drain()


async def _forward(port: int, client_reader, client_writer) -> None:
  """Pipes one Unix-socket connection to the binary's port, both ways, until either side ends."""
  try:
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
  except OSError as e:
    _log(f"cannot reach the worker on 127.0.0.1:{port}: {e}")
    client_writer.close()
    return
  for writer in (client_writer, upstream_writer):
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer)),
           asyncio.ensure_future(_pump(upstream_reader, client_writer))]
  try:
    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
  except asyncio.CancelledError:
    pass
  finally:
    for pump in pumps:
      pump.cancel()
    for writer in (client_writer, upstream_writer):
      writer.close()


async def _stop_binary(binary: asyncio.subprocess.Process) -> None:
  if binary.returncode is not None:
    return
  binary.send_signal(signal.SIGINT)
  try:
    await asyncio.wait_for(binary.wait(), STOP_TIMEOUT_S)
  except asyncio.TimeoutError:
    binary.kill()
    await binary.wait()


def _remove_socket(path: str) -> None:
  for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
    try:
      remove(target)
    except OSError:
      pass


async def _serve(args) -> int:
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    loop.add_signal_handler(signum, stop.set)
  binary = await asyncio.create_subprocess_exec(
      *args.command, f"--port={args.port}", stdin=asyncio.subprocess.DEVNULL,
      # Our stdout is the owner's ready pipe; the binary writes to the log only.
      stdout=sys.stderr,
      preexec_fn=_kill_binary_with_us, close_fds=True)
  server = None
  try:
    if not await _wait_listening(args.port, binary, args.ready_timeout_s, stop):
      if stop.is_set():
        return 0
      await _stop_binary(binary)  # The owner reports its exit code; its log says why.
      return binary.returncode or 1
    server = await asyncio.start_unix_server(
        lambda r, w: _forward(args.port, r, w), path=args.socket)
    os.chmod(args.socket, 0o600)
    print(f"{READY_PREFIX}{binary.pid}", flush=True)
    exited = asyncio.ensure_future(binary.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([exited, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if binary.returncode is not None:
      _log(f"the worker binary exited with code {binary.returncode}")
      return binary.returncode or 1
    return 0
  finally:
    if server is not None:
      server.close()
    _remove_socket(args.socket)
    await _stop_binary(binary)


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--socket", required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--parent_pid", type=int, required=True)
  parser.add_argument("--ready_timeout_s", type=float, default=60.0)
  parser.add_argument("command", nargs="+")
  args = parser.parse_args()
  if os.getppid() != args.parent_pid:
    # The owner died before its die-with-parent signal was armed: nobody to serve.
    _remove_socket(args.socket)
    return EXIT_ORPHANED
  try:
    _bring_up_loopback()
  except OSError as e:
    _log(f"cannot bring up lo: {e}")
    return EXIT_NOT_ISOLATED
  interfaces = [name for _, name in socket.if_nameindex()]
  if interfaces != ["lo"]:
    # Refuse rather than serve on a network others reach (e.g. started without unshare).
    _log(f"not in a private network namespace (interfaces {interfaces}); refusing to start")
    _remove_socket(args.socket)
    return EXIT_NOT_ISOLATED
  return asyncio.run(_serve(args))


if __name__ == "__main__":
  sys.exit(main())
