"""Shared CLI plumbing: absl flag parsing and one-line errors with exit code 2."""

import os
import sys
from typing import Callable, Mapping, Optional, Sequence

# TensorFlow's C++ start-up lines (oneDNN, cuDNN, cuFFT, cuBLAS, TensorRT,
# grappler; some logged as errors) tell a CPU user nothing: hide them unless
# --verbosity (absl's flag) asks for detail. Set before any CLI imports TF.
if not any(arg.startswith(("--verbosity", "-v=", "--v=")) for arg in sys.argv[1:]):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app
from absl import flags

from tff_dpmed.errors import UsageError

USAGE_EXIT_CODE = 2


def fail(message: str) -> None:
  """Prints a one-line error and exits with the usage exit code."""
  one_line = " ".join(str(message).split())
  print(f"error: {one_line}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # absl would print the whole usage text and exit 1; a user wants the one line.
    fail(f"{e} (see --helpfull for every flag)")
  raise AssertionError("unreachable")


def run(main: Callable[[list[str]], None],
        bare_flags: Optional[Mapping[str, str]] = None) -> None:
  """Runs `main` under absl; a UsageError anywhere becomes `error: ...`, exit 2.

  `bare_flags` rewrites flags given without a value (e.g. {"--audit":
  "--audit=mia"}) before absl parses them: absl would otherwise take the next
  argument as the value of a non-bool flag.
  """
  aliases = dict(bare_flags or {})

  def guarded_main(argv):
    try:
      main(argv)
    except UsageError as e:
      fail(str(e))

  app.run(guarded_main,
          flags_parser=lambda argv: _parse_flags([aliases.get(a, a) for a in argv]))
