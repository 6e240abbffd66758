"""Every figure the package draws: label colours, overlay panels with a legend, Dice by
structure, the evaluation's Dice box plot and the comparison's curves.

NumPy and matplotlib only (no TensorFlow); TensorBoard images, reports and the notebook use
the same functions so a structure has the same colour everywhere. Figures are built as
``matplotlib.figure.Figure`` objects on their own Agg canvas, never through pyplot: no
global backend is set, no figure is registered with pyplot (nothing to close, nothing
leaks), and no display is needed. In a notebook a returned figure shows with
``display(fig)`` (or as a cell's last value).
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

__all__ = ["label_colours", "overlay_panel", "overlay_figure", "dice_by_structure_figure",
           "figure_png", "dice_boxplot_png", "convergence_png", "arm_dice_png"]


def _figure(figsize):
    """A figure on its own Agg canvas (see the module docstring: no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


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
    from matplotlib.patches import Patch

    n = len(label_names)
    colours = label_colours(n)
    fig = _figure((9, 3.1 * len(axes)))
    rows = fig.subplots(len(axes), 1, squeeze=False)
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
    order = list(range(len(names)))
    if fractions is not None:
        order.sort(key=lambda i: fractions[i])
    fig = _figure((6.5, 0.28 * len(names) + 1.2))
    ax = fig.subplots()
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
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def dice_boxplot_png(structures: Sequence[dict], rows: Sequence[dict]) -> bytes:
    """The evaluation's Dice spread per structure (``dice_boxplot.png``): one box per
    structure summary in ``structures`` (in their order), from the per-case ``rows``."""
    names = [str(row["name"]) for row in structures]
    values = [[r["dice"] for r in rows if r["label"] == row["label"]] for row in structures]
    fig = _figure((max(6.0, 0.45 * len(names) + 2.0), 4.5))
    ax = fig.subplots()
    ax.boxplot(values)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per structure (sorted by size, smallest first)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def convergence_png(curves: dict) -> bytes:
    """Validation mean Dice against the epoch, one line per arm (mean over splits, the
    min–max band shaded): ``curves`` maps an arm to ``(epochs, [curve per split])``."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    for arm, (epochs, stack) in curves.items():
        stack = np.asarray(stack, float)
        line, = ax.plot(epochs, stack.mean(0), label=arm)
        if len(stack) > 1:
            ax.fill_between(epochs, stack.min(0), stack.max(0), color=line.get_color(),
                            alpha=0.15, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation mean Dice (inference mode)")
    _finish(ax)
    return figure_png(fig)


def arm_dice_png(structures: Sequence[str], dice_by_arm: dict) -> bytes:
    """Mean test Dice per structure (in the given order), one line per arm."""
    fig = _figure((max(7, 0.45 * len(structures) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(structures))
    for arm, values in dice_by_arm.items():
        ax.plot(x, values, marker="o", label=arm)
    ax.set_xticks(x)
    ax.set_xticklabels(list(structures), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean Dice (test)")
    ax.set_xlabel("structure (largest to smallest)")
    _finish(ax)
    return figure_png(fig)


def _finish(ax) -> None:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_ylim(0, 1)
    ax.figure.tight_layout()
