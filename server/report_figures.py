"""The report's plots, drawn with matplotlib's object API on the Agg canvas.

Each function takes plain data (lists and arrays read from summary.json and the holdout
records) and returns PNG bytes. No pyplot: pyplot keeps global figure state and picks a GUI
backend, which a ServerApp thread must not do; `Figure.savefig` renders with Agg directly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

DPI = 100
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
COLOR_NAMES = ["blue", "red", "green", "purple", "orange", "brown", "pink", "cyan"]


def _figure(width: float = 6.4, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    # Fixed margins, not constrained/tight layout: those re-render the figure and doubled the
    # cost of a per-round refresh (docs/benchmarks.md, "Figures behind code comments").
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.88, wspace=0.3)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def metrics_figure(
    rounds: Sequence[int], series: dict[str, Sequence[float | None]], loss: Sequence[float | None]
) -> bytes:
    """Held-out metrics (0..1) per round on the left, held-out loss on the right."""
    fig = _figure(8.0, 3.2)
    left, right = fig.subplots(1, 2, width_ratios=(2, 1))
    for i, (name, values) in enumerate(series.items()):
        xs, ys = _scored(rounds, values)
        left.plot(xs, ys, "o-", ms=3, color=COLORS[i % len(COLORS)], label=name)
    left.set(xlabel="round", ylabel="held-out", ylim=(-0.02, 1.02), title="Held-out metrics")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    right.plot(*_scored(rounds, loss), "o-", ms=3, color="#444444")
    right.set(xlabel="round", title="Held-out loss")
    right.grid(alpha=0.3)
    _integer_ticks(left, right)
    return _png(fig)


def epsilon_figure(
    rounds: Sequence[int], per_site: dict[str, Sequence[float | None]], budget: float | None
) -> bytes:
    """Each hospital's epsilon spent in this run, per round, against the run's budget line."""
    fig = _figure(6.4, 3.2)
    ax = fig.subplots()
    for i, (site, values) in enumerate(sorted(per_site.items())):
        ax.plot(rounds, _nan(values), "o-", ms=3, color=COLORS[i % len(COLORS)], label=site)
    if budget is not None:
        ax.axhline(budget, ls="--", color="black", lw=1, label=f"budget ε = {budget:g}")
    ax.set(xlabel="round", ylabel="ε spent (run)", title="Privacy spent per hospital")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _integer_ticks(ax)
    return _png(fig)


def roc_figure(curves: list[dict]) -> bytes:
    """ROC curves ({label, fpr, tpr, point: (fpr, tpr) at the run's threshold}) with the
    operating point marked."""
    fig = _figure(4.0, 4.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    for i, c in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        ax.plot(c["fpr"], c["tpr"], color=color, label=c["label"])
        if c.get("point") is not None:
            ax.plot(*c["point"], "o", color=color, ms=7, mfc="white", mew=2)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (held-out)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    fig = _figure(3.8, 3.4)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        dark = v > matrix.max() / 2
        ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if dark else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.title.set_fontsize(9)
    return _png(fig)


def reliability_figure(bins: list[dict]) -> bytes:
    """Reliability diagram: per probability bin, observed positive rate vs mean confidence;
    one line per calibration ({label, confidence, observed, counts})."""
    fig = _figure(4.0, 4.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect")
    for i, b in enumerate(bins):
        ax.plot(b["confidence"], b["observed"], "o-", ms=4, color=COLORS[i], label=b["label"])
    ax.set(xlabel="predicted P(positive)", ylabel="observed positive rate")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title="Reliability (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def slices_figure(slices: list[dict], class_names: Sequence[str]) -> bytes:
    """Held-out slices ({case, image, truth, pred} 2D RAS arrays) with contours: true dashed,
    predicted solid, one colour per foreground class."""
    fig = _figure(3.0 * max(1, len(slices)), 3.3)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(slices))))
    for ax, s in zip(axes, slices, strict=False):
        ax.imshow(np.asarray(s["image"]).T, cmap="gray", origin="lower")
        for k in range(1, len(class_names)):
            color = COLORS[(k - 1) % len(COLORS)]
            for key, style in (("truth", "--"), ("pred", "-")):
                mask = (np.asarray(s[key]) == k).T.astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=color, linestyles=style, linewidths=1.2)
        ax.set_title(str(s["case"]), fontsize=8)
        ax.set_axis_off()
    names = ", ".join(
        f"{n}: {COLOR_NAMES[(k - 1) % len(COLORS)]}" for k, n in enumerate(class_names) if k
    )
    fig.suptitle(f"dashed = truth, solid = prediction ({names})", fontsize=8)
    return _png(fig)


def _scored(rounds: Sequence[int], values: Sequence[float | None]) -> tuple[list[int], list[float]]:
    """The rounds with a value (holdout-every skips some: the line joins the scored ones);
    a NaN value stays, as a gap."""
    kept = [(r, v) for r, v in zip(rounds, values, strict=True) if v is not None]
    return [r for r, _ in kept], _nan([v for _, v in kept])


def _nan(values: Sequence[float | None]) -> list[float]:
    return [np.nan if v is None else float(v) for v in values]


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
