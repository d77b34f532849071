"""``import gradwatch`` stays light, and the probe side never loads the agent's libraries.

The probe does load pydantic and PyYAML: it validates the rules it is attached with (their
guards act in the training process) once, at attach, and not before: importing the probe
(``from gradwatch import attach``, the probe module itself) loads neither (benchmarks/import_time.py
measures what the import costs).
"""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("prometheus_client", "watchdog", "grafana_client", "niquests", "gradwatch.agent", "rich", "click")
NOT_ON_IMPORT = FORBIDDEN + ("pydantic", "yaml")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_import_gradwatch_loads_neither_torch_nor_agent_libraries() -> None:
    loaded = _modules_after("import gradwatch")
    assert not {m for m in loaded if m.split(".")[0] in ("torch",) or m.startswith(NOT_ON_IMPORT)}


def test_importing_the_probe_leaves_pydantic_and_yaml_for_attach() -> None:
    loaded = _modules_after("import torch\nfrom gradwatch import attach\nimport gradwatch.probes.probe\n"
                            "import gradwatch.probes.zerocode, gradwatch.probes.interceptors")
    assert "gradwatch.probes.probe" in loaded
    assert not {m for m in loaded if m.startswith(NOT_ON_IMPORT)}


def test_attaching_a_probe_loads_no_agent_library() -> None:
    loaded = _modules_after(
        "import os; os.environ['GRADWATCH_AUTOSTART'] = '0'\n"
        "import torch, gradwatch\n"
        "m = torch.nn.Linear(2, 1); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "with gradwatch.attach(m, o, run='isolation') as p:\n"
        "    m(torch.randn(2, 2)).sum().backward(); o.step(); p.log(loss=1.0)\n"
    )
    assert "gradwatch.probes.probe" in loaded
    assert not {m for m in loaded if m.startswith(FORBIDDEN)}
