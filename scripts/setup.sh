#!/usr/bin/env bash
# Create .venv and install the project with uv (torch from a local wheel folder when one exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -qq --disable-pip-version-check uv  # -qq: errors only
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)   # CPU torch wheel on CI/dev machines
.venv/bin/uv pip install -q --python .venv/bin/python "${links[@]}" -e '.[test]'
