"""One record per training step, for the terminal line and the run's JSONL file (`moe-runtime plot` reads it):
loss, lr, grad norm, step time and its phases, per-actor load imbalance and rebalance events."""

from __future__ import annotations

from typing import Any

from moe_runtime.training import lr_at

PHASES = ("forward_backward_s", "router_s", "dispatch_s", "expert_s", "combine_s", "grad_sync_s", "optimizer_s")


def imbalance(actor_tokens: list[int]) -> float | None:
    """max / mean token copies per actor (1.0 = perfectly even); None when nothing was served."""
    total = sum(actor_tokens)
    if not actor_tokens or total == 0:
        return None
    return max(actor_tokens) / (total / len(actor_tokens))


def step_record(cluster: Any, rep: Any) -> dict[str, Any]:
    """The record of one finished step on a Cluster (rep: step.StepReport)."""
    actor_tokens = cluster._actor_load(rep.expert_load)
    t = rep.timings
    sched = cluster.scheduler
    return {
        "step": rep.step,
        "loss": rep.loss,
        "aux_loss": rep.aux,
        "lr": lr_at(rep.step, cluster.cfg.train),
        "grad_norm": t.grad_norm,
        "step_s": t.step_s,
        "phases_s": {k: getattr(t, k) for k in PHASES},
        "actor_tokens": actor_tokens,
        "imbalance": imbalance(actor_tokens),
        "rebalances": sched.rebalances,  # cumulative: a step where it grew rebalanced after it
        "last_decision": sched.last_decision_str,
        "placement_version": cluster.placement.version,
    }


def in_process_record(step: int, loss: float, step_s: float, cfg: Any) -> dict[str, Any]:
    """What the in-process trainer knows of a step (no actors, so no imbalance)."""
    return {"step": step, "loss": loss, "lr": lr_at(step, cfg.train), "grad_norm": None, "step_s": step_s,
            "imbalance": None, "rebalances": 0}


def format_line(rec: dict[str, Any], rebalanced: bool) -> str:
    """`step 12  loss 3.456  lr 3.00e-04  grad 1.23  0.84 s  imbalance 1.12  REBALANCED (...)`."""
    parts = [f"step {rec['step']:>5}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}"]
    if rec.get("grad_norm") is not None:
        parts.append(f"grad {rec['grad_norm']:.3f}")
    parts.append(f"{rec['step_s']:.2f} s")
    if rec.get("imbalance") is not None:
        parts.append(f"imbalance {rec['imbalance']:.3f}")
    if rebalanced:
        parts.append(f"REBALANCED ({rec.get('last_decision') or 'placement changed'})")
    return "  ".join(parts)
