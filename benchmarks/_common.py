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
    "ratio_spread",
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


def ratio_spread(samples_a: list[float], samples_b: list[float]) -> dict[str, Any]:
    """Paired ratios a[i] / b[i] of interleaved rounds (round i measured a and b back to back): median, min, max,
    the per-round ratios, and a two-sided sign test against 1 (no change). within_noise: p >= 0.05, i.e. the rounds
    do not fall on one side of 1 often enough to call the difference real (7 of 7, or 8 of 9, rounds are needed)."""
    if len(samples_a) != len(samples_b) or not samples_a:
        raise ValueError(f"ratio_spread: got {len(samples_a)} and {len(samples_b)} samples: expected the same "
                         "number (>= 1), one pair per round")
    ratios = [a / b for a, b in zip(samples_a, samples_b)]
    below = sum(r < 1.0 for r in ratios)
    above = sum(r > 1.0 for r in ratios)
    n = below + above  # ties carry no sign
    k = max(below, above)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n) if n else 1.0
    ordered = sorted(ratios)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"median": median, "min": ordered[0], "max": ordered[-1], "rounds": len(ratios), "ratios": ratios,
            "rounds_below_1": below, "sign_test_p": p, "within_noise": p >= 0.05}
