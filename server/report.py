"""`report.html`: a run a clinician can look at, in one self-contained file.

Written by the ServerApp after each round (throttled, see `ReportWriter.refresh`) and at the
end of the run, and by `fedvox report RUN_DIR` for any run folder. The PNGs are kept in
`<run>/report/` and embedded in the page as base64 data URIs, so the page opens from a file
with no server and no network. The model card (server/model_card.py) is written beside it.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import metric_registry
from common.calibration import operating_point_warning
from common.files import atomic_write, atomic_write_text
from server import report_figures as figures
from server.model_card import MODEL_CARD, model_card
from server.report_data import (
    RunView,
    class_warnings,
    classification_view,
    environment,
    site_gap,
    site_table,
)

REPORT, FIGURES = "report.html", "report"
# A per-round refresh may cost at most this share of the time since the previous one.
REFRESH_SHARE = 0.02
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-top:.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f3f3f3}
img{max-width:100%;margin:.3em .5em .3em 0;vertical-align:top}.note{color:#666;font-size:.85em}
.warning{color:#8a1c00;border-left:3px solid #8a1c00;padding-left:.5em}"""


class ReportWriter:
    """Draws figures whose inputs changed, writes the PNGs and the page (and the model card)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._figures: dict[str, tuple[Any, bytes]] = {}  # name -> (input key, png)
        self._written: dict[str, bytes] = {}  # name -> the png last written to report/
        self.cost_s = 0.0  # the last write's duration
        self._next_at = 0.0  # monotonic time before which a refresh is skipped

    def refresh(self, summary: dict[str, Any]) -> float | None:
        """Rewrite the report unless the last write was recent relative to its cost (at most
        REFRESH_SHARE of the run's time goes to reports). Seconds spent, or None if skipped."""
        if time.monotonic() < self._next_at:
            return None
        return self.write(summary)

    def write(self, summary: dict[str, Any] | None = None) -> float:
        started = time.monotonic()
        view = RunView.load(self.run_dir, summary)
        images = self._draw(view)
        folder = self.run_dir / FIGURES
        for name, png in images.items():
            if (folder / f"{name}.png").is_file() and self._written.get(name) is png:
                continue
            atomic_write(folder / f"{name}.png", lambda f, png=png: f.write(png), shared=True)
            self._written[name] = png
        atomic_write_text(self.run_dir / REPORT, render(view, images), shared=True)
        atomic_write_text(self.run_dir / MODEL_CARD, model_card(view), shared=True)
        self.cost_s = time.monotonic() - started
        self._next_at = time.monotonic() + self.cost_s / REFRESH_SHARE
        return self.cost_s

    def _figure(self, name: str, key: Any, draw: Callable[[], bytes]) -> bytes:
        """The cached PNG when `key` (the figure's inputs) is unchanged, else a new drawing."""
        cached = self._figures.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        png = draw()
        self._figures[name] = (key, png)
        return png

    def _draw(self, view: RunView) -> dict[str, bytes]:
        rounds = [r["round"] for r in view.rounds]
        series = {k: view.series(k) for k in view.metric_keys()}
        loss = view.series("loss")
        draw_metrics = lambda: figures.metrics_figure(rounds, series, loss)  # noqa: E731
        out = {"metrics": self._figure("metrics", (rounds, series, loss), draw_metrics)}
        eps, budget = view.epsilon(), view.summary.get("config", {}).get("target-epsilon")
        if eps:
            draw_eps = lambda: figures.epsilon_figure(rounds, eps, budget)  # noqa: E731
            out["epsilon"] = self._figure("epsilon", (rounds, eps, budget), draw_eps)
        if view.task == "segmentation":
            out.update(self._segmentation(view))
        else:
            out.update(self._classification(view))
        return out

    def _classification(self, view: RunView) -> dict[str, bytes]:
        if view.last is None:
            return {}
        key = (view.last["round"], view.best_round)
        last = classification_view(view.last)
        best = classification_view(view.best) if view.best is not None else None
        out = {}
        curves = [
            {
                "label": f"{tag} (round {v['round']}, threshold {v['threshold']:.3f})",
                "fpr": v["roc"][0],
                "tpr": v["roc"][1],
                "point": v["point"],
            }
            for tag, v in (("last", last), ("best", best))
            if v is not None and "roc" in v and not (tag == "best" and v["round"] == last["round"])
        ]
        if curves:
            out["roc"] = self._figure("roc", key, lambda: figures.roc_figure(curves))
        title = f"round {last['round']}, threshold {last['threshold']:.3f}"
        out["confusion"] = self._figure(
            "confusion",
            key,
            lambda: figures.confusion_figure(last["confusion"], last["class_names"], title),
        )
        if "reliability" in last:
            bins = last["reliability"]
            out["reliability"] = self._figure(
                "reliability", key, lambda: figures.reliability_figure(bins)
            )
        return out

    def _segmentation(self, view: RunView) -> dict[str, bytes]:
        record = view.last
        if record is None or "slice_image" not in record or not len(record["slice_image"]):
            return {}
        names = view.summary.get("class_names") or _seg_class_names(view)
        slices = [
            {"case": str(record["cases"][i]), "image": img, "truth": t, "pred": p}
            for i, img, t, p in zip(
                record["slice_index"],
                record["slice_image"],
                record["slice_truth"],
                record["slice_pred"],
                strict=True,
            )
        ]
        return {
            "slices": self._figure(
                "slices", record["round"], lambda: figures.slices_figure(slices, names)
            )
        }


def _seg_class_names(view: RunView) -> list[str]:
    return ["background", *metric_registry.segmentation_classes(view.metric_keys()).values()]


def render(view: RunView, images: dict[str, bytes]) -> str:
    """The page: sections of headings, images (data URIs) and tables."""
    s = view.summary
    status = s.get("status", "?")
    parts = [
        f"<h1>fedvox run {_e(s.get('run_name', view.path.name))}</h1>",
        f"<p>Status <b>{_e(status)}</b> · {len(view.rounds)} evaluations (rounds "
        f"{_rounds_span(view)}) of {s.get('planned_rounds', '?')} planned · task {view.task} · "
        f"wall time {view.wall_s():.0f} s · best round {view.best_round}</p>",
        "<h2>Held-out performance per round</h2>",
        _img(images, "metrics", "held-out metrics per round"),
        "<h2>Privacy spent per hospital</h2>",
        _img(images, "epsilon", "epsilon per hospital per round"),
        "<p class=\"note\">The line is the run's target ε; a hospital's own node policy may "
        "be stricter (it refuses a round that would exceed it).</p>",
    ]
    if view.task == "segmentation":
        warnings = class_warnings(view)
        parts[2:2] = [f'<p class="warning"><b>Warning.</b> {_e(w)}</p>' for w in warnings]
        parts += ["<h2>Held-out slices (server's holdout)</h2>", _img(images, "slices", "slices")]
    else:
        parts += [
            "<h2>Operating point and calibration (server's holdout)</h2>",
            _img(images, "roc", "ROC curve"),
            _img(images, "confusion", "confusion matrix"),
            _img(images, "reliability", "reliability diagram"),
            _calibration_note(view),
        ]
    parts += _site_section(view) + _context_section(view)
    body = "\n".join(p for p in parts if p)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fedvox run {_e(s.get('run_name', ''))}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _site_section(view: RunView) -> list[str]:
    header, rows = site_table(view)
    parts = ["<h2>Hospitals</h2>", _table(header, rows) if rows else "<p>No round yet.</p>"]
    gap = site_gap(view)
    if gap:
        (b, bv), (w, wv) = gap["best"], gap["worst"]
        parts.append(
            f"<p>Best–worst site gap in local validation {gap['metric']}: <b>{gap['gap']:.3f}</b>"
            f" ({_e(b)} {bv:.3f}, {_e(w)} {wv:.3f}).</p>"
        )
    else:
        parts.append(
            "<p>Best–worst site gap: not available. Hospitals' local scores are computed from "
            "their DP validation releases; a small validation part under the release's noise "
            "gives no defined score (docs/privacy.md).</p>"
        )
    return parts


def _context_section(view: RunView) -> list[str]:
    s = view.summary
    data = {**(s.get("data") or {}), **{f"model {k}": v for k, v in (s.get("model") or {}).items()}}
    return [
        "<h2>Data</h2>",
        _table(["item", "value"], [[k, v] for k, v in data.items()]),
        "<h2>Software and machine</h2>",
        _table(["item", "value"], [[k, v] for k, v in environment().items()]),
        "<h2>Run configuration</h2>",
        _table(["key", "value"], [[k, v] for k, v in (s.get("config") or {}).items()]),
        f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M:%S")} from {_e(view.path)}.'
        " Model card: model-card.md beside this file.</p>",
    ]


def _calibration_note(view: RunView) -> str:
    c = view.last_scored.get("central", {})
    if c.get("ece") is None:
        return ""
    warning = operating_point_warning(c)
    return (f'<p class="warning"><b>Warning.</b> {_e(warning)}</p>' if warning else "") + (
        f"<p>Expected calibration error {_num(c.get('ece-raw'))} before and "
        f"{_num(c.get('ece'))} after temperature scaling (T = {_num(c.get('temperature'))}); "
        f"decision threshold {_num(c.get('threshold'))} on P(positive), both chosen on the "
        "hospitals' validation aggregates, never on this holdout.</p>"
    )


def _rounds_span(view: RunView) -> str:
    return f"{view.rounds[0]['round']}–{view.rounds[-1]['round']}" if view.rounds else "none"


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and np.isfinite(value) else "-"


def _e(value: Any) -> str:
    return html.escape(str(value))


def write_report(run_dir: Path) -> Path:
    """`fedvox report`: report.html and model-card.md for a run folder, from its files."""
    ReportWriter(run_dir).write()
    return Path(run_dir) / REPORT
