"""The pictures every evaluation writes to workdir/eval/ (PNG) and to TensorBoard.

* ROC curves, TAR against FAR on a log axis (the field's IJB figure);
* accuracy against probe resolution, one line per set and degraded side;
* error-versus-reject curves of the quality score;
* expert routing maps: per MoE layer, the first-choice expert of each patch position drawn over
  the average face, its opacity the share of faces that agree.
* the recognizability heads: predicted quality against face resolution, and the
  perceptibility attention map (mean weight per position) over the average face.

Each function saves a PNG and returns it as a uint8 (H, W, 3) array for
``writer.write_images``. Matplotlib runs headless (Agg), figures are closed after drawing.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch


def _save(fig, path: str) -> np.ndarray:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str) -> np.ndarray:
    """curves: {name: (fpr, tpr)}; FAR axis log-scaled from 1e-6 (or the smallest FAR seen)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    smallest = 1.0
    for name, (fpr, tpr) in curves.items():
        positive = fpr > 0
        if positive.any():
            smallest = min(smallest, float(fpr[positive].min()))
        ax.plot(np.maximum(fpr, 1e-7), tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlim(max(min(smallest, 1e-1), 1e-6), 1.0)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("ROC")
    return _save(fig, path)


def plot_resolution_curves(
    curves: dict[str, tuple[list[int], list[float]]], full_resolution: int, path: str
) -> np.ndarray:
    """curves: {label: (pixel sizes, accuracies)}; x is log2-spaced pixels."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (sizes, accuracies) in curves.items():
        order = np.argsort(sizes)
        ax.plot(np.asarray(sizes)[order], 100 * np.asarray(accuracies)[order], "o-", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({s for sizes, _ in curves.values() for s in sizes})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(f"face resolution (pixels; model input {full_resolution})")
    ax.set_ylabel("10-fold verification accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs resolution")
    return _save(fig, path)


def plot_error_versus_reject(curves: dict[str, dict], fmr: float, path: str) -> np.ndarray:
    """curves: {set name: `quality.error_versus_reject` result}."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, erc in curves.items():
        ax.plot(erc["reject_fraction"], erc["fnmr"], label=f"{name} (AUC {erc['auc']:.4f})")
    ax.set_xlabel("share of pairs rejected (lowest quality first)")
    ax.set_ylabel(f"FNMR at FMR={fmr:g}")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("error versus reject")
    return _save(fig, path)


def plot_routing_maps(
    mean_face: np.ndarray, shares: dict[str, np.ndarray], path: str
) -> np.ndarray:
    """One panel per MoE layer: first-choice expert per patch over the average face.

    shares: {layer name: (S, E) first-choice shares}; S must be a square (the token grid).
    """
    layers = {n: s for n, s in shares.items() if round(np.sqrt(s.shape[0])) ** 2 == s.shape[0]}
    if not layers:
        raise ValueError("no MoE layer with a square token grid to draw")
    num_experts = max(s.shape[1] for s in layers.values())
    colours = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")(np.arange(num_experts))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.6), squeeze=False)
    size = mean_face.shape[0]
    gray = np.asarray(mean_face, np.float64).mean(axis=-1) / 255.0
    for ax, (name, layer_shares) in zip(axes[0], layers.items()):
        grid = round(np.sqrt(layer_shares.shape[0]))
        expert = np.argmax(layer_shares, axis=1).reshape(grid, grid)
        agreement = np.max(layer_shares, axis=1).reshape(grid, grid)
        overlay = colours[expert][..., :3]
        # Opacity from chance (1/E) to certainty (1): positions without a preferred expert fade.
        chance = 1.0 / layer_shares.shape[1]
        alpha = np.clip((agreement - chance) / (1 - chance), 0, 1) * 0.75
        ax.imshow(gray, cmap="gray", extent=(0, size, size, 0), vmin=0, vmax=1)
        ax.imshow(np.dstack([overlay, alpha]), extent=(0, size, size, 0), interpolation="nearest")
        for row in range(grid):
            for col in range(grid):
                ax.text(
                    (col + 0.5) * size / grid,
                    (row + 0.5) * size / grid,
                    str(expert[row, col]),
                    ha="center",
                    va="center",
                    fontsize=max(4, 60 // grid),
                    color="white",
                )
        ax.set_title(name.replace("/router", ""), fontsize=8)
        ax.axis("off")
    handles = [Patch(color=colours[e], label=f"expert {e}") for e in range(num_experts)]
    fig.legend(handles=handles, loc="lower center", ncol=min(num_experts, 8), fontsize=7)
    fig.subplots_adjust(bottom=0.15)
    fig.suptitle("first-choice expert per patch (opacity: share of faces that agree)", fontsize=9)
    fig.savefig(path, dpi=100)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels


def plot_quality_vs_resolution(curve: dict, full_resolution: int, path: str) -> np.ndarray:
    """curve: {"pixels": [...], "mean": [...], "std": [...], "spearman_rho": r}."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar(curve["pixels"], curve["mean"], yerr=curve["std"], fmt="o-", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["pixels"], [str(p) for p in curve["pixels"]])
    ax.set_xlabel(f"face resolution (pixels; model input {full_resolution})")
    ax.set_ylabel("predicted quality (mean ± std over faces)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"quality head vs resolution (Spearman rho {curve['spearman_rho']:.3f})")
    return _save(fig, path)


def plot_attention_map(mean_face: np.ndarray, weights: np.ndarray, path: str) -> np.ndarray:
    """weights: (S,) mean attention per position, S a square (the token grid or feature map);
    drawn as a heat map over the average face, in multiples of the uniform weight 1/S."""
    grid = round(np.sqrt(len(weights)))
    if grid * grid != len(weights):
        raise ValueError(f"{len(weights)} attention positions are not a square grid")
    size = mean_face.shape[0]
    relative = np.asarray(weights, np.float64).reshape(grid, grid) * len(weights)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(
        np.asarray(mean_face, np.float64).mean(axis=-1) / 255.0,
        cmap="gray",
        extent=(0, size, size, 0),
        vmin=0,
        vmax=1,
    )
    image = ax.imshow(
        relative, cmap="inferno", alpha=0.55, extent=(0, size, size, 0), interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label="weight x positions (1 = uniform)")
    ax.set_title("perceptibility attention over the average face", fontsize=9)
    ax.axis("off")
    return _save(fig, path)
