"""Figures of segmentations: label colours, overlay panels with a legend, Dice by structure.

NumPy and matplotlib only (no TensorFlow); TensorBoard images, reports and the notebook use
the same functions so a structure has the same colour everywhere.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

__all__ = ["label_colours", "overlay_panel", "overlay_figure", "dice_by_structure_figure",
           "figure_png"]


def label_colours(num_classes: int) -> np.ndarray:
    """An RGB colour per label (0 = black), from matplotlib's tab20 cycle."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colours = np.array([cmap(i % 20)[:3] for i in range(num_classes)], np.float32)
    colours[0] = 0.0
    return colours


def overlay_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  num_classes: int, axis: int, alpha: float = 0.5,
                  index: Optional[int] = None) -> np.ndarray:
    """One slice along ``axis``: [image | truth overlay | prediction overlay], RGB in [0, 1].

    Args:
        image: ``[D, H, W, C]`` (channel 0 is shown, windowed to its 1st-99th percentile).
        truth, pred: integer labels ``[D, H, W]``.
        num_classes: labels, background included (fixes the colours).
        axis: spatial axis the slice is normal to.
        alpha: opacity of the label colours.
        index: slice index (default: the middle one).
    """
    mid = image.shape[axis] // 2 if index is None else int(index)
    img = np.take(image[..., 0], mid, axis=axis)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, -1)
    colours = label_colours(num_classes)

    def blend(labels):
        lab = np.take(labels, mid, axis=axis)
        out = grey.copy()
        mask = lab > 0
        out[mask] = (1 - alpha) * grey[mask] + alpha * colours[lab[mask]]
        return out

    return np.concatenate([grey, blend(truth), blend(pred)], axis=1)


def overlay_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                   label_names: Sequence[str], title: str = "", axes=(0, 1, 2)):
    """A matplotlib figure: one row per axis of [image | truth | prediction], with a legend
    of the structures present in the truth or the prediction."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(label_names)
    colours = label_colours(n)
    fig, rows = plt.subplots(len(axes), 1, figsize=(9, 3.1 * len(axes)), squeeze=False)
    for row, axis in zip(rows[:, 0], axes):
        row.imshow(overlay_panel(image, truth, pred, n, axis), interpolation="nearest")
        row.set_axis_off()
        row.set_title(f"axis {axis}: image | ground truth | prediction", fontsize=9)
    present = sorted(set(np.unique(truth)) | set(np.unique(pred)) - {0})
    handles = [Patch(color=colours[k], label=label_names[k]) for k in present if 0 < k < n]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return fig


def dice_by_structure_figure(names: Sequence[str], dice: Sequence[float],
                             fractions: Optional[Sequence[float]] = None, title: str = ""):
    """Horizontal bars of Dice per structure (largest structure at the top when
    ``fractions`` — the structures' volume fractions — are given)."""
    import matplotlib.pyplot as plt

    order = list(range(len(names)))
    if fractions is not None:
        order.sort(key=lambda i: fractions[i])
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(names) + 1.2))
    y = np.arange(len(order))
    ax.barh(y, [dice[i] for i in order], color="tab:blue")
    labels = [names[i] if fractions is None else f"{names[i]} ({100 * fractions[i]:.2f}%)"
              for i in order]
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (then closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
