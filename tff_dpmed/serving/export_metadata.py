"""The json that travels with each exported version: `assets.extra/tff_dpmed_metadata.json`.

It is strict JSON (RFC 8259): no NaN or Infinity, which Python's json module
writes by default but JavaScript, jq, Go and most other parsers refuse. A
non-finite number (test AUC of a test split with one class, epsilon without
DP) becomes `null`, and a sibling `<key>_reason` says what it was and why.
The server applies the same rule to files written before this rule existed.
"""

import json
import math
import os
from typing import Any

import numpy as np

from tff_dpmed.errors import UsageError

METADATA_DIR = "assets.extra"
METADATA_FILENAME = "tff_dpmed_metadata.json"
REASON_SUFFIX = "_reason"


def _non_finite_reason(key: str, value: float) -> str:
  text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  lowered = key.lower()
  if text == "NaN" and "auc" in lowered:
    why = ("AUC is undefined when the evaluated split lacks a class (or, "
           "multi-label, every label has one value)")
  elif text == "Infinity" and lowered in ("epsilon", "eps"):
    why = "no finite differential-privacy guarantee (no DP)"
  else:
    why = "not representable in strict JSON"
  return f"{text}: {why}"


def strict_json(value: Any) -> Any:
  """A copy of a JSON-like value with every NaN/Infinity replaced as above.

  Numpy scalars and arrays become plain Python values on the way. A
  non-finite number inside a list becomes `null` in place, and the reason
  (with its index) goes to the nearest enclosing object's `<key>_reason`.
  """
  clean, _ = _strict(value, "")
  return clean


def _strict(value: Any, key: str) -> tuple[Any, list[str]]:
  if isinstance(value, np.generic):
    value = value.item()
  elif isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None, [_non_finite_reason(key, value)]
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out[k], reasons = _strict(v, str(k))
      reason_key = f"{k}{REASON_SUFFIX}"
      if reasons and reason_key not in value:
        out[reason_key] = "; ".join(reasons)
    return out, []
  if isinstance(value, (list, tuple)):
    out, reasons = [], []
    for i, item in enumerate(value):
      clean, item_reasons = _strict(item, key)
      out.append(clean)
      reasons.extend(f"[{i}] {r}" for r in item_reasons)
    return out, reasons
  return value, []


def dumps_strict(doc: Any, **kwargs) -> str:
  """json.dumps that writes no NaN/Infinity (see strict_json)."""
  return json.dumps(strict_json(doc), allow_nan=False, **kwargs)


def load_metadata_file(path: str) -> dict:
  """Parses one metadata file; older files' NaN/Infinity are made strict."""
  with open(path, encoding="utf-8") as f:
    doc = json.load(f)
  if not isinstance(doc, dict):
    raise ValueError(f"{path} holds a JSON {type(doc).__name__}, not an object")
  return strict_json(doc)


def read_export_metadata(version_dir: str) -> dict:
  """Reads `assets.extra/tff_dpmed_metadata.json` of one exported version."""
  path = os.path.join(version_dir, METADATA_DIR, METADATA_FILENAME)
  try:
    return load_metadata_file(path)
  except FileNotFoundError:
    raise UsageError(f"{path} does not exist: is {version_dir} a version folder "
                     "written by tff_dpmed's export?") from None
  except (OSError, ValueError) as e:
    raise UsageError(f"cannot read {path}: {e}") from None


def write_export_metadata(saved_model_dir: str, doc: dict) -> None:
  """Writes `doc` as the version's metadata file; UsageError if not JSON-able."""
  try:
    text = dumps_strict(doc, indent=2, sort_keys=True, default=_json_default)
  except (TypeError, ValueError) as e:
    raise UsageError(f"export metadata is not JSON-serialisable: {e}") from None
  os.makedirs(os.path.join(saved_model_dir, METADATA_DIR), exist_ok=True)
  with open(os.path.join(saved_model_dir, METADATA_DIR, METADATA_FILENAME), "w",
            encoding="utf-8") as f:
    f.write(text + "\n")


def _json_default(value: Any) -> Any:
  # Training configs often carry numpy scalars and tuples-as-arrays; numpy
  # values were already converted by strict_json.
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-serialisable")
