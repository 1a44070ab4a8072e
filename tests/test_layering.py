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


# What a training process imports before its first step: neither scikit-learn (2 s; the digits are
# read from its CSV file) nor torch._inductor (2.5 s; torch.use_deterministic_algorithms imports
# it). Every Ray worker and every test's run starts this way.
STARTUP = ("import sys, torch; from atcd_ray.factories import seed_everything; from atcd_ray.data import build_splits; "
           "seed_everything(0, torch.device('cpu')); build_splits('digits', data_dir=None, batch_size=64, val_size=197, "
           "subset=None, eval_n=None, val_n=None, seed=0); {extra}"
           "heavy = [m for m in ('sklearn', 'torch._inductor') if m in sys.modules]; print(heavy)")


def _heavy_imports_at_startup(extra: str = "") -> str:
    return subprocess.run([sys.executable, "-c", STARTUP.format(extra=extra)], check=True, timeout=120,
                          capture_output=True, text=True).stdout.strip()


def test_a_training_process_starts_without_scikit_learn_or_torch_inductor():
    assert _heavy_imports_at_startup() == "[]"
    # Positive control: the check sees the import the start-up avoids.
    assert _heavy_imports_at_startup("torch.use_deterministic_algorithms(True, warn_only=True); ") == "['torch._inductor']"


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


# The layers, bottom up: a module may import its own layer and those below it, never one above.
# Entry modules (python -m atcd_ray.X) sit on the run layer and do not import one another.
LAYERS = [
    ("core", lambda m: m.startswith("atcd_ray.core")),
    ("data", lambda m: m == "atcd_ray.data" or m.startswith("atcd_ray.data.")),
    ("config", lambda m: m in ("atcd_ray.config", "atcd_ray.cli", "atcd_ray.storage", "atcd_ray.provenance")),
    ("run", lambda m: m in ("atcd_ray", *(f"atcd_ray.{n}" for n in RUN_LAYER))),
    ("entry", lambda m: m in (f"atcd_ray.{n}" for n in ENTRY_MODULES)),
]
RUN_LAYER = ("board", "factories", "group", "run_dir", "resume", "validation", "trainer", "distributed", "search_space",
             "sweep", "budget", "figures")
ENTRY_MODULES = ("train", "tune", "study", "report", "evaluate", "trajectory_shift", "write_ffcv")


def layer_of(module: str) -> int:
    (index,) = [i for i, (_, member) in enumerate(LAYERS) if member(module)]
    return index


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        for target in targets:
            if layer_of(target) > layer_of(module) or (layer_of(module) == layer_of(target) == len(LAYERS) - 1):
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_every_module_has_a_layer_and_imports_none_above_it():
    graph = import_graph(PACKAGE)
    for module in graph:
        layer_of(module)  # exactly one layer each: a new module must be placed
    assert layer_violations(graph) == []


def test_the_layer_check_finds_an_import_upwards_and_one_between_entry_modules():
    graph = {"atcd_ray.core.engine": {"atcd_ray.trainer"}, "atcd_ray.report": {"atcd_ray.study"},
             "atcd_ray.trainer": {"atcd_ray.core.engine"}, "atcd_ray.study": set()}
    assert layer_violations(graph) == ["atcd_ray.core.engine -> atcd_ray.trainer",
                                       "atcd_ray.report -> atcd_ray.study"]


# No call passes more than four positional arguments to a function of the project (the rest by
# keyword): checked on the sources of the package, the tests, the benchmarks and the scripts.
MAX_POSITIONAL = 4
ROOT = PACKAGE.parent


def _project_functions() -> dict[tuple[str, str], ast.arguments]:
    """(module, name) -> arguments of each function and class (its __init__, or a dataclass's
    fields) of atcd_ray."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module(path, PACKAGE)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                found[(module, node.name)] = node.args
            elif isinstance(node, ast.ClassDef):
                init = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
                if init:
                    found[(module, node.name)] = init[0].args
                elif any("dataclass" in ast.unparse(d) for d in node.decorator_list):  # its fields, in order
                    found[(module, node.name)] = ast.arguments(
                        posonlyargs=[], args=[ast.arg(f.target.id) for f in node.body if isinstance(f, ast.AnnAssign)],
                        vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
    return found


def _names_in_scope(path: Path, tree: ast.Module) -> dict[str, tuple]:
    """Local name -> ("function", module, name) for project functions imported or defined here,
    or ("module", module) for project modules imported here."""
    own = _module(path, PACKAGE) if path.is_relative_to(PACKAGE) else None
    names = {node.name: ("function", own, node.name) for node in tree.body
             if own and isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level and own is None:  # a test's own helpers (from .test_x import ...)
                continue
            if node.level:
                base = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
                module = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "atcd_ray":
                continue
            for alias in node.names:
                names[alias.asname or alias.name] = ("function", module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("atcd_ray") and alias.asname:
                    names[alias.asname] = ("module", alias.name)
    return names


def positional_violations(paths: list[Path]) -> list[str]:
    functions = _project_functions()
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        names = _names_in_scope(path, tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            target = None
            if isinstance(node.func, ast.Name) and names.get(node.func.id, ("",))[0] == "function":
                _, module, name = names[node.func.id]
                target = (module, name)
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                entry = names.get(node.func.value.id)
                if entry and entry[0] == "module":
                    target = (entry[1], node.func.attr)
                elif entry and entry[0] == "function":  # `from atcd_ray import trainer`: a module
                    target = (f"{entry[1]}.{entry[2]}", node.func.attr)
            args = functions.get(target) if target else None
            if args is None or args.vararg is not None:  # *names: a list, not positions
                continue
            if len(node.args) > MAX_POSITIONAL:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{where}:{node.lineno}: {target[1]} gets {len(node.args)} positionals")
    return found


def test_no_call_passes_more_than_four_positional_arguments_to_a_project_function():
    paths = [p for folder in ("atcd_ray", "tests", "benchmarks", "scripts") for p in (ROOT / folder).rglob("*.py")]
    assert len(paths) > 60
    assert positional_violations(paths) == []


def test_the_positional_check_finds_a_long_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from atcd_ray.data import build_test_split\nfrom atcd_ray.core import attacks\n"
                   "build_test_split('digits', None, 64, None, 0)\nattacks.pgd(1, 2, 3, 4, 5)\n"
                   "attacks.pgd(1, 2, 3, 4, alpha=5)\n")
    found = positional_violations([bad])
    assert len(found) == 2 and "build_test_split gets 5" in found[0] and "pgd gets 5" in found[1]
