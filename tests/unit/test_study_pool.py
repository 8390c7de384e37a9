"""A killed study does not leave its runs training: the pool's processes die with it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.conftest import REPO_ROOT

_STUDY = textwrap.dedent("""
    import time
    from experiments import runner
    pool = runner.study_pool(2)
    pool.submit(time.sleep, 120)
    pool.submit(time.sleep, 120)
    print("started", flush=True)
    time.sleep(120)
""")


def _children(pid: int) -> list:
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    if ppid == pid:
      found.append(int(entry))
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def test_killing_the_study_stops_its_runs():
  study = subprocess.Popen([sys.executable, "-c", _STUDY], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           text=True)
  try:
    assert study.stdout.readline().strip() == "started"
    deadline = time.time() + 60
    runs = []
    while len(runs) < 2 and time.time() < deadline:  # The two spawned run processes.
      runs = [p for p in _children(study.pid)
              if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
      time.sleep(0.2)
    assert len(runs) == 2, "the pool did not start its processes"
    study.send_signal(signal.SIGKILL)  # No handler, no cleanup: the worst case.
    study.wait(timeout=30)
    # A run process may still be importing (TF: seconds) when the study dies.
    deadline = time.time() + 60
    while any(map(_alive, runs)) and time.time() < deadline:
      time.sleep(0.2)
    assert not any(map(_alive, runs)), "the runs outlived the study"
  finally:
    study.kill()
