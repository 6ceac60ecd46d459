"""Grid sweep of the FFD settings on the 2D pairs of ``ffd_study.py`` (how the ``ffd`` defaults were chosen).

Every combination of the given values is run on every pair; NCC alone (alpha 0) skips the
feature settings (they do not touch it). One JSON line per run is appended to
``OUTDIR/ffd_sweep.jsonl`` (pair, settings, Dice, HD95, SDlogJ, folding, seconds); runs already
in the file are skipped, so an interrupted sweep resumes and several sweeps can share one file.
``--shard i/n`` runs every n-th job (start one process per shard to use n cores).

Usage::

    python benchmarks/ffd_sweep.py OUTDIR --pairs oasis abdomen --alpha 0 0.3 \\
        --grid-spacing 5 8 --reg-weight 0.1 1 --iterations 100 --feature-layer 0 6
    python benchmarks/ffd_sweep.py OUTDIR --summary     # table of the runs so far, best first

Run with ``OMP_NUM_THREADS=1`` for comparable seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ffd_study import METRICS, PAIRS, load_pair  # noqa: E402

SWEPT = ("alpha", "grid_spacing", "reg_weight", "iterations", "lr", "levels", "feature_upsample",
         "feature_layer", "feature_distance", "balance")
FEATURE_ONLY = ("feature_upsample", "feature_layer", "feature_distance", "balance")


def key(pair: str, cfg: dict) -> str:
    return json.dumps([pair] + [cfg[k] for k in SWEPT])


def jobs(args) -> list[dict]:
    grid = dict(alpha=args.alpha, grid_spacing=args.grid_spacing, reg_weight=args.reg_weight,
                iterations=args.iterations, lr=args.lr, levels=[tuple(args.levels)],
                feature_upsample=args.feature_upsample, feature_layer=args.feature_layer,
                feature_distance=args.feature_distance, balance=[not args.no_balance])
    out, seen = [], set()
    for values in itertools.product(*(grid[k] for k in SWEPT)):
        cfg = dict(zip(SWEPT, values))
        if cfg["alpha"] == 0:
            cfg.update(feature_upsample=1.0, feature_layer=0, feature_distance="cos", balance=True)
        cfg["levels"] = list(cfg["levels"])
        sig = json.dumps(cfg, sort_keys=True)
        if sig not in seen:
            seen.add(sig)
            out.append(cfg)
    return out


def run(pair: dict, cfg: dict, encoder: str) -> dict:
    import dinoreg

    t0 = time.perf_counter()
    feats = dict(features=encoder, feature_distance=cfg["feature_distance"], feature_upsample=cfg["feature_upsample"],
                 feature_layer=cfg["feature_layer"], balance=cfg["balance"]) if cfg["alpha"] > 0 else {}
    res = dinoreg.register(pair["fixed"], pair["moving"], preset_name="ffd", device="cpu", progress=False,
                           alpha=cfg["alpha"], grid_spacing=cfg["grid_spacing"], reg_weight=cfg["reg_weight"],
                           iterations=cfg["iterations"], lr=cfg["lr"], levels=tuple(cfg["levels"]),
                           fixed_labels=pair["fixed_seg"], moving_labels=pair["moving_seg"],
                           eval_labels=pair["labels"], **feats)
    out = {k: res.metrics.get(k) for k in METRICS}
    out["seconds"] = time.perf_counter() - t0
    return out


def summary(path: Path, pairs: list[str], max_sdlogj: float | None = None) -> str:
    """Markdown table of the settings run on every pair, best mean Dice first (``max_sdlogj``:
    only settings whose SDlogJ stays below it on every pair)."""
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        sig = json.dumps({k: r[k] for k in SWEPT}, sort_keys=True)
        rows.setdefault(sig, {k: r[k] for k in SWEPT})[r["pair"]] = r
    head = list(SWEPT) + [f"{m} {p}" for p in pairs for m in ("Dice", "SDlogJ")] + ["mean Dice", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = [r for r in rows.values() if all(p in r for p in pairs)
            and (max_sdlogj is None or all(r[p]["sdlogj"] <= max_sdlogj for p in pairs))]
    full.sort(key=lambda r: -np.mean([r[p]["dice_mean"] for p in pairs]))
    for r in full:
        dice = [r[p]["dice_mean"] for p in pairs]
        secs = np.mean([r[p]["seconds"] for p in pairs])
        cells = [f"{r[p]['dice_mean']:.4f} | {r[p]['sdlogj']:.3f}" for p in pairs]
        lines.append("| " + " | ".join([str(r[k]) for k in SWEPT] + cells
                                      + [f"{np.mean(dice):.4f}", f"{secs:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--abdomen-dir", default=None, help="where the abdomen pair is built (default OUTDIR/abdomen_pair)")
    parser.add_argument("--pairs", nargs="+", default=["oasis", "abdomen"], choices=list(PAIRS))
    parser.add_argument("--encoder", default="dinov2")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--grid-spacing", type=float, nargs="+", default=[8.0])
    parser.add_argument("--reg-weight", type=float, nargs="+", default=[0.1])
    parser.add_argument("--iterations", type=int, nargs="+", default=[100])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.1])
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--feature-upsample", type=float, nargs="+", default=[1.0])
    parser.add_argument("--feature-layer", type=int, nargs="+", default=[0])
    parser.add_argument("--feature-distance", nargs="+", default=["cos"])
    parser.add_argument("--no-balance", action="store_true")
    parser.add_argument("--shard", default="0/1", help="i/n: run jobs i, i+n, ...")
    parser.add_argument("--summary", action="store_true", help="print the table of OUTDIR's runs and exit")
    parser.add_argument("--max-sdlogj", type=float, help="--summary: only settings with SDlogJ <= this on every pair")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    out = Path(args.outdir)
    path = out / "ffd_sweep.jsonl"
    if args.summary:
        print(summary(path, args.pairs, args.max_sdlogj))
        return
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    if path.exists():
        done = {key(r["pair"], r) for r in map(json.loads, path.read_text().splitlines())}
    i, n = (int(x) for x in args.shard.split("/"))
    todo = [(p, c) for c in jobs(args) for p in args.pairs][i::n]
    abdomen = Path(args.abdomen_dir) if args.abdomen_dir else out / "abdomen_pair"
    pairs = {p: load_pair(Path(args.shared), PAIRS[p], abdomen) for p in args.pairs}
    for name, cfg in todo:
        if key(name, cfg) in done:
            continue
        metrics = run(pairs[name], cfg, args.encoder)
        record = dict(pair=name, **cfg, **metrics)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name:<8} " + " ".join(f"{k}={cfg[k]}" for k in SWEPT if not (cfg['alpha'] == 0 and k in FEATURE_ONLY))
              + f"  Dice {metrics['dice_mean']:.4f} SDlogJ {metrics['sdlogj']:.3f} ({metrics['seconds']:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
