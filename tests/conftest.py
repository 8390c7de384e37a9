"""Shared fixtures: the data directory and one TFF runtime for the whole session.

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


def pytest_sessionfinish(session, exitstatus):
  from tff_dpmed.federated import context
  context.stop_all_workers()
  left = context.wait_for_no_workers(timeout_s=10)
  if left:
    print(f"\nerror: worker_binary processes left after tests: {left}")
    session.exitstatus = 1
