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
    im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    rows, cols = len(load), len(load[0]) if len(load) else 0
    ax.set_yticks(range(rows))
    ax.set_xticks(range(cols) if cols <= 32 else range(0, cols, max(1, cols // 16)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax)


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
