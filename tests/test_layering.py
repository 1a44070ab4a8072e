"""The core never imports ray or ffcv: statically (imports in the source) and at run time."""
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


def test_core_sources_import_neither_ray_nor_ffcv():
    files = [f for d in PURE for f in d.rglob("*.py")]
    assert len(files) >= 10
    for f in files:
        assert not imported_roots(f) & FORBIDDEN, f


def test_local_training_path_loads_neither_ray_nor_ffcv():
    code = ("import sys, atcd_ray, atcd_ray.core.engine, atcd_ray.core.methods, atcd_ray.trainer, atcd_ray.train, "
            "atcd_ray.evaluate; bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'ffcv')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
