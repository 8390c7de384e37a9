"""Runs benchmarks.child in a new interpreter and returns its JSON result."""

import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

RESULT_PREFIX = "CHILD_RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(args: Sequence[str], timeout_s: float = 3600,
              env: Optional[dict] = None) -> dict:
  """Runs `python -m benchmarks.child ARGS` from the repo; returns its result.

  The start time is passed along, so the child's 'import' stage includes
  starting the interpreter.

  Raises RuntimeError with the child's last stderr lines if it fails.
  """
  cmd = [sys.executable, "-m", "benchmarks.child", *args, f"--start_time={time.time()!r}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                        env=env)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
  raise RuntimeError(f"benchmark child {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
