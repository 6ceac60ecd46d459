"""Time DINOv2 slicewise encoding of one brain volume for several (upsample, every) settings.

Usage (one setting per process so that peak RSS is per setting)::

    PYTHONPATH=src python benchmarks/slicewise_timing.py --threads 2 --upsample 2 --every 6

Prints one markdown table row: arch, upsample, every, threads, wall seconds, CPU seconds / threads
(what the wall time would be on otherwise idle cores), encoded slices, feature grid, peak RSS,
1-minute load average of the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from dinoreg.features.dinov2 import load_dinov2
from dinoreg.features.slicewise import default_slice_axis, encode_volume
from dinoreg.io.images import load_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default=str(SHARED / "data/voxelmorph_brain_t1/test_scan_vol.nii.gz"))
    parser.add_argument("--weights", default=str(SHARED / "weights/dinov2_vits14_imgfocus"))
    parser.add_argument("--arch", default="vits14")
    parser.add_argument("--upsample", type=float, default=3.0)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = load_image(args.image)
    model = load_dinov2(args.arch, args.weights, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu0 = time.perf_counter(), time.process_time()
    out = encode_volume(image.array, model, default_slice_axis(image.affine), upsample=args.upsample,
                        every=args.every, batch_size=args.batch_size, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {args.arch} | x{args.upsample:g} | {args.every} | {args.threads} | {seconds:.1f} | "
          f"{cpu / args.threads:.1f} | "
          f"{len(out.slice_indices)} | {out.grid_shape} | {rss:.0f} MB | {os.getloadavg()[0]:.1f} |",
          flush=True)


if __name__ == "__main__":
    main()
