"""The package's layers: imports point down only (docs/architecture.md).

Two checks: a static walk over every module's import statements (top-level and inside functions), and a fresh
interpreter importing the model, which must not load the transport, the runtime, the scheduler, the simulator,
Ray or gRPC.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moe_runtime"

# the top layer: commands and entry points, imported by nothing inside the package's folders
TOP = ("moe_runtime.cli", "moe_runtime.demo", "moe_runtime.inference", "moe_runtime.serving", "moe_runtime.ops_cli",
       "moe_runtime.generate_command", "moe_runtime.scale_cli", "moe_runtime.plots")
# folder -> module prefixes it must not import (besides TOP)
FORBIDDEN = {
    "model": ("moe_runtime.dispatch", "moe_runtime.runtime", "moe_runtime.scheduler", "moe_runtime.sim", "ray", "grpc"),
    "dispatch": ("moe_runtime.runtime", "moe_runtime.scheduler", "moe_runtime.sim", "ray"),
    "scheduler": ("moe_runtime.runtime", "moe_runtime.sim", "moe_runtime.dispatch", "ray", "grpc"),
    "sim": ("moe_runtime.runtime",),
    "generation": ("moe_runtime.dispatch", "moe_runtime.runtime", "moe_runtime.scheduler", "moe_runtime.sim", "ray",
                   "grpc"),
    "checkpoint": ("moe_runtime.dispatch", "moe_runtime.runtime", "moe_runtime.scheduler", "moe_runtime.sim", "ray",
                   "grpc"),
}
BOTTOM = ("config.py", "placement.py", "records.py", "malloc.py")  # plain data: no torch, no transport, no other layer
BOTTOM_FORBIDDEN = ("moe_runtime.model", "moe_runtime.dispatch", "moe_runtime.runtime", "moe_runtime.scheduler",
                    "moe_runtime.sim", "torch", "ray", "grpc")


def imported_modules(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> set[str]:
    """Absolute module names imported anywhere in the file (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mods.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                mods.add(node.module)
    return mods


def _violations(files: list[pathlib.Path], banned: tuple[str, ...], root: pathlib.Path = PACKAGE.parent) -> list[str]:
    out = []
    for f in files:
        for m in sorted(imported_modules(f, root)):
            if any(m == b or m.startswith(b + ".") for b in banned):
                out.append(f"{f.relative_to(root)} imports {m}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_point_down(folder: str) -> None:
    files = [f for f in sorted((PACKAGE / folder).rglob("*.py")) if "proto" not in f.parts]
    assert files, f"no modules under moe_runtime/{folder}"
    assert _violations(files, FORBIDDEN[folder] + TOP) == []


def test_bottom_layer_is_plain_data() -> None:
    files = [PACKAGE / name for name in BOTTOM if (PACKAGE / name).exists()]
    assert _violations(files, BOTTOM_FORBIDDEN) == []


def test_the_walk_sees_a_violation(tmp_path: pathlib.Path) -> None:
    # the check itself can fail: a module importing upward is reported, a function-level import too
    bad = tmp_path / "moe_runtime" / "model" / "probe.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from . import experts\ndef f():\n    from ..runtime import cluster\n    import ray\n")
    found = _violations([bad], FORBIDDEN["model"], root=tmp_path)
    assert found == ["moe_runtime/model/probe.py imports moe_runtime.runtime",
                     "moe_runtime/model/probe.py imports ray"]


def test_importing_the_model_loads_no_transport_runtime_or_ray() -> None:
    code = (
        "import json, sys\n"
        "import moe_runtime.model.transformer\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc')\n"
        "      or m.startswith(('moe_runtime.dispatch', 'moe_runtime.runtime', 'moe_runtime.scheduler',\n"
        "                       'moe_runtime.sim')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
