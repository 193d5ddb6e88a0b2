#!/usr/bin/env bash
# Installs what is needed (into .venv) and runs the whole test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
exec "$PY" -m pytest "$@"
