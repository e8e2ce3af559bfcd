#!/usr/bin/env bash
# Create .venv and install dtrain with pinned dependencies; a second run with nothing changed is a no-op.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh dev      + test dependencies (pytest, moto S3 server, s3fs, ...)
# GPU machines: see README ("Installing on a GPU machine"); this script pins the CPU torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.dtrain-installed-${extras:-base}"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# pip's exit status decides (pipefail); the filter only drops a harmless warning about a local index
quiet() { grep -v "^WARNING: Location" || true; }
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
.venv/bin/python -m pip install -q -c constraints.txt -e "$spec" 2>&1 | quiet
.venv/bin/python -c "import dtrain, torch; print(f'dtrain ready: torch {torch.__version__}')"
echo "$want" > "$stamp"
