"""Installing gradwatch changes nothing already in the environment (only adds), and the package builds
from its own build requirements: the sdist and the wheel, the wheel installed as users install it
(not editable). Real pip, real PyPI packages (requests, urllib3) in a fresh virtual environment."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(*cmd: str | Path, timeout: float = 600, cwd: Path = REPO.parent) -> str:
    """Run from outside the checkout: its egg-info must not look like an installed distribution."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: an isolated build from pyproject's build requirements, as pip and CI do."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, REPO)
    return out


def _installed(python: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """Every distribution in the environment: its version and the sha256 of each file it installed."""
    script = """
import hashlib, json, importlib.metadata as md
out = {}
for d in md.distributions():
    files = {}
    for f in d.files or []:
        path = f.locate()
        if path.is_file() and not str(f).endswith(".pyc"):
            files[str(f)] = hashlib.sha256(path.read_bytes()).hexdigest()
    out[d.metadata["Name"].lower()] = (d.version, files)
print(json.dumps(out))
"""
    return {k: (v, f) for k, (v, f) in json.loads(_run(python, "-c", script)).items()}


def test_the_sdist_and_the_wheel_hold_every_package_and_the_packaged_files(dist: Path) -> None:
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("gradwatch", "gradwatch/spool", "gradwatch/probes", "gradwatch/agent", "gradwatch/rules",
                    "gradwatch/dashboards"):
        assert f"{package}/__init__.py" in names, package
    assert {"gradwatch/py.typed", "gradwatch/_bootstrap/sitecustomize.py", "gradwatch/rules/default_rules.yaml",
            "gradwatch/spool/records.py"} <= names
    assert any(n.startswith("gradwatch/dashboards/") and n.endswith(".json") for n in names)
    with tarfile.open(sdist) as tar:
        assert any(n.endswith("/pyproject.toml") for n in tar.getnames())
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(name in line for line in requires for name in ("niquests", "urllib3", "grafana-client", "torch"))


def test_installing_the_wheel_only_adds_to_an_environment_with_requests_and_urllib3(dist: Path,
                                                                                    tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "requests", "urllib3")
    before = _installed(python)
    urllib3_before = _run(python, "-c", "import urllib3; print(urllib3.__version__, urllib3.__file__)")
    [wheel] = dist.glob("*.whl")
    _run(python, "-m", "pip", "install", "--quiet", wheel)
    after = _installed(python)
    assert "gradwatch" in after and "gradwatch" not in before
    changed = {name: (before[name][0], after.get(name, ("removed", {}))[0]) for name in before
               if after.get(name) != before[name]}
    assert changed == {}, f"installing gradwatch changed distributions that were there: {changed}"
    assert _run(python, "-c", "import urllib3; print(urllib3.__version__, urllib3.__file__)") == urllib3_before
    assert "niquests" not in after and "urllib3-future" not in after
    _run(python, "-m", "pip", "check")
    # the installed (not editable) package works: the CLI, and a missing extra is one clear line
    assert "Usage" in _run(venv / "bin" / "gradwatch", "--help")
    done = subprocess.run([str(venv / "bin" / "gradwatch"), "dashboards", "push", "--url", "http://127.0.0.1:9",
                           "--token", "t"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "pip install 'gradwatch[grafana]'" in done.stderr
    assert "Traceback" not in done.stderr
