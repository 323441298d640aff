#!/usr/bin/env bash
# Runs the test suite in a local virtual environment (.venv), installing what it needs first.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -r requirements-dev.txt
python -m pytest tests -n 2 -q -rs "$@"
