"""Summaries (median and min-max over repetitions), markdown tables and the machine record."""

import datetime
import os
import platform
import statistics
import subprocess
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
  """(median, min, max); NaNs if there are no values."""
  values = [v for v in values if v is not None]
  if not values:
    nan = float("nan")
    return nan, nan, nan
  return statistics.median(values), min(values), max(values)


def fmt(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
  """'median (min-max)' of `values` times `scale`."""
  med, lo, hi = median_range(values)
  if med != med:  # NaN
    return "n/a"
  if len(values) == 1:
    return f"{med * scale:.{digits}f}"
  return f"{med * scale:.{digits}f} ({lo * scale:.{digits}f}-{hi * scale:.{digits}f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
  """A markdown table; `align` has one 'l' or 'r' per column (default: first l, rest r)."""
  align = align or "l" + "r" * (len(header) - 1)
  sep = ["---" if a == "l" else "---:" for a in align]
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _protobuf() -> str:
  """Version and backend: the pure-Python backend makes TFF's Python side several times slower."""
  try:
    import google.protobuf  # pylint: disable=g-import-not-at-top
    from google.protobuf.internal import api_implementation  # pylint: disable=g-import-not-at-top
    return f"{google.protobuf.__version__} ({api_implementation.Type()} backend)"
  except ImportError:
    return "not installed"


def machine(module: str = "benchmarks.run_all") -> dict:
  """What the numbers were measured on and with (imports TF and TFF for their versions);
  `module` is the benchmark that was run, for the command line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  dirty = _git("status", "--porcelain", "--untracked-files=no")
  load = os.getloadavg()
  return {
      "command": " ".join([os.path.basename(sys.executable), "-m", module,
                           *sys.argv[1:]]),
      "git commit": _git("rev-parse", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "nproc": str(os.cpu_count()),
      "usable cores": str(len(os.sched_getaffinity(0))),
      "cpu": _cpu_model(),
      "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
      "python": platform.python_version(),
      "tensorflow": tf.__version__,
      "tensorflow_federated": tff.__version__,
      "protobuf": _protobuf(),
      "os": platform.platform(),
  }


def machine_table(info: dict) -> str:
  return table(["", ""], [(k, f"`{v}`" if k == "command" else v) for k, v in info.items()],
               align="ll")


def write(path: str, text: str, raw: dict) -> None:
  """Writes the markdown report to `path` and the raw results as JSON beside it."""
  from tff_dpmed import files  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    f.write(files.dumps(raw, indent=1))
  print(f"\nwritten to {path}")
