"""2D study of the B-spline FFD with encoder features in the loss (Kögl, Reithmeir et al., Table 1).

Pairs (the middle slice along the last array axis of each volume, as 2D images):

* ``oasis``: fixed ``learn2reg_tutorial2019_brain_t1/subject_1_vol`` <- moving
  ``voxelmorph_brain_t1/test_scan_vol``, labels ``*_seg``, Dice over the 30 labels of
  ``voxelmorph_brain_t1/labels.npz`` (labels absent from either slice are NaN and skipped);
* ``lapirn``: fixed ``lapirn_brain_t1_pair`` image A <- moving image B, labels 1 and 2;
* ``abdomen``: the abdominal MR -> CT pair of ``benchmarks/abdomen_pair.py`` (built once into
  ``--abdomen-dir``, default ``OUTDIR/abdomen_pair``; 2 mm grid 128 x 112 x 48), axial slice 22
  (the first of the slices where all 7 organs are in both label maps): fixed CT <- moving MR,
  Dice over labels 1-7 (spleen, kidneys, gallbladder, liver, stomach, pancreas).

Each slice keeps its volume's voxel size (``grid_spacing`` is in mm: 1 mm brains, 2 mm abdomen).

Rows: no registration (initial), NCC alone (alpha 0), and for every encoder and feature distance
(``cos``, ``l1``) variant 1 (alpha 1: feature distance alone) and variant 2 (alpha 0.3:
0.7 NCC + 0.3 feature distance). Every row uses the SAME FFD settings (grid spacing, lambda,
learning rate, iterations, levels); only alpha, the encoder and the distance change.

Usage::

    python benchmarks/ffd_study.py OUTDIR [--shared ../shared] [--iterations 20] [--encoders dinov2 litemedsam]

Writes ``OUTDIR/ffd_study.md`` (markdown table) and ``OUTDIR/ffd_study.json`` (all metrics,
settings, seconds per run), updated after every run so a partial study is never lost.
Run with one thread (``OMP_NUM_THREADS=1``) for comparable timings.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

PAIRS = {
    "oasis": dict(fixed="data/learn2reg_tutorial2019_brain_t1/subject_1_vol.nii.gz",
                  fixed_seg="data/learn2reg_tutorial2019_brain_t1/subject_1_seg.nii.gz",
                  moving="data/voxelmorph_brain_t1/test_scan_vol.nii.gz",
                  moving_seg="data/voxelmorph_brain_t1/test_scan_seg.nii.gz",
                  labels="data/voxelmorph_brain_t1/labels.npz"),
    "lapirn": dict(fixed="data/lapirn_brain_t1_pair/image_A_160x192x144.nii.gz",
                   fixed_seg="data/lapirn_brain_t1_pair/image_A_160x192x144_seg.nii.gz",
                   moving="data/lapirn_brain_t1_pair/image_B_160x192x144.nii.gz",
                   moving_seg="data/lapirn_brain_t1_pair/image_B_160x192x144_seg.nii.gz",
                   labels=[1, 2]),
    "abdomen": dict(build="abdomen", fixed="ct.nii.gz", fixed_seg="ct_seg.nii.gz", moving="mr.nii.gz",
                    moving_seg="mr_seg.nii.gz", labels=[1, 2, 3, 4, 5, 6, 7], slice=22),
}
VARIANT2_ALPHA = 0.3  # variant 2's alpha in the table (variant 1: alpha 1)
DISTANCES = ["l1", "cos"]
METRICS = ("dice_mean", "hd95_vox_mean", "sdlogj", "folding_fraction")


def middle_slice(path: Path, labels: bool = False, index: int | None = None):
    """Slice ``index`` (default: the middle one) along the last array axis, as an :class:`Image`
    of shape ``(I, J, 1)`` with the volume's affine (so its voxel size in mm is kept); label maps
    as ``int32``, intensities as ``float32``."""
    from dinoreg.io.images import Image, load_image

    img = load_image(path, dtype=None if labels else np.float32)
    k = img.shape[2] // 2 if index is None else int(index)
    arr = img.array[:, :, k:k + 1]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([0.0, 0.0, k]) + img.affine[:3, 3]
    return Image(np.ascontiguousarray(arr.astype(np.int32) if labels else arr.astype(np.float32)), affine)


def pair_root(shared: Path, spec: dict, abdomen_dir: Path | None) -> Path:
    """Folder the pair's paths are relative to (the abdomen pair is built there once)."""
    if spec.get("build") != "abdomen":
        return shared
    import sys

    folder = Path(abdomen_dir) if abdomen_dir is not None else Path("abdomen_pair")
    if not all((folder / spec[k]).exists() for k in ("fixed", "fixed_seg", "moving", "moving_seg")):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from abdomen_pair import build_abdomen_pair

        build_abdomen_pair(shared, folder)
    return folder


