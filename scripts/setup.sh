#!/usr/bin/env bash
# Create .venv and install the project with uv (torch from a local wheel folder when one exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -qq --disable-pip-version-check uv  # -qq: errors only
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)   # CPU torch wheel on CI/dev machines
# --compile-bytecode: .pyc files at install, so that every command starts from bytecode even where
# PYTHONDONTWRITEBYTECODE is set (compiling the imports from source costs ~8 s a command)
.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "${links[@]}" -e '.[test]'
