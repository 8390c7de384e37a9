"""CPU time and peak memory of a process and its TFF worker, read from /proc.

CPU seconds are reported next to wall time because they barely move when
other jobs share the machine, while wall time does.
"""

import os
from typing import Iterable

import psutil

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds `pid` has used so far (0 if it is gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Fields after the command name, which may itself contain spaces.
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def total_cpu_seconds(pids: Iterable[int]) -> float:
  return sum(cpu_seconds(p) for p in pids)


def peak_rss_bytes(pid: int) -> int:
  """VmHWM, the peak resident set size of `pid` so far (0 if it is gone)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def child_worker_pids(pid: int = 0) -> list[int]:
  """The TFF worker_binary processes started by `pid` (default: this process).

  Only descendants, so other people's workers on a shared machine never count.
  """
  try:
    children = psutil.Process(pid or os.getpid()).children(recursive=True)
  except psutil.NoSuchProcess:
    return []
  out = []
  for child in children:
    try:
      if any("worker_binary" in part for part in child.cmdline()):
        out.append(child.pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      pass
  return out


def usable_cores() -> int:
  """CPUs this process may run on (what "per core" divides by)."""
  return len(os.sched_getaffinity(0))
