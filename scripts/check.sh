#!/usr/bin/env bash
# The type and lint gate (CI runs it before the tests; docs/development.md):
#   ruff on every file, with the rule set in pyproject.toml;
#   mypy (strict, pydantic plugin) on the package as installed from its wheel: the top-level folders
#   (probes/, agent/, ...) are installed as gradwatch.* by a package-dir mapping that a check of the
#   source tree cannot follow, so the wheel is built and installed into build/typecheck first.
# Error paths are given back as paths in the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
echo "==> ruff"
$py -m ruff check .
echo "==> mypy (on the built wheel)"
rm -rf build/typecheck build/lib build/bdist.*  # setuptools reuses build/lib: stale modules would enter the wheel
mkdir -p build/typecheck
$py -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir build/typecheck/dist . >/dev/null
$py -m pip install --quiet --no-deps --target build/typecheck/site build/typecheck/dist/*.whl
status=0
(cd build/typecheck/site && MYPYPATH=. "../../../$py" -m mypy --config-file ../../../pyproject.toml -p gradwatch) \
  | sed -E -e 's#^gradwatch/(probes|agent|rules|spool|dashboards)/#\1/#' -e 's#^gradwatch/#gradwatch/#' \
  || status=$?
exit $status
