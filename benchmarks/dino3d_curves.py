"""Learning curves of a ``dinoreg pretrain`` run as a markdown table (means over blocks of steps).

Usage: python benchmarks/dino3d_curves.py RUN_DIR [RUN_DIR ...] [--every 50]
Columns: total loss, each loss term, dense top-1 accuracy (share of anchors whose nearest feature is
their correspondence), teacher entropies (nats; ``log K`` = a uniform, collapsed teacher) and
seconds per step.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

KEYS = ["loss", "dense", "dense_acc", "dino", "ibot", "koleo", "cls_entropy", "patch_entropy", "seconds"]


def curves(run: Path, every: int) -> str:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    keys = [k for k in KEYS if any(k in r and r[k] != 0 for r in rows)]
    cfg = {}
    ckpt_cfg = run / "config.json"
    if ckpt_cfg.exists():
        cfg = json.loads(ckpt_cfg.read_text())
    head = f"{run} ({len(rows)} steps, {sum(r.get('seconds', 0) for r in rows) / 60:.1f} min in steps)"
    if cfg:
        head += f"; log K: cls {math.log(cfg['out_dim']):.2f}, patch {math.log(cfg['patch_out_dim']):.2f}"
    lines = [head, "", "| steps | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for start in range(0, len(rows), every):
        block = rows[start:start + every]
        vals = []
        for k in keys:
            xs = [r[k] for r in block if k in r and not (isinstance(r[k], float) and math.isnan(r[k]))]
            vals.append(f"{sum(xs) / len(xs):.3f}" if xs else "-")
        lines.append(f"| {block[0]['step']}-{block[-1]['step']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    for run in args.runs:
        print(curves(run, args.every))
        print()


if __name__ == "__main__":
    main()
