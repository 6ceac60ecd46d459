"""``make bench``: dinoreg against the convexadam package on the inter-subject brain pair.

Also encodes the 160x192x224 brain with DINOv2 ViT-S (dinoreg-fast, dinoreg, and 4 voxels per
feature) and with the shipped dino3d 3D ViT (4^3 patches) for time and peak memory.

Fixed ``learn2reg_tutorial2019_brain_t1/subject_1``, moving ``voxelmorph_brain_t1/test_scan``,
Dice over the 30 labels of ``voxelmorph_brain_t1/labels.npz``, HD95 (voxels), SDlogJ (Learn2Reg
definitions, ``dinoreg.metrics``). Each case runs in its own process (``cases.py``): wall time of
the registration call, peak resident memory of the whole process (``wait4``). The peer and
``dinoreg-mind`` (the pair whose time ratio is the headline) run ``--repeats`` times, alternating,
and report the median time and the largest peak memory: single runs on a shared 2-core machine
vary by +-30 %. Prints a markdown table with ratios against the peer and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PEER = "convexadam"
REPEATED = ("convexadam", "dinoreg-mind")
DEFAULT_CASES = ["convexadam", "dinoreg-mind", "dinoreg-fast", "dinoreg-ensemble", "dino3d",
                 "encode-dinov2-fast", "encode-dinov2", "encode-dinov2-4vox", "encode-dino3d"]


def run_case(name: str, shared: Path, out: Path, threads: int) -> dict:
    """Run one case in a child process; return seconds and peak RSS (MB)."""
    cmd = [sys.executable, str(HERE / "cases.py"), name, "--shared", str(shared), "--out", str(out),
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench case {name} failed (exit {os.waitstatus_to_exitcode(status)})")
    info = json.loads((out / f"{name}.json").read_text())
    info["peak_mb"] = usage.ru_maxrss / 1024.0  # Linux reports KiB
    return info


def score(name: str, shared: Path, out: Path) -> dict:
    """Learn2Reg metrics of a case's field on the brain pair."""
    from dinoreg.io.images import load_image
    from dinoreg.metrics import evaluate_pair

    path = out / f"{name}.npy"
    if not path.exists():
        return {}
    disp = np.load(path)
    labels = [int(x) for x in np.load(shared / "data/voxelmorph_brain_t1/labels.npz")["labels"]]
    fseg = load_image(shared / "data/learn2reg_tutorial2019_brain_t1/subject_1_seg.nii.gz", dtype=None).array
    mseg = load_image(shared / "data/voxelmorph_brain_t1/test_scan_seg.nii.gz", dtype=None).array
    m = evaluate_pair(disp, fixed_seg=fseg.astype(np.int32), moving_seg=mseg.astype(np.int32), labels=labels)
    return {"dice": m["dice_mean"], "hd95_vox": m["hd95_vox_mean"], "sdlogj": m["sdlogj"],
            "folding": m["folding_fraction"]}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: dict[str, dict]) -> str:
    peer = rows.get(PEER, {})
    lines = ["| case | Dice (30 labels) | HD95 (vox) | SDlogJ | wall s (median; runs) | peak MB | time vs peer | "
             "memory vs peer |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t_ratio = r["seconds"] / peer["seconds"] if peer else None
        m_ratio = r["peak_mb"] / peer["peak_mb"] if peer else None
        wall = f"{r['seconds']:.1f}"
        if len(r.get("seconds_all", [])) > 1:
            wall += " (" + ", ".join(f"{t:.1f}" for t in r["seconds_all"]) + ")"
        lines.append(f"| {name} | {fmt(r.get('dice'), '.4f')} | {fmt(r.get('hd95_vox'), '.3f')} | "
                     f"{fmt(r.get('sdlogj'), '.4f')} | {wall} | {r['peak_mb']:.0f} | "
                     f"{fmt(t_ratio, '.3f')}x | {fmt(m_ratio, '.2f')}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    parser.add_argument("--out", type=Path, default=HERE.parent / "outputs" / "bench")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help=f"runs of {' and '.join(REPEATED)} (median)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.cases}
    for round_ in range(max(1, args.repeats)):
        for name in args.cases:
            if round_ > 0 and name not in REPEATED:
                continue
            print(f"running {name} ({round_ + 1}) ...", flush=True)
            runs[name].append(run_case(name, args.shared, args.out, args.threads))
    rows = {}
    for name, infos in runs.items():
        times = [info["seconds"] for info in infos]
        rows[name] = {"seconds": float(np.median(times)), "seconds_all": times,
                      "peak_mb": max(info["peak_mb"] for info in infos)}
        rows[name].update(score(name, args.shared, args.out))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