def load_pair(shared: Path, spec: dict, abdomen_dir: Path | None = None) -> dict:
    root = pair_root(shared, spec, abdomen_dir)
    labels = spec["labels"]
    if isinstance(labels, str):
        labels = [int(x) for x in np.load(root / labels)["labels"]]
    k = spec.get("slice")
    return dict(fixed=middle_slice(root / spec["fixed"], index=k), moving=middle_slice(root / spec["moving"], index=k),
                fixed_seg=middle_slice(root / spec["fixed_seg"], True, k),
                moving_seg=middle_slice(root / spec["moving_seg"], True, k), labels=labels)


def initial_metrics(pair: dict) -> dict:
    from dinoreg.metrics import evaluate_pair

    disp = np.zeros((*pair["fixed"].shape, 3), np.float32)
    return evaluate_pair(disp, pair["fixed_seg"].array, pair["moving_seg"].array, labels=pair["labels"])


def run_one(pair: dict, settings: dict, encoder: str | None, alpha: float, distance: str) -> dict:
    import dinoreg

    t0 = time.perf_counter()
    res = dinoreg.register(pair["fixed"], pair["moving"], preset_name="ffd", device="cpu", progress=False,
                           features=encoder, alpha=alpha, feature_distance=distance,
                           feature_upsample=settings["feature_upsample"].get(encoder or "none", 1.0),
                           feature_layer=settings["feature_layer"].get(encoder or "none", 0),
                           grid_spacing=settings["grid_spacing"], reg_weight=settings["reg_weight"],
                           lr=settings["lr"], iterations=settings["iterations"], levels=tuple(settings["levels"]),
                           fixed_labels=pair["fixed_seg"], moving_labels=pair["moving_seg"],
                           eval_labels=pair["labels"])
    out = {k: res.metrics.get(k) for k in METRICS}
    out["seconds"] = time.perf_counter() - t0
    return out


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def markdown(rows: list[dict], pairs: list[str]) -> str:
    head = ["encoder", "variant"]
    for p in pairs:
        head += [f"Dice {p}", f"HD95 {p} (vox)", f"SDlogJ {p}", f"s {p}"]
    head += ["mean Dice"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["encoder"], r["variant"]]
        dices = []
        for p in pairs:
            m = r["pairs"].get(p)
            if m is None:
                cells += ["…", "…", "…", "…"]
                continue
            dices.append(m["dice_mean"])
            sd = "-" if r["variant"] == "initial" else _fmt(m["sdlogj"])
            secs = f"{m['seconds']:.0f}" if "seconds" in m else "-"
            cells += [_fmt(m["dice_mean"], 4), _fmt(m["hd95_vox_mean"], 2), sd, secs]
        cells.append(_fmt(float(np.mean(dices)), 4) if len(dices) == len(pairs) else "…")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ncc_best(path: Path, pairs: list[str], max_sdlogj: float | None = None) -> dict[str, dict]:
    """Per pair, NCC alone's best run (highest Dice; SDlogJ <= ``max_sdlogj`` when given) in a
    ``ffd_sweep.py`` results file."""
    best: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if max_sdlogj is not None and not r["sdlogj"] <= max_sdlogj:
            continue
        if r["alpha"] == 0 and r["pair"] in pairs and (r["pair"] not in best
                                                       or r["dice_mean"] > best[r["pair"]]["dice_mean"]):
            best[r["pair"]] = r
    return best


