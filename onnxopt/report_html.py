"""The HTML report: one self-contained page (no scripts, no fetches) rendered from a report's JSON form.

Plots are matplotlib figures written as inline SVG with text kept as text: a few tens of KiB per
page, crisp at any zoom, readable offline, and searchable. (Plotly would need its 3.5 MB
JavaScript bundle inlined into every page to open offline.) matplotlib is the optional extra
``onnxopt[report]``; without it the page carries the same tables and says how to get the plots.

Per-step ``details`` are rendered generically, so a pass shows its per-layer data without code
here: a list of records becomes a table plus one bar chart per numeric column, keyed by ``name``;
a mapping of number series (``loss_curves``) becomes a line plot; a list of numbers, a line; any
other mapping, a key/value table.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Callable
from typing import Any

from .report import human_bytes, report_warnings

# Fields the page lays out itself; any other field of a report or a step is shown generically.
REPORT_KEYS = frozenset({"onnxopt_version", "pipeline", "input", "output", "passed", "failure", "reproducer", "feeds",
                         "steps", "layers", "latency"})
STEP_KEYS = frozenset({"index", "name", "step", "options", "exact", "seconds", "modified", "before", "after", "stats",
                       "checks", "vs_previous", "vs_original", "accuracy", "passed", "details"})
MAX_BARS = 40  # bar charts show this many rows (the tables below them hold every row)
COLORS = {"before": "#9aa5b1", "after": "#2f6fb2", "bad": "#c0392b", "good": "#27864a", "line": "#2f6fb2"}
INSTALL_HINT = 'Plots need matplotlib: <code>pip install "onnxopt[report]"</code>, then render again with ' \
               "<code>onnxopt report REPORT.json -o PAGE.html</code>."


def render_html(document: dict[str, Any]) -> str:
    """The page for a report document (``Report.to_dict()`` or its JSON file, read back)."""
    plots = _Plotter.create()
    steps = document.get("steps", [])
    verdict = "PASSED" if document.get("passed", document.get("failure") is None) else "FAILED"
    sections = [
        _header(document, verdict),
        _warnings(document),
        _pipeline(steps),
        _section("Steps", _step_table(steps) + (plots.step_panels(steps, document.get("feeds", {})) if plots else "")),
        _latency(document.get("latency"), plots),
        _layers(document.get("layers") or [], plots),
        *(_step_details(step, plots) for step in steps if _step_extras(step)),
    ]
    if plots is None:
        sections.insert(1, f'<p class="note">{INSTALL_HINT}</p>')
    title = f"onnxopt report: {document.get('input') or 'model'}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(s for s in sections if s) + "\n</main></body></html>\n")


# --------------------------------------------------------------------------- sections


def _header(document: dict[str, Any], verdict: str) -> str:
    feeds = document.get("feeds") or {}
    rows = [("pipeline", f"<code>{_e(document.get('pipeline', ''))}</code>"),
            ("input", _e(document.get("input") or "(in memory)")),
            ("output", _e(document.get("output") or "(not written)"))]
    if feeds:
        accuracy = feeds.get("accuracy")
        rows.append(("validation", _e(f"{feeds.get('origin')} ({feeds.get('samples')} samples)"
                                      + ("" if accuracy is None else f", original accuracy {accuracy:.2%}"))))
        rows.extend(("", _e(note)) for note in feeds.get("notes", [])[1:])
    if document.get("failure"):
        rows.append(("failure", _e(document["failure"])))
    if document.get("reproducer"):
        rows.append(("reproducer", f"<code>{_e(document['reproducer'])}</code>"))
    rows.extend((key.replace("_", " "), _cell(value)) for key, value in document.items()
                if key not in REPORT_KEYS and value not in (None, "", [], {}))
    version = document.get("onnxopt_version", "")
    return (f'<header><h1>onnxopt report <span class="badge {verdict.lower()}">{verdict}</span></h1>'
            f'<p class="sub">onnxopt {_e(version)}</p>'
            + "<table class=\"kv\">" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table></header>")


def _warnings(document: dict[str, Any]) -> str:
    warnings = report_warnings(document)
    if not warnings:
        return ""
    return '<div class="warnings"><strong>Warnings</strong><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warnings) \
        + "</ul></div>"


def _pipeline(steps: list[dict[str, Any]]) -> str:
    if not steps:
        return ""
    chips = []
    for step in steps:
        state = "failed" if not step.get("passed", True) else ("exact" if step.get("exact") else "lossy")
        chips.append(f'<div class="chip {state}"><span class="idx">{step["index"]}</span>'
                     f'{_step_label(step)}'
                     f'<span class="kind">{"exact" if step.get("exact") else "lossy"}'
                     f'{"" if step.get("passed", True) else " · failed"}</span></div>')
    return _section("Pipeline", '<div class="flow">' + '<span class="arrow">→</span>'.join(chips) + "</div>")


def _step_table(steps: list[dict[str, Any]]) -> str:
    head = ("<tr><th>#</th><th>step</th><th>kind</th><th>nodes</th><th>params</th><th>weights</th><th>seconds</th>"
            "<th>cosine vs original</th><th>max abs</th><th>accuracy</th><th>verdict</th></tr>")
    body = []
    for step in steps:
        before, after = step["before"], step["after"]
        cosine, max_abs = _worst(step)
        stats = ", ".join(f"{k}={_number(v)}" for k, v in step.get("stats", {}).items() if v and ":" not in k)
        body.append(
            f"<tr class=\"{'' if step.get('passed', True) else 'failed'}\"><td>{step['index']}</td>"
            f"<td><code title=\"{_e(step.get('step', step['name']))}\"><b>{_e(step['name'])}</b></code>"
            + (f'<div class="stats">{_e(stats)}</div>' if stats else "") + "</td>"
            f"<td>{'exact' if step.get('exact') else 'lossy'}</td>"
            f"<td>{_change(before['nodes'], after['nodes'], str)}</td>"
            f"<td>{_change(before['params'], after['params'], lambda n: f'{n:,}')}</td>"
            f"<td>{_change(before['weight_bytes'], after['weight_bytes'], human_bytes)}</td>"
            f"<td>{step.get('seconds', 0):.3f}</td>"
            f"<td>{'-' if cosine is None else f'{cosine:.6f}'}</td>"
            f"<td>{'-' if max_abs is None else f'{max_abs:.3g}'}</td>"
            f"<td>{'-' if step.get('accuracy') is None else format(step['accuracy'], '.2%')}</td>"
            f"<td>{'ok' if step.get('passed', True) else '<strong>FAILED</strong>'}</td></tr>"
        )
    return f'<table class="grid">{head}{"".join(body)}</table>'


def _latency(latency: dict[str, Any] | None, plots: _Plotter | None) -> str:
    if not latency:
        return ""
    head = ("<tr><th>model</th><th>file</th><th>median ms</th><th>p10–p90 ms</th><th>runs/s</th>"
            "<th>peak memory</th><th>latency ×</th><th>size ×</th><th>memory ×</th></tr>")
    rows = []
    for m in latency["models"]:
        ratios = {k: "-" if m["vs_first"].get(k) is None else f"{m['vs_first'][k]:.2f}×" for k in ("latency", "size", "memory")}
        memory = "-" if m.get("peak_memory_bytes") is None else human_bytes(m["peak_memory_bytes"])
        rows.append(f"<tr><td>{_e(m['label'])}</td><td>{human_bytes(m['file_bytes'])}</td><td>{m['median_ms']:.4g}</td>"
                    f"<td>{m['p10_ms']:.4g}–{m['p90_ms']:.4g}</td><td>{m['throughput_per_s']:.4g}</td>"
                    f"<td>{memory}</td><td>{ratios['latency']}</td><td>{ratios['size']}</td><td>{ratios['memory']}</td></tr>")
    caption = (f"onnxruntime {_e(latency.get('onnxruntime', ''))} CPU, {latency['threads']} thread(s), "
               f"{latency['runs']} runs per model interleaved on {_e(latency['feeds']['origin'])}; "
               "ratios are medians of per-run ratios to the first model.")
    figure = plots.latency(latency["models"]) if plots else ""
    return _section("Latency", f'<div class="figs">{figure}</div><table class="grid">{head}{"".join(rows)}</table>'
                               f'<p class="note">{caption}</p>')


def _layers(layers: list[dict[str, Any]], plots: _Plotter | None) -> str:
    if not layers:
        return ""
    figures = ""
    sparse = any(max(row.get("sparsity") or 0, row.get("sparsity_before") or 0) >= 0.005 for row in layers)
    if plots:
        figures = plots.bars(layers, "sparsity", before="sparsity_before", title="weight sparsity per layer",
                             percent=True) if sparse else ""
        if any(row.get("weight_change") is not None for row in layers):
            figures += plots.bars(layers, "weight_change", title="weight change vs the input (relative L2)")
    note = ('<p class="note">Layers of the result (Conv, Gemm, MatMul with a constant weight; int8 weights '
            "dequantized). Weight change: relative L2 distance to the same layer of the input, where its shape is "
            "unchanged; for a layer only quantized, its quantization error (folding a BatchNorm changes it too)."
            + ("" if sparse else " No layer has 0.5 % or more zero weights, before or after.") + "</p>")
    return _section("Layers", f'<div class="figs">{figures}</div>{note}' + _details_block(_records_table(layers), len(layers)))


def _step_extras(step: dict[str, Any]) -> dict[str, Any]:
    """The step's ``details``, and any field this page does not know yet (newer reports), when not empty."""
    extras = {k: v for k, v in step.items() if k not in STEP_KEYS and v not in (None, "", [], {})}
    return {**extras, **(step.get("details") or {})}


