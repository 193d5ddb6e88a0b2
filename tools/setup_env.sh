#!/usr/bin/env bash
# Sourced by the top-level commands: creates the virtual environment .venv once and installs requirements.txt
# into it (again only when requirements.txt changes). Sets $PY to the environment's python.
# PYTHON (the interpreter that creates .venv, default python3) and VENV (its folder) can be overridden.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$REPO/.venv}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: $PYTHON not found. Install Python 3.11 (or set PYTHON=/path/to/python3.11)." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.requirements.sha256"
wanted="$(sha256sum "$REPO/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "Installing requirements.txt into $VENV (the first time takes a few minutes)"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -r "$REPO/requirements.txt"
    echo "$wanted" > "$stamp"
fi
export PY