def main(argv=None) -> None:
    from dinoreg.methods.ffd import FFDSpec

    d = FFDSpec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="output folder (ffd_study.md, ffd_study.json)")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--abdomen-dir", default=None, help="where the abdomen pair is built (default OUTDIR/abdomen_pair)")
    parser.add_argument("--encoders", nargs="+", default=["dinov2"])
    parser.add_argument("--distances", nargs="+", default=["cos"], choices=DISTANCES)
    parser.add_argument("--pairs", nargs="+", default=["oasis", "abdomen", "lapirn"], choices=list(PAIRS))
    parser.add_argument("--iterations", type=int, default=d.iterations)
    parser.add_argument("--levels", type=int, nargs="+", default=list(d.levels))
    parser.add_argument("--grid-spacing", type=float, default=d.grid_spacing, help="control spacing, mm")
    parser.add_argument("--reg-weight", type=float, default=d.reg_weight)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--variant2-alpha", type=float, default=VARIANT2_ALPHA)
    parser.add_argument("--dinov2-upsample", type=float, default=d.feature_upsample)
    parser.add_argument("--feature-layer", type=int, default=d.feature_layer, help="dinov2 block (0: last)")
    parser.add_argument("--ncc-sweep", help="ffd_sweep.py results (ffd_sweep.jsonl): add NCC alone at its best "
                                            "settings per pair (the best Dice of the sweep, re-run here)")
    parser.add_argument("--ncc-max-sdlogj", type=float, default=0.15,
                        help="--ncc-sweep: only settings whose SDlogJ stays <= this (plausible fields)")
    parser.add_argument("--ncc-only", action="store_true", help="initial + NCC rows only (for tuning)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    shared = Path(args.shared)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(iterations=args.iterations, levels=args.levels, grid_spacing=args.grid_spacing,
                    reg_weight=args.reg_weight, lr=args.lr, image_distance="ncc",
                    feature_upsample={"dinov2": args.dinov2_upsample, "none": 1.0},
                    feature_layer={"dinov2": args.feature_layer}, threads=args.threads)
    abdomen = Path(args.abdomen_dir) if args.abdomen_dir else out / "abdomen_pair"
    pairs = {name: load_pair(shared, PAIRS[name], abdomen) for name in args.pairs}
    rows = [dict(encoder="no encoder", variant="initial", pairs={})]
    jobs = []
    if args.ncc_sweep:
        best = ncc_best(Path(args.ncc_sweep), args.pairs, args.ncc_max_sdlogj)
        row = dict(encoder="no encoder", variant="NCC, its best settings per pair", pairs={},
                   settings={p: {k: best[p][k] for k in ("grid_spacing", "reg_weight", "iterations", "lr", "levels")}
                             for p in best})
        rows.append(row)
        jobs += [(row, None, 0.0, "cos", {p: {**settings, **row["settings"][p]} for p in best})]
    rows.append(dict(encoder="no encoder", variant="NCC", pairs={}))
    jobs.append((rows[-1], None, 0.0, "cos", None))
    if not args.ncc_only:
        for enc in args.encoders:
            for vname, alpha in (("variant 1", 1.0), ("variant 2", args.variant2_alpha)):
                for dist in args.distances:
                    label = dist.upper().replace("COS", "Cos") + ("" if alpha == 1.0 else f" + NCC, alpha {alpha:g}")
                    row = dict(encoder=enc, variant=f"{vname}: {label}", alpha=alpha, distance=dist, pairs={})
                    rows.append(row)
                    jobs.append((row, enc, alpha, dist, None))
        # run variant 2 (the comparison that matters) before variant 1, table order unchanged
        jobs.sort(key=lambda job: 0 if job[2] < 1.0 else 1)
    t_start = time.perf_counter()

    def save() -> None:
        payload = dict(settings=settings, pairs={k: PAIRS[k] for k in args.pairs}, rows=rows,
                       wall_seconds=time.perf_counter() - t_start)
        (out / "ffd_study.json").write_text(json.dumps(payload, indent=2, default=lambda v: None))
        (out / "ffd_study.md").write_text(markdown(rows, args.pairs))

    for name, pair in pairs.items():
        rows[0]["pairs"][name] = {k: initial_metrics(pair).get(k) for k in METRICS}
    save()
    for row, enc, alpha, dist, per_pair in jobs:
        for name, pair in pairs.items():
            if per_pair is not None and name not in per_pair:
                continue
            row["pairs"][name] = run_one(pair, settings if per_pair is None else per_pair[name], enc, alpha, dist)
            print(f"{row['encoder']:>10} {row['variant']:<22} {name:<7} "
                  f"Dice {_fmt(row['pairs'][name]['dice_mean'], 4)} "
                  f"HD95 {_fmt(row['pairs'][name]['hd95_vox_mean'], 2)} "
                  f"SDlogJ {_fmt(row['pairs'][name]['sdlogj'])} "
                  f"({row['pairs'][name]['seconds']:.0f} s)", flush=True)
            save()
    save()
    print(markdown(rows, args.pairs))
    print(f"wall time {time.perf_counter() - t_start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
