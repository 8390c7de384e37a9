"""Errors that the CLIs turn into a one-line message and exit code 2."""


class UsageError(Exception):
  """Bad input from the user (flags, files, data): say what and how to fix it.

  The CLIs print `error: <message>` on one line, exit with code 2 and show no
  traceback, so every message must name the problem and the fix.
  """
