"""Time and peak memory of encoding one 160x192x224 volume with dino3d (CPU).

Usage: PYTHONPATH=src python scripts/dino3d_encode_bench.py WEIGHTS THREADS OVERLAP [WINDOW]
Run once per setting (peak RSS is per process). Prints seconds, peak RSS (MiB) and the shape.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from dinoreg.features.vit3d import Dino3DEncoder


def main() -> None:
    weights, threads, overlap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    window = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(threads)
    enc = Dino3DEncoder.from_file(weights, overlap=overlap, window=window)
    vol = torch.rand(160, 192, 224)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    feats = enc.encode(vol)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"threads={threads} window={enc.window} overlap={overlap}: {sec:.1f} s, peak RSS {peak:.0f} MiB "
          f"(before encode {base:.0f} MiB), features {tuple(feats.shape)}")


if __name__ == "__main__":
    main()
