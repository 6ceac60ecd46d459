"""Do foundation-model features earn their place? Every foundation preset against MIND (issue 11).

Cases (all on ../shared/data):
  abdomen        inter-patient abdominal MR -> CT built the Learn2Reg way (benchmarks/abdomen_pair.py);
                 Dice over labels 1-7 (spleen, kidneys, gallbladder, liver, stomach, pancreas)
  brain          learn2reg subject_1 <- voxelmorph test_scan, Dice over the 30 labels
  brain-shift    the same, moving content shifted 30 voxels along the axial axis
  brats-t2-t1ce, brats-flair-t1   BraTS-Reg 002 cross-sequence, TRE of the 6 landmarks (mm)

Methods: ``identity`` (zero field), ``mind`` and every foundation preset, each foundation preset
also without its slice-match start (``<preset> -sm``), so the global (slice match) and the dense
(feature) contributions are seen apart. Each run is a child process: seconds (register call,
inputs on disk) and its own peak RSS.

Usage: python benchmarks/features_study.py --shared ../shared --out outputs/features_study \
           [--cases abdomen brain ...] [--methods mind dinoreg dinoreg-fast ...]
Appends one JSON line per run to OUT/results.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = ["abdomen", "brain", "brain-shift", "brats-t2-t1ce", "brats-flair-t1"]
FOUNDATION = ["dinoreg", "dinoreg-fast", "dinoreg-ensemble", "mind features=dino3d lambda_weight=5 iterations=40"]
USES_SLICE_MATCH = {"dinoreg", "dinoreg-fast", "dinoreg-ensemble", "dinoreg-paper"}


def default_methods() -> list[str]:
    methods = ["identity", "mind"]
    for name in FOUNDATION:
        methods.append(name)
        if name in USES_SLICE_MATCH:
            methods.append(f"{name} -sm")
    return methods


def case_inputs(case: str, shared: Path, out: Path) -> dict:
    """Register keyword arguments of a case (files built under ``out`` where needed)."""
    if case == "abdomen":
        from abdomen_pair import LABELS, build_abdomen_pair

        paths = build_abdomen_pair(shared, out / "abdomen_pair")
        return dict(fixed=paths["fixed"], moving=paths["moving"], fixed_labels=paths["fixed_labels"],
                    moving_labels=paths["moving_labels"], eval_labels=LABELS)
    from dinoreg_study import case_inputs as brain_and_brats

    return brain_and_brats(case, shared, out)


def method_settings(method: str) -> dict:
    """``register`` keywords of a study method: ``PRESET [-sm] [key=value ...]`` (``-sm``: no slice
    match; a value is read as JSON when it parses, else kept as a string, e.g.
    ``dino3d weights=run/dino3d.safetensors pca_components=16``)."""
    name, *flags = method.split()
    settings: dict = {"preset_name": name}
    for flag in flags:
        if flag == "-sm":
            settings["slice_match"] = False
            continue
        key, _, value = flag.partition("=")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


def run_one(case: str, method: str, shared: Path, out: Path) -> dict:
    """One registration (in this process): metrics and seconds."""
    import dinoreg
    inputs = case_inputs(case, shared, out)
    fixed, moving = inputs.pop("fixed"), inputs.pop("moving")
    start = time.perf_counter()
    timings: dict = {}
    if method == "identity":  # the zero field, scored exactly as register scores
        from dinoreg.io.images import load_image

        zero = np.zeros((*load_image(fixed).shape, 3), np.float32)
        m = dinoreg.evaluate(zero, inputs.get("fixed_labels"), inputs.get("moving_labels"), fixed=fixed,
                             moving=moving, fixed_landmarks=inputs.get("fixed_landmarks"),
                             moving_landmarks=inputs.get("moving_landmarks"),
                             landmarks_space=inputs.get("landmarks_space", "voxel"), eval_labels=inputs.get("eval_labels"))
    else:
        result = dinoreg.register(fixed, moving, progress=False, device="cpu", **inputs, **method_settings(method))
        m, timings = result.metrics or {}, result.timings
    seconds = time.perf_counter() - start
    return dict(case=case, method=method, seconds=round(seconds, 1), encode_s=round(timings.get("encode", 0), 1),
                dice=m.get("dice_mean"), tre_mm=m.get("tre_mm_mean"), sdlogj=m.get("sdlogj"),
                folding=m.get("folding_fraction"))


def child(case: str, method: str, shared: Path, out: Path, threads: int) -> dict:
    """Run one (case, method) in a fresh process; add its peak RSS (MB)."""
    cmd = [sys.executable, __file__, "--child", case, method, "--shared", str(shared), "--out", str(out),
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return dict(case=case, method=method, error=f"exit {os.waitstatus_to_exitcode(status)}")
    row = json.loads((out / "child.json").read_text())
    row["peak_mb"] = round(usage.ru_maxrss / 1024.0)
    row["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| case | method | Dice | TRE (mm) | SDlogJ | folding | s | CPU s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['method']} | {f(r['dice'], '.4f')} | {f(r['tre_mm'], '.2f')} | "
                     f"{f(r['sdlogj'], '.3f')} | {f(r['folding'], '.5f')} | {r['seconds']} | {r.get('cpu_s', '-')} | "
                     f"{r.get('peak_mb', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=HERE.parents[1] / "shared")
    parser.add_argument("--out", type=Path, default=Path("outputs/features_study"))
    parser.add_argument("--cases", nargs="*", default=CASES)
    parser.add_argument("--methods", nargs="*", default=default_methods())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DINOREG_WEIGHTS_DIR", str(args.shared.resolve() / "weights"))
    os.environ.setdefault("DINOREG_OFFLINE", "1")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        row = run_one(*args.child, args.shared.resolve(), args.out)
        (args.out / "child.json").write_text(json.dumps(row))
        return
    from dinoreg_study import run_grid

    rows = run_grid(args.cases, args.methods,
                    lambda case, method: child(case, method, args.shared.resolve(), args.out, args.threads),
                    args.out / "results.jsonl")
    print(table(rows))


if __name__ == "__main__":
    main()
