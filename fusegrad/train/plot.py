"""The loss curve as a PNG (matplotlib, no display needed)."""
from __future__ import annotations

import os

from fusegrad.core.fileio import atomic_write


def plot_losses(history: dict, path) -> str:
    """history: step, loss (train, per step), val_step, val_loss -> writes `path`, returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(history["step"], history["loss"], lw=1, alpha=0.8, label="train")
    if history.get("val_step"):
        ax.plot(history["val_step"], history["val_loss"], "o-", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("fusegrad training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return os.fspath(path)
