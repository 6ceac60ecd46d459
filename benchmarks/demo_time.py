"""End-to-end time of the demo command against its compute (README, *What the metrics and the
outputs cost*; issue 12 item 5: the whole command under 2x encode + optimise).

    python benchmarks/demo_time.py [--shared ../shared] [--runs 4] [--versus OTHER_SRC]

Runs ``python -m dinoreg register`` on the brain pair of ``make demo`` (``--quiet``, a fresh
output folder each time) and reports, per run, the wall seconds of the whole process, the
encode + optimise seconds the command prints, and their ratio. With ``--versus``, the source tree
``OTHER_SRC`` (e.g. an old checkout's ``src``) runs alternately with this one on the same cores,
so both see the same machine; give that tree one warm-up run first (numba caches per source path).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_LINE = re.compile(r"^time: [\d.]+ s \(encode ([\d.]+) s, optimise ([\d.]+) s\)", re.MULTILINE)


def demo_args(data: Path, out: Path) -> list[str]:
    """The ``register`` arguments of ``make demo``, writing into ``out``."""
    fixed, moving = data / "learn2reg_tutorial2019_brain_t1", data / "voxelmorph_brain_t1"
    return ["register", str(fixed / "subject_1_vol.nii.gz"), str(moving / "test_scan_vol.nii.gz"), "-o", str(out),
            "--fixed-labels", str(fixed / "subject_1_seg.nii.gz"), "--moving-labels",
            str(moving / "test_scan_seg.nii.gz"), "--labels", str(moving / "labels.npz"), "--quiet"]


def compute_seconds(stdout: str) -> float:
    """Encode + optimise seconds from the command's ``time:`` line."""
    match = TIME_LINE.search(stdout)
    if match is None:
        raise ValueError(f"no 'time:' line in the command's output:\n{stdout}")
    return float(match.group(1)) + float(match.group(2))


def run_once(src: Path, data: Path) -> tuple[float, float]:
    """``(wall seconds, compute seconds)`` of one demo command with ``src`` on ``PYTHONPATH``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory(prefix="dinoreg-demo-time-") as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dinoreg", *demo_args(data, Path(tmp) / "out")], env=env,
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
    return wall, compute_seconds(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--versus", type=Path, help="another source tree to alternate with (its src folder)")
    args = parser.parse_args(argv)
    trees = [("this", REPO / "src")] + ([("versus", args.versus)] if args.versus else [])
    ratios: dict[str, list[float]] = {name: [] for name, _ in trees}
    print("| run | tree | wall s | encode + optimise s | ratio |\n|---|---|---|---|---|")
    for run in range(1, args.runs + 1):
        for name, src in trees:
            wall, compute = run_once(src, args.shared / "data")
            ratios[name].append(wall / compute)
            print(f"| {run} | {name} | {wall:.2f} | {compute:.2f} | {wall / compute:.2f}x |", flush=True)
    for name, values in ratios.items():
        print(f"{name}: ratio median {statistics.median(values):.2f}x, range {min(values):.2f}-{max(values):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
