"""Shared fixtures: the data directory and one TFF runtime for the whole session.

tests/unit/ runs in-process in a couple of minutes (`make test-fast`);
tests/e2e/ (marker `e2e`) runs the CLIs, servers and workers as a user does.

One runtime (one worker_binary) for all tests keeps the suite fast, and the
session-end check fails the run if any worker outlives it.
"""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def medmnist_dir() -> pathlib.Path:
  """The MedMNIST folder: $TFF_DPMED_DATA_DIR, else ../shared/data/medmnist."""
  path = pathlib.Path(os.environ.get("TFF_DPMED_DATA_DIR")
                      or REPO_ROOT.parent / "shared" / "data" / "medmnist")
  if not (path / "pneumoniamnist.npz").is_file():
    raise RuntimeError(f"MedMNIST test data not found in {path}: set TFF_DPMED_DATA_DIR")
  return path


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return medmnist_dir()


@pytest.fixture(scope="session")
def tff_runtime():
  """TFF's C++ runtime, started once; executing computations needs it."""
  from tff_dpmed.federated import context
  with context.local_runtime() as worker:
    yield worker


def _leaked_workers(timeout_s: float = 10.0) -> list:
  """Workers this session started and left: its descendants, or orphans.

  Workers of other processes on the machine (another test run, a training job)
  have a living parent that is not ours and are not counted.
  """
  import time
  import psutil
  from tff_dpmed.federated import context
  deadline = time.monotonic() + timeout_s
  while True:
    own = {p.pid for p in psutil.Process().children(recursive=True)}
    leaked = []
    for pid in context.worker_pids():
      try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and (pid in own or proc.ppid() == 1):
          leaked.append(pid)
      except psutil.NoSuchProcess:
        pass
    if not leaked or time.monotonic() > deadline:
      return leaked
    time.sleep(0.1)


def pytest_collection_modifyitems(config, items):
  """Everything under tests/e2e/ is `e2e` (subprocess trainers, servers, workers)."""
  del config
  e2e = pytest.mark.e2e
  for item in items:
    if "e2e" in pathlib.Path(str(item.fspath)).parts:
      item.add_marker(e2e)


def pytest_sessionfinish(session, exitstatus):
  from tff_dpmed.federated import context
  context.stop_all_workers()
  left = _leaked_workers()
  if left:
    print(f"\nerror: worker_binary processes left after tests: {left}")
    session.exitstatus = 1
