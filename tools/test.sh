#!/usr/bin/env bash
# Installs (idempotently) and runs the whole test suite. CI runs exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/install.sh"
cd "$ROOT"
shopt -s nullglob
exec "${PYTHON:-python3}" -m pytest tests projects/*/tests "$@"