def _step_details(step: dict[str, Any], plots: _Plotter | None) -> str:
    parts = []
    for key, value in _step_extras(step).items():
        title = key.replace("_", " ")
        if _is_records(value):
            figures = "".join(plots.bars(value, metric, title=f"{title}: {metric.replace('_', ' ')}")
                              for metric in _numeric_columns(value)) if plots else ""
            parts.append(f"<h3>{_e(title)}</h3><div class=\"figs\">{figures}</div>"
                         + _details_block(_records_table(value), len(value)))
        elif _is_series_map(value):
            figure = plots.lines(value, title) if plots else ""
            table = _records_table([{"series": k, "points": len(v), "first": v[0] if v else None,
                                     "last": v[-1] if v else None} for k, v in value.items()])
            parts.append(f"<h3>{_e(title)}</h3><div class=\"figs\">{figure}</div>{table}")
        elif _is_series(value):
            figure = plots.lines({key: value}, title) if plots else ""
            parts.append(f"<h3>{_e(title)}</h3><div class=\"figs\">{figure}</div>"
                         + _records_table([{"points": len(value), "first": value[0], "last": value[-1]}]))
        elif isinstance(value, dict):
            parts.append(f"<h3>{_e(title)}</h3>" + _records_table([{"key": k, "value": v} for k, v in value.items()]))
        else:
            parts.append(f"<h3>{_e(title)}</h3><pre>{_e(json.dumps(value, indent=1)[:20000])}</pre>")
    return _section(f"Step {step['index']}: {step['name']}", "".join(parts), anchor=f"step-{step['index']}")


