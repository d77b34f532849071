#!/usr/bin/env bash
# Set up and run the whole test suite: Debian's Prometheus and Alertmanager (real servers for the
# integration tests), a virtual environment with torch and gradwatch, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # also brings promtool
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)  # also brings amtool
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash scripts/setup.sh test
bash scripts/check.sh  # ruff and mypy: the lint and type gate
echo "==> running the tests"
# two workers, one test file each at a time (a file's module fixtures are built once); GRADWATCH_TEST_WORKERS=0
# runs in this process
exec .venv/bin/python -m pytest -n "${GRADWATCH_TEST_WORKERS:-2}" --dist loadfile "$@"
