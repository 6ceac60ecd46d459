"""The HTML report of a dataset run.

:func:`build_report` writes ``report.html`` for a ``dinoreg dataset`` output folder: the summary
table (mean, std, "30"), one row of headline metrics per pair and every pair's figure (drawn by
:mod:`dinoreg.qc`), embedded as base64 (one self-contained file) or linked by relative path.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

def qc_figure_from_files(record: dict[str, Any], outdir: Path, path: Path) -> Path:
    """Rebuild a pair's QC figure from its record: fixed and moving images and the written field."""
    from dinoreg.api import warp
    from dinoreg.io.fields import load_field
    from dinoreg.io.images import load_image, to_fixed_grid
    from dinoreg.qc import qc_figure

    fixed = load_image(record["fixed"])
    moving = to_fixed_grid(load_image(record["moving"]), fixed).array
    disp_path = outdir / record["disp"]
    warped = warp(record["moving"], disp_path, fixed=fixed).array
    disp = load_field(disp_path).array
    return qc_figure(fixed.array, moving, warped, disp, path, title=record["pair"],
                     spacing=tuple(float(s) for s in fixed.spacing), affine=fixed.affine)


# --------------------------------------------------------------------------- the HTML page


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f0f0f0}
section{margin:1.5em 0;border-top:1px solid #ddd}
img{max-width:100%;height:auto}
.muted{color:#777}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var s = document.getElementById('img-status');
  s.textContent = 'images loaded: ' + ok + ' of ' + imgs.length;
  s.setAttribute('data-loaded', ok); s.setAttribute('data-total', imgs.length);
});
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _img_src(png: Path, outdir: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    return html.escape(os.path.relpath(png, outdir))


def _summary_table(aggregate: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td>{''.join(f'<td>{_fmt(v.get(s))}</td>' for s in ('mean', 'std', '30', 'n'))}</tr>"
                   for k, v in aggregate.items() if "/" not in k)
    return f"<table><tr><th>metric</th><th>mean</th><th>std</th><th>30th pct</th><th>n</th></tr>{rows}</table>"


def _pairs_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("pair", "fixed", "moving", *columns, "seconds"))
    rows = []
    for r in records:
        cells = [f'<a href="#pair-{html.escape(r["pair"])}">{html.escape(r["pair"])}</a>',
                 html.escape(Path(r["fixed"]).name), html.escape(Path(r["moving"]).name)]
        cells += [_fmt(r["metrics"].get(c)) for c in columns]
        cells.append(_fmt(r.get("timings", {}).get("total")))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_html(title: str, summary: dict[str, Any], records: Sequence[dict[str, Any]],
                images: dict[str, str]) -> str:
    """The report page: summary, per-pair table, one section per pair with its figure."""
    from dinoreg.dataset import HEADLINE

    columns = [c for c in HEADLINE if any(r["metrics"].get(c) is not None for r in records)]
    sections = []
    for r in records:
        src = images.get(r["pair"])
        metrics = ", ".join(f"{c} {_fmt(r['metrics'].get(c))}" for c in columns)
        pic = (f'<img alt="QC figure of pair {html.escape(r["pair"])}" src="{src}">' if src
               else '<p class="muted">no QC figure</p>')
        sections.append(f'<section id="pair-{html.escape(r["pair"])}"><h3>{html.escape(r["pair"])}: '
                        f'{html.escape(Path(r["moving"]).name)} → {html.escape(Path(r["fixed"]).name)}</h3>'
                        f'<p>{metrics}</p>{pic}</section>')
    missing = summary.get("missing") or []
    note = (f'<p class="muted">unfinished pairs: {html.escape(", ".join(missing))}</p>' if missing else "")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            f"<p>{summary.get('n_done', len(records))} of {summary.get('n_pairs', len(records))} pairs finished"
            f"{' — split ' + html.escape(str(summary['split'])) if summary.get('split') else ''}. "
            f"Fields follow the Learn2Reg convention; the \"30\" column is the 30th percentile over pairs.</p>"
            f"{note}<h2>Summary</h2>{_summary_table(summary.get('aggregate', {}))}"
            f"<h2>Pairs</h2><div style='overflow-x:auto'>{_pairs_table(records, columns)}</div><h2>QC figures</h2>"
            f"<p class='muted'>Rows: the mid-planes of the fixed grid across k, j and i (voxel-index axes, named from the image orientation). "
            f"Deformation grid: p + u(p). Jacobian: blue &lt; 1 (shrink), red &gt; 1 (growth), black ≤ 0 (fold).</p>"
            f"{''.join(sections)}<footer id='img-status' class='muted'>images: not checked</footer></body></html>")


def build_report(outdir: str | os.PathLike, embed: bool = True, redraw: bool = False,
                 title: str | None = None) -> Path:
    """Rebuild ``report.html`` (and the tables, and any missing QC figure) from an output folder.

    Args:
        outdir: a ``dinoreg dataset`` output folder.
        embed: embed the figures as base64 (a self-contained page) or link ``qc/*.png``.
        redraw: redraw every figure from the images and fields, not only missing ones.
        title: page title (default: the dataset name from ``summary.json``).
    """
    from dinoreg.dataset import QC, RECORDS, read_record, write_tables
    from dinoreg.errors import DinoregError
    from dinoreg.io.atomic import write_json_atomic, write_text_atomic

    out = Path(outdir)
    if not (out / RECORDS).is_dir():
        raise DinoregError(f"is not a 'dinoreg dataset' output folder (no {RECORDS}/ inside)", out)
    previous = _read_json(out / "summary.json")
    summary = write_tables(out, split=previous.get("split"), dataset=previous.get("dataset"))
    if previous.get("n_pairs", 0) > summary["n_pairs"]:
        summary["n_pairs"], summary["missing"] = previous["n_pairs"], previous.get("missing", [])
    records = [r for r in (read_record(out, p["pair"]) for p in summary["pairs"]) if r is not None]
    images = {}
    for r in records:
        png = out / (r.get("qc") or f"{QC}/{r['pair']}.png")
        if redraw or not png.is_file():
            qc_figure_from_files(r, out, png)
            if r.get("qc") is None:
                r["qc"] = png.relative_to(out).as_posix()
                write_json_atomic(out / RECORDS / f"{r['pair']}.json", r)
        images[r["pair"]] = _img_src(png, out, embed)
    name = title or f"dinoreg report — {_dataset_name(summary.get('dataset')) or out.name}"
    page = out / "report.html"
    return write_text_atomic(page, render_html(name, summary, records, images))


def _dataset_name(dataset_json: str | None) -> str | None:
    """The ``name`` in dataset.json (or its folder's name), if it can be read."""
    if not dataset_json:
        return None
    path = Path(dataset_json)
    path = path / "dataset.json" if path.is_dir() else path
    return str(_read_json(path).get("name") or path.parent.name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
