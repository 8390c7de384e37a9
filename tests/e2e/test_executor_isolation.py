"""The local TFF worker is unreachable from the network, and a bad worker fails fast (issue 17).

The listening-socket check reads each process's own /proc/PID/net/tcp{,6}
(the view of its network namespace) and keeps the LISTEN sockets it holds a
descriptor to; a socket is exposed if it is in this host's namespace and not
bound to a loopback address. The insecure runtime, which is what every run
did before, must be caught by the same check.
"""

import ipaddress
import os
import stat
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.test_train_bad_inputs import _message_lines
from tff_dpmed.federated import context
from tff_dpmed.federated import worker_process

_TCP_LISTEN = "0A"


def _address(hex_address: str) -> ipaddress._BaseAddress:
  raw = bytes.fromhex(hex_address)
  # The kernel prints each 32-bit word in host (little-endian) order.
  raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
  address = ipaddress.ip_address(raw)
  return getattr(address, "ipv4_mapped", None) or address


def _socket_inodes(pid: int) -> set[str]:
  inodes = set()
  for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
      target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(target[len("socket:["):-1])
  return inodes


def listening_sockets(pids) -> list[tuple[int, str, str, int]]:
  """(pid, network namespace, address, port) of every TCP LISTEN socket the processes hold."""
  found = []
  for pid in pids:
    try:
      netns = os.readlink(f"/proc/{pid}/ns/net")
      inodes = _socket_inodes(pid)
      for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
          for line in f.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _TCP_LISTEN and inode in inodes:
              host, port = local.split(":")
              found.append((pid, netns, str(_address(host)), int(port, 16)))
    except (FileNotFoundError, ProcessLookupError):
      continue  # Exited meanwhile.
  return found


def exposed_sockets(pids) -> list[tuple[int, str, int]]:
  """Those of `listening_sockets` another host could reach: our namespace, not loopback."""
  ours = os.readlink("/proc/self/ns/net")
  return [(pid, address, port) for pid, netns, address, port in listening_sockets(pids)
          if netns == ours and not ipaddress.ip_address(address).is_loopback]


def _descendants() -> list[int]:
  return [p.pid for p in psutil.Process().children(recursive=True)]


def _running(pid: int) -> bool:
  try:
    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return False


def test_local_runtime_listens_on_no_network_address():
  with context.local_runtime() as worker:
    pids = _descendants()
    forwarder, = psutil.Process(worker.binary_pid).children()
    assert worker.binary_pid in pids and forwarder.pid in pids
    # The binary does listen, but in its own namespace, where only lo exists.
    inside = listening_sockets([worker.binary_pid])
    assert inside and all(netns != os.readlink("/proc/self/ns/net")
                          for _, netns, _, _ in inside), inside
    assert exposed_sockets(pids) == []
    assert worker.address.startswith("unix:")
    assert stat.S_IMODE(os.stat(worker.socket_dir).st_mode) == 0o700
    socket_dir, pids = worker.socket_dir, [worker.binary_pid, forwarder.pid]
  assert not os.path.exists(socket_dir)
  # The forwarder exits on the SIGTERM the kernel sends it when the binary is gone.
  deadline = time.monotonic() + 10
  while (left := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert left == []


def test_the_check_catches_a_worker_on_all_interfaces():
  """What every run did before: the binary on [::]:PORT of the host."""
  with context.local_runtime(insecure=True) as worker:
    exposed = exposed_sockets(_descendants())
    assert (worker.binary_pid, "::", worker.port) in exposed, exposed


def _fake_unshare(tmp_path) -> dict:
  """An environment whose `unshare` fails as on a machine without user namespaces."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "unshare"
  fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                  "exit 1\n")
  fake.chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def _train(data_dir, out_dir, *flags, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "tff_dpmed.train", f"--data_dir={data_dir}",
       f"--output_dir={out_dir}", "--experiment_name=run", "--dataset=breastmnist",
       "--num_clients=4", "--clients_per_round=2", "--rounds=1", "--dp_mode=none",
       "--progress=false", *flags],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


def _one_error_line(result) -> str:
  lines = [line for line in _message_lines(result.stderr) if not line.startswith("note:")]
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
      result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr
  return lines[0]


def test_no_namespace_is_one_error_line_naming_the_flag(data_dir, tmp_path):
  result = _train(data_dir, tmp_path / "out", env=_fake_unshare(tmp_path))
  line = _one_error_line(result)
  assert "Operation not permitted" in line and "--insecure_local_executor" in line
  assert "all interfaces" in line.lower()
  assert not (tmp_path / "out").exists()


def test_no_namespace_never_falls_back_silently(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", _fake_unshare(tmp_path)["PATH"])
  worker_process._isolation_problem.cache_clear()
  try:
    with pytest.raises(context.IsolationError, match="--insecure_local_executor"):
      with context.local_runtime():
        pass
  finally:
    worker_process._isolation_problem.cache_clear()


def test_non_worker_binary_fails_in_prepare_at_once(data_dir, tmp_path):
  start = time.monotonic()
  result = _train(data_dir, tmp_path / "out", "--worker_binary=/bin/true")
  line = _one_error_line(result)
  assert "/bin/true" in line and "--worker_binary" in line
  assert not (tmp_path / "out").exists()
  assert time.monotonic() - start < 45  # Not the 60 s readiness timeout.


def test_worker_cli_with_non_worker_binary_fails_at_once(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tff_dpmed.worker", "--port=1", "--insecure",
       "--worker_binary=/bin/true"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  line = _one_error_line(result)
  assert "/bin/true" in line


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "insecure"])
def test_binary_exiting_at_start_fails_at_once(tmp_path, monkeypatch, isolated):
  """A binary that passes the --help probe but exits when started: seen in seconds."""
  fake = tmp_path / "worker_binary"
  fake.write_text("#!/bin/sh\ncase \"$1\" in --help=*) echo --max_concurrent_computation_calls;"
                  " exit 1;; esac\necho 'cannot load libcuda' >&2\nexit 3\n")
  fake.chmod(0o755)
  made = []
  mkdtemp = worker_process.tempfile.mkdtemp
  monkeypatch.setattr(worker_process.tempfile, "mkdtemp",
                      lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
  start = time.monotonic()
  with pytest.raises(context.WorkerError, match="exited with code 3") as e:
    context.WorkerProcess(binary=str(fake), isolated=isolated,
                          log_path=str(tmp_path / "log")).start()
  assert time.monotonic() - start < 10
  assert "cannot load libcuda" in str(e.value)  # The log's last line says why.
  assert len(made) == (1 if isolated else 0) and not any(os.path.exists(d) for d in made)


def test_worker_cli_log_file_in_missing_folder_is_one_error_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tff_dpmed.worker", "--port=1", "--insecure",
       f"--log_file={tmp_path / 'missing' / 'w.log'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  line = _one_error_line(result)
  assert "--log_file" in line and "missing" in line