# --------------------------------------------------------------------------- generic pieces


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_series(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_number(v) for v in value)


def _is_series_map(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(_is_series(v) for v in value.values())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_columns(records: list[dict[str, Any]]) -> list[str]:
    """Columns worth a bar chart: numbers in some row, not booleans, not bare counts of the layer's size."""
    columns = dict.fromkeys(k for row in records for k in row)
    return [c for c in columns if c not in ("params", "index")
            and any(_is_number(row.get(c)) for row in records)
            and all(row.get(c) is None or _is_number(row.get(c)) for row in records)]


def _records_table(records: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in records for k in row))
    head = "".join(f"<th>{_e(c.replace('_', ' '))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c), percent='sparsity' in c)}</td>" for c in columns)
                   + "</tr>" for row in records)
    return f'<table class="grid">{"<tr>" + head + "</tr>"}{body}</table>'


def _details_block(table: str, rows: int) -> str:
    """Long tables fold away (plain HTML <details>, no script)."""
    if rows <= 12:
        return table
    return f"<details><summary>table ({rows} rows)</summary>{table}</details>"


def _cell(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if percent and _is_number(value):
        return f"{value:.1%}"
    if _is_number(value):
        return _number(value)
    if isinstance(value, (list, dict)):
        return f"<code>{_e(json.dumps(value))}</code>"
    return _e(str(value))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _change(before: int, after: int, fmt: Callable[[int], str]) -> str:
    if before == after:
        return fmt(after)
    cls = "down" if after < before else "up"
    return f'{fmt(before)} → <span class="{cls}">{fmt(after)}</span>'


def _step_label(step: dict[str, Any]) -> str:
    """The pass name, its options below it in small type (they are long: every option is spelled out)."""
    text = step.get("step", step["name"])
    options = text[len(step["name"]) + 1:-1] if text.startswith(step["name"] + "(") else ""
    return f"<code><b>{_e(step['name'])}</b></code>" + (f'<code class="opts">{_e(options)}</code>' if options else "")


def _worst(step: dict[str, Any]) -> tuple[float | None, float | None]:
    """The step's lowest cosine and largest max abs over outputs, against the original."""
    outputs = (step.get("vs_original") or {}).get("outputs", {})
    cosines = [o["cosine"] for o in outputs.values() if _is_number(o.get("cosine"))]
    errors = [float(o["max_abs"]) for o in outputs.values() if o.get("max_abs") is not None]
    return (min(cosines) if cosines else None), (max(errors) if errors else None)


def _section(title: str, body: str, anchor: str | None = None) -> str:
    if not body:
        return ""
    anchor = anchor or re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


# --------------------------------------------------------------------------- plots


class _Plotter:
    """matplotlib figures as inline SVG (text as text, fixed ids: the same report gives the same page)."""

    def __init__(self, matplotlib) -> None:
        self.mpl = matplotlib
        self.rc = {"svg.fonttype": "none", "svg.hashsalt": "onnxopt", "font.size": 9, "axes.titlesize": 10,
                   "font.family": "sans-serif", "axes.spines.top": False, "axes.spines.right": False,
                   "axes.grid": True, "grid.color": "#e3e7ec", "axes.axisbelow": True}

    @classmethod
    def create(cls) -> _Plotter | None:
        try:
            import matplotlib
            import matplotlib.ticker
            from matplotlib.figure import Figure  # noqa: F401  (the only matplotlib entry point used)
        except ImportError:
            return None
        return cls(matplotlib)

    def _svg(self, draw: Callable, size: tuple[float, float], label: str) -> str:
        from matplotlib.figure import Figure

        with self.mpl.rc_context(self.rc):
            figure = Figure(figsize=size, layout="constrained")
            draw(figure)
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        svg = buffer.getvalue()
        svg = svg[svg.index("<svg"):]
        return f'<figure class="plot" role="img" aria-label="{_e(label)}">{svg}</figure>'

    def step_panels(self, steps: list[dict[str, Any]], feeds: dict[str, Any]) -> str:
        """Cosine, accuracy, weight bytes and nodes after each step (step 0: the input)."""
        labels = ["input"] + [f"{s['index']} {s['name']}" for s in steps]
        cosine = [1.0] + [_worst(s)[0] for s in steps]
        accuracy = [feeds.get("accuracy")] + [s.get("accuracy") for s in steps]
        panels = [("worst output cosine vs original", cosine, None)]
        if any(a is not None for a in accuracy):
            panels.append(("accuracy (%)", [None if a is None else 100 * a for a in accuracy], None))
        weights = [steps[0]["before"]["weight_bytes"]] + [s["after"]["weight_bytes"] for s in steps]
        power = min(3, max(0, int(math.log(max(max(weights), 1), 1024))))
        panels.append((f"weights ({('B', 'KiB', 'MiB', 'GiB')[power]})", [w / 1024**power for w in weights], None))
        panels.append(("nodes", [steps[0]["before"]["nodes"]] + [s["after"]["nodes"] for s in steps], None))
        failed = [i + 1 for i, s in enumerate(steps) if not s.get("passed", True)]

        def draw(figure) -> None:
            axes = figure.subplots(1, len(panels), squeeze=False)[0]
            for ax, (title, values, _) in zip(axes, panels):
                xs = [i for i, v in enumerate(values) if v is not None]
                ys = [values[i] for i in xs]
                ax.plot(xs, ys, marker="o", color=COLORS["line"], linewidth=1.6, markersize=4)
                for i in failed:
                    if values[i] is not None:
                        ax.plot([i], [values[i]], marker="X", color=COLORS["bad"], markersize=9, linestyle="none")
                ax.set_title(title, loc="left")
                crowded = len(labels) > 6
                ax.set_xticks(range(len(labels)), labels, rotation=60 if crowded else 35, ha="right",
                              fontsize=7 if crowded else None, rotation_mode="anchor")
                ax.margins(x=0.08)
                if "cosine" in title:
                    ax.ticklabel_format(axis="y", useOffset=False)

        height = 2.9 + 0.06 * max(0, max(len(label) for label in labels) - 12) if len(labels) > 6 else 2.9
        return self._svg(draw, (min(3.1 * len(panels), 13), height), "per-step cosine, accuracy, weights and nodes")

    def latency(self, models: list[dict[str, Any]]) -> str:
        def draw(figure) -> None:
            ax = figure.subplots()
            ys = range(len(models))
            medians = [m["median_ms"] for m in models]
            low = [m["median_ms"] - m["p10_ms"] for m in models]
            high = [m["p90_ms"] - m["median_ms"] for m in models]
            colors = [COLORS["before"]] + [COLORS["bad"] if (m["vs_first"].get("latency") or 0) > 1.05
                                           else COLORS["after"] for m in models[1:]]
            ax.barh(ys, medians, xerr=[low, high], color=colors, capsize=3, height=0.55)
            ax.set_yticks(list(ys), [m["label"] for m in models])
            ax.invert_yaxis()
            for y, m in zip(ys, models):
                ax.annotate(f"{m['median_ms']:.3g} ms ({m['vs_first']['latency']:.2f}×)", (m["p90_ms"], y),
                            xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
            ax.set_xlabel("median latency, ms (whiskers: p10–p90)")
            ax.margins(x=0.35)

        return self._svg(draw, (5.2, 0.5 + 0.45 * len(models) + 0.6), "latency per model")

    def bars(self, records: list[dict[str, Any]], metric: str, *, title: str, before: str | None = None,
             percent: bool = False) -> str:
        """Horizontal bars of ``metric`` per record (``name`` on the axis); ``before`` adds a paler twin bar."""
        rows = [r for r in records if _is_number(r.get(metric))][:MAX_BARS]
        if not rows:
            return ""
        scale = 100.0 if percent else 1.0
        twin = before is not None and any(_is_number(r.get(before)) for r in rows)

        def draw(figure) -> None:
            ax = figure.subplots()
            ys = list(range(len(rows)))
            height = 0.4 if twin else 0.7
            if twin:
                ax.barh([y - height / 2 for y in ys], [scale * (r.get(before) or 0) for r in rows], height=height,
                        color=COLORS["before"], label="input")
            ax.barh([y + (height / 2 if twin else 0) for y in ys], [scale * r[metric] for r in rows], height=height,
                    color=[COLORS["bad"] if r.get("kept_float") else COLORS["after"] for r in rows],
                    label="result" if twin else None)
            ax.set_yticks(ys, [_short_label(r.get("name", i)) for i, r in enumerate(rows)])
            ax.invert_yaxis()
            shown = f" (first {len(rows)} of {len(records)})" if len(records) > len(rows) else ""
            kept = " (red: kept in float)" if any(r.get("kept_float") for r in rows) else ""
            ax.set_title(title + shown + kept, loc="left")
            ax.xaxis.set_major_locator(self.mpl.ticker.MaxNLocator(5))
            ax.set_xlabel(metric.replace("_", " ") + (" (%)" if percent else ""))
            low = min(scale * r[metric] for r in rows)
            if metric.startswith("cosine") and low > 0.5:
                ax.set_xlim(low - (1 - low) * 0.2 - 1e-6, 1)
                ax.ticklabel_format(axis="x", useOffset=False)
            if percent:
                ax.set_xlim(0, 100)
            if twin:
                ax.legend(loc="lower right", frameon=False)

        return self._svg(draw, (5.2, 0.9 + 0.24 * len(rows) * (1.4 if twin else 1)), title)

    def lines(self, series: dict[str, list[float]], title: str) -> str:
        def draw(figure) -> None:
            ax = figure.subplots()
            for name, values in list(series.items())[:12]:
                ax.plot(range(len(values)), values, label=_short_label(name), linewidth=1.4)
            positive = all(v > 0 for values in series.values() for v in values)
            spread = max(max(v) for v in series.values()) / max(min(min(v) for v in series.values()), 1e-300)
            if positive and spread > 100:
                ax.set_yscale("log")
            ax.set_title(title, loc="left")
            ax.set_xlabel("step")
            if len(series) > 1:
                ax.legend(fontsize=7, frameon=False)

        return self._svg(draw, (5.2, 2.8), title)


def _short_label(name: Any, width: int = 28) -> str:
    text = str(name)
    return text if len(text) <= width else "…" + text[-(width - 1):]


CSS = """
:root{--fg:#1d2733;--muted:#5b6877;--line:#dde3ea;--bg:#f6f8fa;--blue:#2f6fb2;--red:#c0392b;--green:#27864a}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:0 0 10px}h3{font-size:14px;margin:14px 0 6px}
header,section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 18px;margin:0 0 14px}
.sub{color:var(--muted);margin:0 0 10px;font-size:12px}
.badge{font-size:13px;padding:2px 9px;border-radius:10px;vertical-align:middle;color:#fff}
.badge.passed{background:var(--green)}.badge.failed{background:var(--red)}
table{border-collapse:collapse;font-size:13px}
.kv th{text-align:left;color:var(--muted);font-weight:500;padding:2px 14px 2px 0;vertical-align:top}
.kv td{padding:2px 0}
.grid{width:100%;margin:4px 0}
.grid th{background:#eef2f6;text-align:left;font-weight:600;padding:5px 8px;border-bottom:1px solid var(--line);white-space:nowrap}
.grid td{padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top;font-variant-numeric:tabular-nums}
.grid tr.failed td{background:#fdecea}
.stats{color:var(--muted);font-size:11.5px;max-width:360px}
.down{color:var(--green);font-weight:600}.up{color:var(--red);font-weight:600}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.opts{display:block;color:var(--muted);font-size:11px;max-width:520px}
.flow{display:flex;flex-wrap:wrap;align-items:center;gap:6px}
.chip{max-width:100%;border:1px solid var(--line);border-left:4px solid var(--blue);border-radius:6px;padding:6px 10px;background:#fbfcfd}
.chip.lossy{border-left-color:#d68910}.chip.failed{border-left-color:var(--red);background:#fdecea}
.chip .idx{font-weight:700;margin-right:6px;color:var(--muted)}
.chip .kind{display:block;font-size:11px;color:var(--muted)}
.arrow{color:var(--muted);font-size:18px}
.warnings{background:#fff7e6;border:1px solid #f0c36d;border-radius:8px;padding:10px 16px;margin:0 0 14px}
.warnings ul{margin:4px 0 0;padding-left:20px}
.note{color:var(--muted);font-size:12.5px}
p.note:first-child{margin-top:0}
.figs{display:flex;flex-wrap:wrap;gap:12px}
.pair{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.pair>div{flex:1;min-width:360px}
figure.plot{margin:6px 0}figure.plot svg{max-width:100%;height:auto}
details summary{cursor:pointer;color:var(--blue);margin:6px 0}
pre{background:#f3f5f7;padding:8px;overflow:auto;font-size:12px}
"""
