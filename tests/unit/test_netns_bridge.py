"""The Unix-socket forwarder cleans up even when stop signals keep arriving."""

import os
import subprocess
import sys

import pytest

from tff_dpmed.federated import netns_bridge

_SCRIPT = r"""
import importlib.util, os, signal, socket, sys, tempfile, threading, time
# Loaded from its file, as the worker runs it (`python -I netns_bridge.py`): no TF import.
spec = importlib.util.spec_from_file_location("netns_bridge", sys.argv[1])
netns_bridge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(netns_bridge)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
folder = tempfile.mkdtemp(prefix="bridge_test_")
path = os.path.join(folder, "executor.sock")
print(folder, flush=True)

remove = netns_bridge._remove_socket
def remove_under_fire(socket_path):
  # A killed multi-threaded binary sends its die-with-parent SIGTERM once per
  # exiting thread: this one lands after asyncio has dropped its handlers.
  os.kill(os.getpid(), signal.SIGTERM)
  remove(socket_path)
netns_bridge._remove_socket = remove_under_fire

def stop_once_serving():
  signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # Main thread gets it.
  while not os.path.exists(path):
    time.sleep(0.01)
  os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_once_serving, daemon=True).start()
for signum in STOP_SIGNALS:
  signal.signal(signum, netns_bridge._request_stop)
netns_bridge._run_forwarder(path, port, os.getppid(), 10.0)
"""


def test_forwarder_removes_its_socket_folder_despite_repeated_stop_signals():
  proc = subprocess.run([sys.executable, "-I", "-c", _SCRIPT, netns_bridge.__file__], capture_output=True, text=True,
                        timeout=60, check=False)
  folder = proc.stdout.strip()
  assert proc.returncode == 0, f"forwarder ended by signal {-proc.returncode}: {proc.stderr}"
  assert folder and not os.path.exists(folder), f"{folder} outlived the forwarder"
  assert "Traceback" not in proc.stderr, proc.stderr  # No cancelled-task noise in the log.


_EARLY_OR_SILENT = r"""
import importlib.util, os, signal, socket, sys, tempfile, threading, time
spec = importlib.util.spec_from_file_location("netns_bridge", sys.argv[1])
netns_bridge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(netns_bridge)
case = sys.argv[2]
listener = socket.create_server(("127.0.0.1", 0))
folder = tempfile.mkdtemp(prefix="bridge_test_")
path = os.path.join(folder, "executor.sock")
print(folder, flush=True)
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
  signal.signal(signum, netns_bridge._request_stop)
if case == "early_signal":
  # The binary died at once: its die-with-parent SIGTERM came before asyncio started.
  os.kill(os.getpid(), signal.SIGTERM)
else:
  def parent_gone_silently():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    while not os.path.exists(path):
      time.sleep(0.01)
    netns_bridge.os.getppid = lambda: 1  # Reparented to init, and no signal came.
  threading.Thread(target=parent_gone_silently, daemon=True).start()
netns_bridge._run_forwarder(path, listener.getsockname()[1], os.getppid(), 30.0)
"""


@pytest.mark.parametrize("case", ["early_signal", "parent_gone_silently"])
def test_forwarder_stops_on_an_early_signal_or_a_silent_parent_death(case):
  proc = subprocess.run([sys.executable, "-I", "-c", _EARLY_OR_SILENT, netns_bridge.__file__,
                         case], capture_output=True, text=True, timeout=20, check=False)
  folder = proc.stdout.strip()
  assert proc.returncode == 0, proc.stderr
  assert folder and not os.path.exists(folder), f"{folder} outlived the forwarder"
  assert proc.stderr == "", proc.stderr
