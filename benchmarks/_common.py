"""Helpers shared by benchmarks/*.py: the common arguments, runs/bench/<name>.json, the stderr console.

Every benchmark takes ``--quick`` (a reduced run, < 60 s on this machine), ``--json`` (stdout gets only the
JSON line; tables stay on stderr) and ``--out`` (default runs/bench/<name>.json), writes its result there and
prints the same object as the last line of stdout. Modules named ``_*.py`` (this one) are helpers, not
benchmarks: ``make bench`` runs the others.

Use from a benchmark run as a script (``python benchmarks/x.py``) or imported from tests::

    ROOT = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import emit, make_parser, stderr_console
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "runs" / "bench"

__all__ = [
    "BENCH_DIR",
    "ROOT",
    "emit",
    "float_list",
    "int_list",
    "jsonable",
    "make_parser",
    "stderr_console",
    "write_result",
]


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with --quick, --json and --out (default runs/bench/<name>.json) already added."""
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a reduced run (< 60 s on this machine)")
    p.add_argument(
        "--json",
        action="store_true",
        help="stdout gets only the JSON line (the readable tables stay on stderr)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / f"{name}.json",
        help=f"result file (default runs/bench/{name}.json)",
    )
    return p


def float_list(text: str) -> list[float]:
    """argparse type for a comma-separated list of floats: "1.0,1.2" -> [1.0, 1.2]."""
    return [float(x) for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    """argparse type for a comma-separated list of ints: "8,16" -> [8, 16]."""
    return [int(x) for x in text.split(",") if x.strip()]


def stderr_console(width: int | None = None):
    """A rich Console on stderr (tables must not mix with the JSON line on stdout)."""
    from rich.console import Console

    return Console(stderr=True, width=width)


def jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars / arrays, tuples, Paths made JSON-friendly; NaN and Inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_result(result: Mapping[str, Any], out: str | Path) -> Path:
    """Write `result` as indented JSON to `out` (parents created; atomic replace). Returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(result), indent=1) + "\n")
    tmp.replace(out)
    return out


def emit(result: Mapping[str, Any], out: str | Path) -> str:
    """Write `result` to `out` and print it as one JSON line, the last line of stdout. Returns that line."""
    write_result(result, out)
    line = json.dumps(jsonable(result))
    sys.stdout.flush()
    print(line, flush=True)
    return line
