#!/usr/bin/env bash
# Creates (or reuses) .venv in the repo and installs the locked set into it.
# Reinstalls only when requirements/lock.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] < (3, 12)))'; then
  echo "error: tff_dpmed needs Python 3.9-3.11 (TFF 0.87); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

stamp=.venv/.lock.sha256
want="$(sha256sum requirements/lock.txt setup.cfg | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

echo "== setting up .venv with the locked set (first time takes a few minutes)"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=23" "setuptools>=64" wheel
# --no-deps: TFF 0.87 pins jaxlib==0.4.14, which the registry does not serve, so
# pip must not re-resolve; the lock is the complete, checked set (BUILD_NOTES.md).
.venv/bin/python -m pip install --quiet --no-deps -r requirements/lock.txt
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
.venv/bin/python -c 'import tensorflow_federated, tensorflow_privacy, dp_accounting, kymatio' 2>/dev/null \
  || { echo "error: the installed set does not import; see BUILD_NOTES.md" >&2; exit 1; }
echo "$want" > "$stamp"
echo "== .venv ready"
