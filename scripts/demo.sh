#!/usr/bin/env bash
# Set up and run the demo: a small real training on CPU, watched by gradwatch (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gradwatch demo "$@"
