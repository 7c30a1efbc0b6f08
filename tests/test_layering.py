"""The layout's rules (docs/architecture.md), checked on the source and on real imports.

- ``pcedge.runtime`` never imports torch, ``pcedge.export`` or the commands; it has no argparse.
- ``pcedge.export`` never imports the commands.
- Inside ``pcedge.runtime`` the module import graph (lazy imports included) has no cycle, and the detector
  path and ``tensorrt/`` never import ``watch/`` or ``evaluation/``.
- The public API named in ``runtime/__init__.py`` resolves, without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

#: Import-name prefix -> folder, as pyproject.toml maps them.
PACKAGES = {"pcedge.runtime": ROOT / "runtime", "pcedge.export": ROOT / "export", "pcedge": ROOT / "pcedge"}


def module_files(package: str) -> dict[str, Path]:
    """``{module name: file}`` for every module of ``package`` (sub-packages included)."""
    root = PACKAGES[package]
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def imported_modules(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (function-level imports included).

    ``from X import y`` counts ``X.y`` when that is a module of ours, else ``X``.
    """
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    ours = {**module_files("pcedge.runtime"), **module_files("pcedge.export"), **module_files("pcedge")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in ours else module)
    return found


def test_runtime_library_has_no_argparse_commands_torch_or_export():
    offenders = []
    for name, path in module_files("pcedge.runtime").items():
        for imported in imported_modules(name, path):
            top = imported.split(".")[0]
            if top in ("argparse", "torch", "torchvision") or imported.startswith(("pcedge.export", "pcedge.commands")) \
                    or imported == "pcedge.cli":
                offenders.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not offenders, "\n".join(offenders)


def test_export_never_imports_the_commands():
    offenders = [
        f"{path.relative_to(ROOT)} imports {imported}"
        for name, path in module_files("pcedge.export").items()
        for imported in imported_modules(name, path)
        if imported.startswith("pcedge.commands") or imported == "pcedge.cli"
    ]
    assert not offenders, "\n".join(offenders)


def runtime_graph() -> dict[str, set[str]]:
    modules = module_files("pcedge.runtime")
    return {
        name: {m for m in imported_modules(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_runtime_import_graph_has_no_cycle():
    graph = runtime_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_detector_path_and_tensorrt_never_import_watch_or_evaluation():
    leaves = ("pcedge.runtime.watch", "pcedge.runtime.evaluation")
    offenders = [
        f"{name} imports {target}"
        for name, targets in runtime_graph().items()
        if not name.startswith(leaves) and name != "pcedge.runtime"  # the package's lazy public API may name them
        for target in targets
        if target.startswith(leaves)
    ]
    assert not offenders, "\n".join(offenders)


def test_watch_and_evaluation_do_not_import_each_other():
    graph = runtime_graph()
    pairs = (("pcedge.runtime.watch", "pcedge.runtime.evaluation"), ("pcedge.runtime.evaluation", "pcedge.runtime.watch"))
    offenders = [f"{name} imports {target}" for a, b in pairs for name, targets in graph.items()
                 if name.startswith(a) for target in targets if target.startswith(b)]
    assert not offenders, "\n".join(offenders)


def test_every_runtime_module_and_the_public_api_import_without_torch_or_export():
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import pcedge.runtime as runtime
        names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "pcedge.runtime.")]
        for name in names:
            importlib.import_module(name)
        public = [getattr(runtime, name) for name in runtime.__all__]
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")
                        or m.startswith(("pcedge.export", "pcedge.commands")) or m == "pcedge.cli")
        print(len(names), len(public), leaked)
        sys.exit(1 if leaked or len(names) < 25 or len(public) < 20 else 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_public_api_names_are_the_defining_modules_objects():
    import importlib

    import pcedge.runtime as runtime

    for name, module in runtime._EXPORTS.items():
        defining = importlib.import_module(f"pcedge.runtime.{module}")
        assert getattr(runtime, name) is getattr(defining, name), name
    assert set(runtime.__all__) <= set(dir(runtime))


def test_every_command_module_is_thin_and_lives_with_the_composition_root():
    from pcedge.cli import COMMANDS

    verbs = [verb for verb, _ in COMMANDS]
    assert verbs == ["export", "info", "predict", "verify", "eval", "bench", "build-engine", "sign", "pack", "unpack", "watch",
                     "triton", "serve"]
    for verb, module_name in COMMANDS:
        assert module_name.startswith("pcedge.commands."), module_name
        path = module_files("pcedge")[module_name]
        source = path.read_text()
        tree = ast.parse(source)
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= functions, module_name
        # Thin: no classes of their own (dataclasses and logic belong to the library).
        assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)], module_name


def test_serving_is_a_leaf_beside_watch():
    """``serving/`` uses the detector path and nothing imports it back; it never imports watch/ or evaluation/."""
    serving = "pcedge.runtime.serving"
    others = ("pcedge.runtime.watch", "pcedge.runtime.evaluation")
    graph = runtime_graph()
    offenders = [f"{name} imports {target}" for name, targets in graph.items() for target in targets
                 if (not name.startswith(serving) and name != "pcedge.runtime" and target.startswith(serving))
                 or (name.startswith(serving) and target.startswith(others))]
    assert not offenders, "\n".join(offenders)


def test_triton_python_models_import_only_the_runtime():
    """What a Triton Python-backend stub loads: the generated model.py and the classes it names use
    pcedge.runtime, numpy, the standard library and the backend's own utils -- no torch, no argparse."""
    from pcedge.runtime.serving import repository

    allowed_top = {"json", "sys", "pathlib", "numpy", "triton_python_backend_utils", "__future__"}
    for role, cls in (("embedder", "EmbedderModel"), ("scorer", "ScorerModel")):
        source = repository._model_py(role, cls, "demo")
        tree = ast.parse(source)
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert imported == ["pcedge.runtime.serving.python_models"], imported
    path = ROOT / "runtime" / "serving" / "python_models.py"
    for imported in imported_modules("pcedge.runtime.serving.python_models", path):
        assert imported.startswith("pcedge.runtime.") or imported.split(".")[0] in allowed_top, imported
