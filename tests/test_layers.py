"""The package's layers, read from the source with ``ast`` (every import statement, module level or
inside a function, counts):

- ``kernels/`` (installed as ``rerule.kernels``) imports only the standard library, torch, triton
  and itself;
- nothing below the trainer (the loss API, ``rerule.refusal``, ``data``, ``eval`` and the parts in
  ``train/`` other than ``trainer.py``) imports the trainer, the demo, the integrations or the CLI;
- there is no import cycle inside rerule.
"""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("rerule.train.trainer", "rerule.demo", "rerule.integrations", "rerule.cli", "rerule.__main__")


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("rerule", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*(ROOT / "rerule").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    return {_module_name(p): p for p in files if "fixtures" not in p.parts}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module ``name`` imports (absolute names; ``from pkg import sub`` resolves to the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return out


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    return {name: _imports(name, path, modules) for name, path in sources.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_sources_are_found():
    graph = _graph()
    for name in ("rerule.train.trainer", "rerule.train.update", "rerule.demo.sweep", "rerule.refusal",
                 "rerule.kernels.triton_grpo", "rerule.integrations.trl_replay"):
        assert name in graph, name
    assert "rerule.train.update" in graph["rerule.train.trainer"]


def test_kernels_import_only_torch_triton_and_themselves():
    allowed = ("torch", "triton", "rerule.kernels")
    bad = {
        (name, dep)
        for name, deps in _graph().items()
        if _under(name, "rerule.kernels")
        for dep in deps
        if dep.split(".")[0] not in sys.stdlib_module_names and not any(_under(dep, a) for a in allowed)
    }
    assert not bad, sorted(bad)


def test_nothing_below_the_trainer_imports_the_layers_above():
    bad = {
        (name, dep)
        for name, deps in _graph().items()
        if _under(name, "rerule") and not any(_under(name, t) for t in TOP)
        for dep in deps
        if any(_under(dep, t) for t in TOP)
    }
    assert not bad, sorted(bad)


def test_no_import_cycles_inside_rerule():
    graph = _graph()
    inner = {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}
    try:
        list(graphlib.TopologicalSorter(inner).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_the_layer_checks_can_fail(tmp_path):
    """The cycle check sees a cycle, and the import reader sees lazy and relative imports."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from . import b\n")
    b.write_text("import pkg.a\n")
    deps_a = _imports("pkg.a", a, {"pkg.a", "pkg.b"})
    deps_b = _imports("pkg.b", b, {"pkg.a", "pkg.b"})
    assert deps_a == {"pkg.b"} and deps_b == {"pkg.a"}
    try:
        list(graphlib.TopologicalSorter({"pkg.a": deps_a, "pkg.b": deps_b}).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("the cycle pkg.a <-> pkg.b was not detected")


def test_repository_root_on_sys_path_does_not_shadow_the_pypi_kernels_package():
    """``kernels/`` ships as rerule.kernels; with the checkout's root on sys.path (pytest, ``python -m``
    from the checkout) ``import kernels`` must still give the PyPI package of that name (Hugging Face's,
    which transformers >= 5 imports when it is installed), or fail as a missing package does."""
    import importlib.metadata
    import subprocess

    try:
        importlib.metadata.version("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import rerule.kernels.reference\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name); raise SystemExit\n"
        "print('file', kernels.__file__)\n"
        "import transformers.integrations.hub_kernels\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    if installed:
        assert out.stdout.startswith("file ") and str(ROOT / "kernels") not in out.stdout, out.stdout
    else:
        assert out.stdout.strip() == "missing kernels", out.stdout
