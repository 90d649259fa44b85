"""Waiting until a SIGSTOPped process really is stopped: the signal is delivered asynchronously, and a test that
means to meet a stopped party must not race it."""

from __future__ import annotations

import os
import time


def wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until every thread of process `pid` is stopped (state T in /proc); bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {timeout_s} s")
