"""Figures of a run, written as PNG files with matplotlib's Agg backend (no display needed).

reconstructions(...)   validation samples, their corrupted inputs (denoising) and their
                       reconstructions, as an image grid
loss_curves(...)       train and validation loss per epoch
codes_2d(...)          the codes of the validation samples in 2-D (the first two principal
                       components when the code has more than two units), coloured by label
compare_bars(...)      one bar chart per metric of a comparison
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["codes_2d", "compare_bars", "loss_curves", "reconstructions"]

_DPI = 120


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)


def reconstructions(
    path: str,
    x: np.ndarray,
    x_hat: np.ndarray,
    image_shape: tuple[int, int] | None,
    x_tilde: np.ndarray | None = None,
) -> None:
    """Rows: input, [corrupted input,] reconstruction; one column per sample (at most 12).

    Samples that are not images are drawn as 1 x D strips."""
    count = min(12, x.shape[0])
    shape = image_shape or (1, x.shape[1])
    aspect = "equal" if image_shape else "auto"
    rows = [
        ("input", x),
        ("corrupted", x_tilde),
        ("reconstruction" if x_tilde is None else "reconstructed\nfrom corrupted", x_hat),
    ]
    rows = [(name, data) for name, data in rows if data is not None]
    fig, axes = plt.subplots(
        len(rows), count, figsize=(1.1 * count, 1.25 * len(rows)), squeeze=False
    )
    for r, (name, data) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(data[c].reshape(shape), cmap="gray_r", vmin=0.0, vmax=1.0, aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("validation samples and their reconstructions", fontsize=10)
    _save(fig, path)


def loss_curves(path: str, history: list[dict]) -> None:
    """Train loss, validation loss and validation MSE against the epoch (log scale)."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    ax.plot(epochs, [h["val_mse"] for h in history], label="validation MSE", linestyle="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("loss per epoch")
    _save(fig, path)


def codes_2d(path: str, codes: np.ndarray, labels: np.ndarray | None) -> None:
    """A scatter of the codes in 2-D, coloured by label when there are labels."""
    if codes.shape[1] > 2:
        centred = codes - codes.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points, axis = centred @ vt[:2].T, "principal component"
    elif codes.shape[1] == 2:
        points, axis = codes, "code unit"
    else:
        points, axis = np.concatenate([codes, np.zeros_like(codes)], 1), "code unit"
    fig, ax = plt.subplots(figsize=(6, 5))
    if labels is not None:
        classes = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, label in enumerate(classes):
            keep = labels == label
            ax.scatter(
                points[keep, 0], points[keep, 1], s=8, color=cmap(i % cmap.N), label=str(label)
            )
        ax.legend(title="label", markerscale=2, fontsize=8, loc="best")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=8)
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title("validation codes")
    _save(fig, path)


def compare_bars(
    path: str, rows: list[dict], metrics: list[tuple[str, str]], higher_is_better=("near_zero",)
) -> None:
    """One horizontal bar chart per (key, title) in metrics, with the values written on the bars;
    rows hold "model" and the keys. The best model of each chart is orange (the lowest value,
    or the highest for keys in higher_is_better)."""
    names = [row["model"] for row in rows]
    columns = 3
    grid_rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(4.2 * columns, (0.38 * len(rows) + 1.0) * grid_rows),
        squeeze=False,
    )  # fmt: skip
    for index, ax in enumerate(axes.flat):
        if index >= len(metrics):
            ax.set_visible(False)
            continue
        key, title = metrics[index]
        values = [float(row[key]) for row in rows]
        best = int(np.argmax(values) if key in higher_is_better else np.argmin(values))
        colors = ["tab:orange" if i == best else "tab:blue" for i in range(len(values))]
        ax.barh(names, values, color=colors)
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:.3g}", va="center", fontsize=7)
        ax.set_xlim(0, max(values) * 1.3 if max(values) > 0 else 1)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle("validation metrics (orange: best of each)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
