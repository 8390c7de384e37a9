"""Runs `worker_binary` in a network namespace of its own, reachable only by a Unix socket.

  TFF_DPMED_WORKER_ARGV='["/path/worker_binary", "--flag=..."]' \
  unshare --user --map-root-user --net -- python -I netns_bridge.py \
      --socket=DIR/executor.sock --port=PORT --parent_pid=PID

`worker_binary` serves TFF's executor protocol, unauthenticated, on
`[::]:PORT` (it cannot be told to bind loopback only), and whoever reaches
that port can run any TensorFlow computation as the worker's user. In a
fresh network namespace, where the only interface is `lo`, no other host and
no other process on this host can reach the port. This program, run there
by `unshare`, brings `lo` up, forks a forwarder and then *becomes* the
binary (exec), so the owner's child is the binary itself, as without
isolation: its pid, its exit code and the kernel's die-with-parent signal
the owner set all stay the binary's.

The forwarder (a child of the binary) waits until the binary accepts TCP on
127.0.0.1:PORT of the namespace, then listens on the Unix socket (its folder
is the owner's 0700 temp folder, so only its user can connect) and pipes
each connection to that port byte for byte, so gRPC passes through
unchanged. Its die-with-parent signal is SIGTERM, and it also checks twice a
second that the binary is still its parent: when the binary exits or is
killed, the forwarder removes the socket and its folder and exits.

The binary's command line comes in the environment, not in argv, so only
the binary itself shows up as `worker_binary` in process listings.
Imports only the standard library: it starts in a few tens of ms.
"""

import argparse
import asyncio
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time
import warnings

ARGV_ENV = "TFF_DPMED_WORKER_ARGV"
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_CHUNK_BYTES = 1 << 18
EXIT_NOT_ISOLATED = 3
EXIT_ORPHANED = 4
EXIT_EXEC_FAILED = 127
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _log(message: str) -> None:
  print(f"netns_bridge: {message}", file=sys.stderr, flush=True)


def _bring_up_loopback() -> None:
  """A new network namespace has `lo` down, so 127.0.0.1 is unreachable until this."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    request = struct.pack("16sH", b"lo", 0) + bytes(22)
    flags = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS,
                struct.pack("16sH", b"lo", flags | _IFF_UP) + bytes(22))


def _remove_socket(path: str) -> None:
  for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
    try:
      remove(target)
    except OSError:
      pass


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
  # gRPC writes small frames (headers, acks) it waits on: no Nagle delay on the TCP leg.
  upstream_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  pumps = [asyncio.ensure_future(_pump(client_reader, upstream_writer)),
           asyncio.ensure_future(_pump(upstream_reader, client_writer))]
  try:
    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
  except asyncio.CancelledError:
    pass  # The forwarder is stopping. A cancelled task would log a traceback (Python 3.11).
  finally:
    for pump in pumps:
      pump.cancel()
    for writer in (client_writer, upstream_writer):
      writer.close()


# Set by a stop signal that comes before asyncio's handlers are in place.
_stop_requested = False
_PARENT_POLL_S = 0.5


async def _watch_parent(binary_pid: int, stop: asyncio.Event) -> None:
  """Stops the forwarder once the binary is gone, should its signal have been missed."""
  while not stop.is_set():
    if os.getppid() != binary_pid:
      stop.set()
    await asyncio.sleep(_PARENT_POLL_S)


async def _serve(socket_path: str, port: int, binary_pid: int, ready_timeout_s: float) -> None:
  """Waits for the binary's port, then forwards the Unix socket to it until stopped.

  Stops on SIGTERM, SIGINT or SIGHUP, or when the binary (its parent) has exited.
  """
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for signum in STOP_SIGNALS:
    loop.add_signal_handler(signum, stop.set)
  if _stop_requested:
    stop.set()
  watcher = asyncio.ensure_future(_watch_parent(binary_pid, stop))
  server = None
  try:
    deadline = time.monotonic() + ready_timeout_s
    while not stop.is_set():
      try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        break
      except OSError:
        if time.monotonic() > deadline:
          _log(f"the worker did not listen on 127.0.0.1:{port} within {ready_timeout_s:.0f}s")
          return
        await asyncio.sleep(0.02)
    if stop.is_set():
      return
    server = await asyncio.start_unix_server(lambda r, w: _forward(port, r, w), path=socket_path)
    os.chmod(socket_path, 0o600)
    await stop.wait()
  finally:
    _hold_stop_signals()
    watcher.cancel()
    if server is not None:
      server.close()


def _hold_stop_signals() -> None:
  """From the first stop on, further stop signals wait until the forwarder has exited.

  The kernel sends the die-with-parent signal each time the forwarder's parent
  *thread* exits, then moves it to another live thread of the binary; so a
  killed multi-threaded binary sends a burst of SIGTERMs. Once asyncio.run
  has closed its loop they would meet the default action and kill the
  forwarder between removing the socket and removing its folder.
  """
  signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _request_stop(signum, frame) -> None:
  """Until asyncio takes over the stop signals: noted, and _serve stops at once.

  Not an exception: raised inside asyncio.run's machinery, one left a task that
  never finished and the forwarder waiting forever.
  """
  del signum, frame
  global _stop_requested
  _stop_requested = True


def _run_forwarder(socket_path: str, port: int, binary_pid: int, ready_timeout_s: float):
  """The forked child: forwards until the binary (its parent) is gone; never returns."""
  code = 0
  # Nothing but _log may reach stderr, the worker's log, whose last line must stay
  # the binary's own reason for failing.
  warnings.simplefilter("ignore")
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == binary_pid:  # Else the binary already died: nothing to serve.
      asyncio.run(_serve(socket_path, port, binary_pid, ready_timeout_s))
  except BaseException as e:  # pylint: disable=broad-except
    _log(f"forwarder failed: {e!r}")
    code = 1
  finally:
    _hold_stop_signals()
    _remove_socket(socket_path)
    os._exit(code)  # Never back into the code that execs the binary.


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--socket", required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--parent_pid", type=int, required=True)
  parser.add_argument("--ready_timeout_s", type=float, default=60.0)
  args = parser.parse_args()
  command = json.loads(os.environ.pop(ARGV_ENV))
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
    # Refuse rather than serve on a network others reach (e.g. run without unshare).
    _log(f"not in a private network namespace (interfaces {interfaces}); refusing to start")
    _remove_socket(args.socket)
    return EXIT_NOT_ISOLATED
  binary_pid = os.getpid()
  sys.stdout.flush()
  sys.stderr.flush()
  # Stop signals are held across the fork, so the forwarder cannot be ended by
  # one (default action: no cleanup) before its own handler is in place.
  previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
  if os.fork() == 0:
    for signum in STOP_SIGNALS:
      signal.signal(signum, _request_stop)
    signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    _run_forwarder(args.socket, args.port, binary_pid, args.ready_timeout_s)
  signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # The binary gets the old mask.
  try:
    os.execv(command[0], [*command, f"--port={args.port}"])
  except OSError as e:
    _log(f"cannot run {command[0]}: {e}")
    return EXIT_EXEC_FAILED


if __name__ == "__main__":
  sys.exit(main())
