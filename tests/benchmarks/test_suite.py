"""benchmarks/_suite.py (`make bench`): it runs what the Makefile's glob names, each benchmark as its script would
run (same JSON file and line), restores what a benchmark changes, names an unknown --only, and stops on a failure
with that benchmark's exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from benchmarks import _suite as suite
from benchmarks._common import ROOT


def test_names_are_the_makefiles_glob():
    names = suite.benchmark_names()
    want = sorted(p[: -len(".py")] for p in os.listdir(ROOT / "benchmarks") if p.endswith(".py")
                  and not p.startswith("_"))  # fmt: skip
    assert sorted(names) == want and len(set(names)) == len(names) and "step" in names and "_suite" not in names
    assert "benchmarks/_suite.py" in (ROOT / "Makefile").read_text()


def test_a_benchmark_runs_as_its_script_and_what_it_changed_is_put_back(tmp_path, monkeypatch):
    import types

    seen = {}

    def main():
        seen["argv"] = list(sys.argv)
        torch.set_num_threads(1)
        os.environ["SUITE_TEST_LEAK"] = "1"
        os.chdir(tmp_path)
        raise SystemExit(3)

    monkeypatch.setitem(sys.modules, "benchmarks.fake_bench", types.SimpleNamespace(main=main))
    threads, cwd = torch.get_num_threads(), os.getcwd()
    assert suite._run_one("fake_bench", ["--quick"]) == 3  # its exit status
    assert seen["argv"][0].endswith("benchmarks/fake_bench.py") and seen["argv"][1:] == ["--quick"]
    assert torch.get_num_threads() == threads and os.getcwd() == cwd and "SUITE_TEST_LEAK" not in os.environ


def test_unknown_only_is_named():
    out = subprocess.run([sys.executable, "benchmarks/_suite.py", "--only", "step,nosuch"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "no benchmark named nosuch" in out.stderr


def test_one_benchmark_through_the_suite(tmp_path):
    suite_json = tmp_path / "suite.json"
    out = subprocess.run([sys.executable, "benchmarks/_suite.py", "--quick", "--json", "--only", "rebalance",
                          "--out", str(suite_json)], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["bench"] == "rebalance" and line["quick"] is True
    assert json.loads((ROOT / "runs" / "bench" / "rebalance.json").read_text()) == line
    rec = json.loads(suite_json.read_text())
    assert list(rec["benchmarks"]) == ["rebalance"] and rec["failed"] is None and rec["total_s"] > 0
