"""Quality-control pictures and the HTML report of a dataset run.

:func:`qc_figure` draws one pair in the three orthogonal mid-planes of the fixed grid (rows)
with six panels each: fixed, moving (on the fixed grid), warped moving, a checkerboard of fixed
and warped, the deformation grid (a regular grid pushed through ``p + u(p)``, drawn over the
fixed image) and the Jacobian determinant of ``p + u(p)`` with folds (``detJ <= 0``) in black.
Slices are shown in voxel-index space (``i``/``j``/``k`` axes, spacing-correct aspect), not
reoriented to radiological view.

:func:`build_report` writes ``report.html`` for a ``dinoreg dataset`` output folder: the summary
table (mean, std, "30"), one row of headline metrics per pair and every pair's figure, embedded
as base64 (one self-contained file) or linked by relative path.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PLANE_AXES = (2, 1, 0)  # rows: the voxel axis held fixed (k, j, i)
_ANATOMY = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
PANELS = ("fixed", "moving", "warped", "checkerboard fixed/warped", "deformation grid", "Jacobian det.")


# --------------------------------------------------------------------------- pure helpers

def window(volume: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Scale to [0, 1] between the ``low``/``high`` percentiles of the non-zero voxels."""
    vol = np.asarray(volume, dtype=np.float32)
    nz = vol[vol != 0]
    if nz.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(nz, [low, high])
    return np.clip((vol - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def mid_slice(volume: np.ndarray, axis: int, index: int | None = None) -> np.ndarray:
    """The 2D slice ``volume`` at ``index`` (default: middle) along ``axis``, remaining axes in order."""
    idx = volume.shape[axis] // 2 if index is None else index
    return np.take(volume, idx, axis=axis)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two equally shaped 2D images (about ``tiles`` per side)."""
    size = max(1, max(a.shape) // tiles)
    ii, jj = np.indices(a.shape)
    return np.where(((ii // size) + (jj // size)) % 2 == 0, a, b)


def full_size_jacobian(disp: np.ndarray) -> np.ndarray:
    """Learn2Reg Jacobian determinant ``(I, J, K)``: the evaluator's cropped map, edge-padded back."""
    from dinoreg.metrics import CROP, jacobian_determinant

    detj = jacobian_determinant(disp)
    pad = [(CROP, CROP), (CROP, CROP), (0, 0) if disp.shape[2] == 1 else (CROP, CROP)]
    return np.pad(detj, pad, mode="edge")


def plane_names(affine: np.ndarray | None) -> list[str]:
    """Anatomical name of the slice held at each voxel axis (from the affine's orientation),
    e.g. ``["sagittal", "coronal", "axial"]`` for RAS; ``["i", "j", "k"]`` without an affine."""
    if affine is None:
        return ["i", "j", "k"]
    from nibabel.orientations import aff2axcodes

    return [_ANATOMY.get(code, "ijk"[n]) for n, code in enumerate(aff2axcodes(np.asarray(affine)))]


def _plane_axes(axis: int) -> tuple[int, int]:
    """The two in-plane axes of a slice taken along ``axis``, in index order."""
    a, b = [d for d in range(3) if d != axis]
    return a, b


# --------------------------------------------------------------------------- the figure

def _show(ax: Any, image: np.ndarray, aspect: float, **kwargs: Any) -> Any:
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(image.T, origin="lower", aspect=aspect, interpolation="nearest", **kwargs)


def _draw_grid(ax: Any, background: np.ndarray, disp2d: np.ndarray, aspect: float, step: int) -> None:
    """Grid lines of ``p + u(p)`` in one plane; ``disp2d`` is ``(A, B, 2)`` (in-plane components)."""
    _show(ax, background, aspect, cmap="gray", vmin=0, vmax=1, alpha=0.45)
    na, nb = background.shape
    aa, bb = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
    xa, xb = aa + disp2d[..., 0], bb + disp2d[..., 1]
    style = dict(color="#d62728", linewidth=0.6)
    for b in range(step // 2, nb, step):
        ax.plot(xa[:, b], xb[:, b], **style)
    for a in range(step // 2, na, step):
        ax.plot(xa[a, :], xb[a, :], **style)
    ax.set_xlim(-0.5, na - 0.5)
    ax.set_ylim(-0.5, nb - 0.5)


def qc_figure(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, disp: np.ndarray,
              path: str | os.PathLike, title: str | None = None,
              spacing: Sequence[float] = (1.0, 1.0, 1.0), affine: np.ndarray | None = None, grid_step: int | None = None, dpi: int = 80) -> Path:
    """Write the QC figure of one pair as a PNG (atomically).

    Args:
        fixed: ``(I, J, K)`` fixed image.
        moving: ``(I, J, K)`` moving image on the fixed grid (before registration).
        warped: ``(I, J, K)`` moving image warped by ``disp``.
        disp: ``(I, J, K, 3)`` Learn2Reg field (voxels of the fixed grid, pull-back).
        path: the PNG to write.
        title: figure title (e.g. the pair name); the fold fraction is appended.
        spacing: voxel size in mm (sets the aspect ratio of each panel).
        affine: the fixed affine, only to name the planes (axial/coronal/sagittal).
        grid_step: voxels between deformation-grid lines (default: about 24 lines per side).
        dpi: resolution (80 gives a ~1250x680 px figure).

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from dinoreg.dataset import publish
    from dinoreg.io.images import atomic_path

    f, m, w = window(fixed), window(moving), window(warped)
    disp = np.asarray(disp, dtype=np.float32)
    detj = full_size_jacobian(disp)
    step = grid_step or max(2, max(fixed.shape) // 24)
    fold_cmap = ListedColormap(["black"])
    fig, axes = plt.subplots(3, 6, figsize=(15.5, 8.4), dpi=dpi, squeeze=False)
    names = plane_names(affine)
    for row, axis in enumerate(PLANE_AXES):
        a, b = _plane_axes(axis)
        aspect = float(spacing[b]) / float(spacing[a])
        fs, ms, ws = (mid_slice(v, axis) for v in (f, m, w))
        for col, img in enumerate((fs, ms, ws, checkerboard(fs, ws))):
            _show(axes[row, col], img, aspect, cmap="gray", vmin=0, vmax=1)
        _draw_grid(axes[row, 4], fs, mid_slice(disp, axis)[..., [a, b]], aspect, step)
        js = mid_slice(detj, axis)
        im = _show(axes[row, 5], js, aspect, cmap="RdBu_r", vmin=0.0, vmax=2.0)
        folds = np.ma.masked_where(js > 0, np.ones_like(js))
        _show(axes[row, 5], folds, aspect, cmap=fold_cmap, vmin=0, vmax=1)
        fig.colorbar(im, ax=axes[row, 5], fraction=0.046, pad=0.02)
        axes[row, 0].set_ylabel(f"{names[axis]}\n({'ijk'[axis]} = {fixed.shape[axis] // 2})", fontsize=11)
        for col in range(6):
            axes[row, col].set_xlabel("ijk"[a], fontsize=8, labelpad=1)
    for col, name in enumerate(PANELS):
        axes[0, col].set_title(name, fontsize=11)
    folding = float((detj <= 0).mean())
    head = f"{title} — " if title else ""
    fig.suptitle(f"{head}|u| max {np.abs(disp).max():.1f} vox, detJ ≤ 0: {100 * folding:.3f} % (black)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(out)
    try:
        fig.savefig(tmp, format="png")
        publish(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def qc_figure_from_files(record: dict[str, Any], outdir: Path, path: Path) -> Path:
    """Rebuild a pair's QC figure from its record: fixed and moving images and the written field."""
    from dinoreg.api import load_field, warp
    from dinoreg.io.images import load_image, to_fixed_grid

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
    from dinoreg.dataset import QC, RECORDS, publish, read_record, write_json_atomic, write_tables
    from dinoreg.errors import DinoregError
    from dinoreg.io.images import atomic_path

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
    tmp = atomic_path(page)
    tmp.write_text(render_html(name, summary, records, images), encoding="utf-8")
    publish(tmp, page)
    return page


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
