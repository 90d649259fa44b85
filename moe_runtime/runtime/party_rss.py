"""RSS of every process of a local cluster, sampled over time: is the memory of each party flat across steps?

Local mode only (the parties' /proc entries are on this machine). `party_pids` names the processes ("driver",
"actor i", "worker i"); `RssSeries.sample()` appends each one's VmRSS; `drift(first)` is each party's largest RSS
from sample `first` on minus its RSS at that sample (what accumulates after the warm-up).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process on this machine, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def party_pids(cluster: Any) -> dict[str, int]:
    """party name -> pid: the driver (this process), every expert actor and router worker."""
    pids = {"driver": os.getpid()}
    pids.update({f"actor {i.index}": i.pid for i in cluster.actor_infos})
    pids.update({f"worker {i}": pid for i, pid in enumerate(cluster.worker_pids)})
    return pids


@dataclass
class RssSeries:
    pids: dict[str, int]
    rss: dict[str, list[int]] = field(default_factory=dict)

    def sample(self) -> None:
        for party, pid in self.pids.items():
            self.rss.setdefault(party, []).append(proc_memory(pid)["VmRSS"])

    def peaks(self) -> dict[str, int]:
        return {party: proc_memory(pid)["VmHWM"] for party, pid in self.pids.items()}

    def drift(self, first: int) -> dict[str, int]:
        """party -> max(RSS[first:]) - RSS[first], bytes."""
        return {p: max(s[first:]) - s[first] for p, s in self.rss.items() if len(s) > first}


__all__ = ["RssSeries", "party_pids", "proc_memory"]
