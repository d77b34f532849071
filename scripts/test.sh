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
# runs in this process. Then, alone on the machine, the tests that judge step times: two workers with two torch
# threads each on two cores make every step time erratic, which step_outlier rightly reports.
# (exit status 5: that pass selected no test, which a path given in "$@" can do)
status=0
.venv/bin/python -m pytest -n "${GRADWATCH_TEST_WORKERS:-2}" --dist loadfile -m "not timing" "$@" || status=$?
[ "$status" -eq 5 ] && status=0
echo "==> the tests that judge step times, one at a time"
timing=0
.venv/bin/python -m pytest -n 0 -m timing "$@" || timing=$?
[ "$timing" -eq 5 ] && timing=0
[ "$status" -ne 0 ] && exit "$status"
exit "$timing"
