"""``dinoreg report``: rebuild the HTML QC report of a ``dinoreg dataset`` output folder."""

from __future__ import annotations

import argparse

from dinoreg.cli import command


@command("report", "rebuild report.html (tables, QC figures) of a 'dinoreg dataset' output folder")
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="output folder of 'dinoreg dataset'")
    p.add_argument("--link", action="store_true", help="link qc/*.png instead of embedding them (smaller page)")
    p.add_argument("--redraw", action="store_true", help="redraw every QC figure from the images and fields")
    p.add_argument("--title", help="page title")
    p.add_argument("--quiet", action="store_true", help="accepted for symmetry; the report has no progress bar")


@_report_args.handler
def _report(args: argparse.Namespace) -> int:
    from dinoreg.report import build_report

    page = build_report(args.outdir, embed=not args.link, redraw=args.redraw, title=args.title)
    print(f"report: {page}")
    return 0
