#!/usr/bin/env bash
# Re-render every ready-made file under launchers/ with the command in its own header line
# ("# Rendered by: dtrain launch ..."); tests/unit/test_launch.py fails when one is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
for file in launchers/*/*; do
  [ "$(basename "$file")" = README.md ] && continue
  command=$(grep -m1 '^# Rendered by: dtrain launch ' "$file" | sed 's/^# Rendered by: dtrain //')
  eval "\"$python\" -m dtrain $command --out \"$file\""
done
