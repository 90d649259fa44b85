"""PNG figures for runs: loss curve, expert load per layer x expert, load per actor. matplotlib, headless."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(losses: Sequence[float], expert_load: Sequence[Sequence[float]], path: str | Path,
                  title: str = "", val_loss: float | None = None) -> Path:
    """Left: loss per step. Right: token copies per (layer, expert) as a heatmap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(range(1, len(losses) + 1), losses, label="train (lm)")
    if val_loss is not None:
        ax_loss.axhline(val_loss, color="tab:orange", linestyle="--", label=f"val {val_loss:.3f}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats / byte)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    load_heatmap(ax_load, expert_load, "expert load (token copies)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_heatmap(ax, load: Sequence[Sequence[float]], title: str, xlabel: str = "expert") -> None:
    rows, cols = len(load), len(load[0]) if len(load) else 0
    if not any(v for row in load for v in row):  # an all-zero heatmap would draw a -0.1..0.1 colour bar: say it
        ax.text(0.5, 0.5, "no tokens served yet\n(train or forward first)", ha="center", va="center",
                transform=ax.transAxes, fontsize=11, color="0.35")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.set_title(title)
        return
    im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_yticks(range(rows))
    ax.set_xticks(range(cols) if cols <= 32 else range(0, cols, max(1, cols // 16)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, label="token copies")


def plot_load(expert_load: Sequence[Sequence[float]], actor_load: Sequence[Sequence[float]], path: str | Path,
              title: str = "") -> Path:
    """Load per layer x expert and per layer x actor, side by side (`moe-runtime status --heatmap`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    load_heatmap(a, expert_load, "tokens per expert")
    load_heatmap(b, actor_load, "tokens per actor", xlabel="actor")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steps(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """A run's per-step JSONL (`train`): loss, lr, grad norm, step time, per-actor imbalance; a dotted line at every
    step after which the scheduler rebalanced (`moe-runtime plot`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    panels = [("loss", "cross-entropy (nats / token)"), ("lr", "learning rate"), ("grad_norm", "grad norm"),
              ("step_s", "step time (s)"), ("imbalance", "max / mean tokens per actor")]
    panels = [(k, label) for k, label in panels if any(r.get(k) is not None for r in records)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels) + 0.6), sharex=True, squeeze=False)
    rebalanced = [r["step"] for r in records if r.get("rebalanced")]
    for ax, (key, label) in zip(axes[:, 0], panels):
        xs = [s for s, r in zip(steps, records) if r.get(key) is not None]
        ax.plot(xs, [r[key] for r in records if r.get(key) is not None], marker="." if len(xs) < 60 else None)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for s in rebalanced:
            ax.axvline(s, color="tab:red", linestyle=":", linewidth=1)
        if key == "imbalance":
            ax.axhline(1.0, color="0.5", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[-1, 0].set_xlabel("step" + (" (red dotted: rebalanced after this step)" if rebalanced else ""))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
