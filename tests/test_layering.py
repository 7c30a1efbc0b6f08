"""Dependency direction: pcedge.runtime never imports torch or pcedge.export (ARCHITECTURE.md)."""

import subprocess
import sys
import textwrap

from conftest import ROOT


def test_every_runtime_module_imports_without_torch_or_export():
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import pcedge.runtime as runtime
        names = [m.name for m in pkgutil.iter_modules(runtime.__path__, "pcedge.runtime.")]
        for name in names:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")
                        or m.startswith("pcedge.export"))
        print(len(names), leaked)
        sys.exit(1 if leaked or len(names) < 20 else 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
