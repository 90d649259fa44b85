"""Config used by every runtime test (tiny model, small batch, a capped corpus)."""

from __future__ import annotations

from pathlib import Path

from moe_runtime.config import RuntimeConfig, parse_config

SESSION_GPUS = 6  # the session Ray: a 4-actor cluster and a 2-actor cluster can coexist
ORACLE_STEPS = 6


def make_config(tmp: Path, train: dict | None = None, **cluster) -> RuntimeConfig:
    """The runtime tests' config; `train` overrides train fields, keyword arguments cluster fields."""
    return parse_config({
        "model": {"preset": "tiny"},
        "data": {"max_files": 40},
        "train": {"steps": ORACLE_STEPS, "batch_size": 8, "seq_len": 32, "micro_batches": 2, "warmup_steps": 2,
                  "checkpoint_every": 2, "checkpoint_dir": str(tmp / "auto"), **(train or {})},
        "cluster": {"num_gpus": SESSION_GPUS, "expert_actors": 4, "router_workers": 2, **cluster},
    })  # fmt: skip


def only_on(cluster, actor: int) -> list[list[int]]:
    """[layer, expert] pairs whose only replica is `actor` (computed here, independently of the runtime's mask)."""
    return [[layer, e] for layer, row in enumerate(cluster.placement.replicas) for e, actors in enumerate(row)
            if tuple(actors) == (actor,)]  # fmt: skip


def oracle_losses(cfg: RuntimeConfig, steps: int) -> list[float]:
    """The in-process oracle's first `steps` losses for `cfg` (one torch thread, as the parties run)."""
    import torch

    from moe_runtime.training import InProcessTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = InProcessTrainer(cfg)
        return [tr.train_step(s)[0] for s in range(steps)]
    finally:
        torch.set_num_threads(threads)
