"""Start-up code of processes launched by ``gradwatch run`` (this directory leads their PYTHONPATH).

Python imports ``sitecustomize`` at start-up. This one waits for the script to import torch, then
installs gradwatch's zero-code probe (gradwatch/probes/zerocode.py); processes that never import
torch pay nothing else. Afterwards it runs the ``sitecustomize`` this one shadows, if there is one.
Nothing here may stop the script from running: failures are printed as one line.
"""

import os
import sys


def _install_after_torch_import() -> None:
    import importlib.abc
    import importlib.util

    def torch_imported() -> None:
        try:
            from gradwatch.probes import zerocode

            zerocode.install()
        except Exception as exc:
            print(f"gradwatch: zero-code probe not installed ({exc!r}); the script runs unobserved", file=sys.stderr)

    class AfterImport(importlib.abc.Loader):
        def __init__(self, inner: importlib.abc.Loader) -> None:
            self.inner = inner

        def create_module(self, spec):  # type: ignore[no-untyped-def]
            return self.inner.create_module(spec)

        def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
            module.__spec__.loader = module.__loader__ = self.inner  # torch keeps its own loader
            self.inner.exec_module(module)
            torch_imported()

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.inner, name)

    class WatchTorchImport(importlib.abc.MetaPathFinder):
        # Libraries ask importlib.util.find_spec("torch") before importing it (transformers, lightning):
        # every answer carries the wrapped loader, and only the import that executes torch installs.
        # Once torch is in sys.modules (or being imported) this finder steps aside. It stays in
        # sys.meta_path: removing it during a search is unsafe.
        def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
            if name != "torch" or "torch" in sys.modules:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = AfterImport(spec.loader)
                    return spec
            return None

    sys.meta_path.insert(0, WatchTorchImport())


def _run_shadowed_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("GRADWATCH_ZERO_CODE") == "1":
    try:
        _install_after_torch_import()
    except Exception as exc:
        print(f"gradwatch: zero-code bootstrap failed ({exc!r}); the script runs unobserved", file=sys.stderr)
_run_shadowed_sitecustomize()
