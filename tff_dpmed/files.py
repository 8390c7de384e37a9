"""Writing files so that a reader, or a crash, never sees half of one.

The one place that writes JSON for the project: strict JSON (no NaN or
Infinity, which strict parsers reject), so callers put `None` and a reason
where a number is undefined.
"""

import json
import math
import os
from typing import Any


def strict(obj: Any) -> Any:
  """`obj` with numpy scalars as Python values and non-finite floats as None."""
  if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
    obj = obj.item()
  elif hasattr(obj, "tolist"):
    obj = obj.tolist()
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text of `obj` (see `strict`)."""
  return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a fsynced temporary file and a rename."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as strict, indented JSON, atomically."""
  write_atomic(path, (dumps(obj, indent=2, sort_keys=True) + "\n").encode())
