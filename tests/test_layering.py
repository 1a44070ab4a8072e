"""The core never imports ray or ffcv: statically (imports in the source) and at run time. The
one module of atcd_ray.data that reads FFCV files (``data/ffcv_batches.py``) is imported only
when a run sets data.ffcv_dir. No module of the package imports itself back through others."""
import ast
import subprocess
import sys
from pathlib import Path

import atcd_ray

PACKAGE = Path(atcd_ray.__file__).parent
PURE = [PACKAGE / "core", PACKAGE / "data"]
FORBIDDEN = {"ray", "ffcv"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


FFCV_ADAPTER = PACKAGE / "data" / "ffcv_batches.py"


def test_core_sources_import_neither_ray_nor_ffcv():
    files = [f for d in PURE for f in d.rglob("*.py") if f != FFCV_ADAPTER]
    assert len(files) >= 10
    for f in files:
        assert not imported_roots(f) & FORBIDDEN, f


def test_local_training_path_loads_neither_ray_nor_ffcv():
    code = ("import sys, atcd_ray, atcd_ray.core.engine, atcd_ray.core.methods, atcd_ray.trainer, atcd_ray.train, "
            "atcd_ray.evaluate; bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'ffcv')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _module(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST):
    """Import nodes anywhere (also inside functions), except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = {_module(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, path + [nxt])

    seen: set[str] = set()
    for start in sorted(graph):
        if start not in seen:
            seen.add(start)
            visit(start, [start])
    return found


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_cycle_check_finds_one(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("def f():\n    from ..other import g\n")
    (package / "other.py").write_text("from .sub import f\nfrom typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from . import sub\n")
    (package / "quiet.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import other\n")
    graph = import_graph(package)
    assert graph["pkg.quiet"] == set()  # TYPE_CHECKING imports do not count
    assert cycles(graph) == [["pkg.other", "pkg.sub", "pkg.other"]]
