"""Compile (or load from numba's cache) every fused CPU kernel once, so the first real
registration does not pay the compilation (about 20 s on 2 cores); ``make setup`` runs it."""

from __future__ import annotations

import time

import numpy as np
import torch


def warm_up() -> float:
    """Register a small synthetic pair with the ``mind`` preset (and its MI level) and call the generic
    SSD-gradient kernel, the edge check's kernel and the metrics' NDV, distance-transform,
    label-count and label-box kernels; returns the seconds it took."""
    from dinoreg import jit
    from dinoreg.api import register
    from dinoreg.edt import distance_to
    from dinoreg.metrics import label_boxes, label_counts
    from dinoreg.ndv import ndv_map
    from dinoreg.optim import cpu_kernels
    from dinoreg.optim.edges import EdgeAlignment

    start = time.perf_counter()
    grid = np.indices((24, 26, 28), dtype=np.float32)
    fixed = np.sin(grid[0] / 3.0) * np.cos(grid[1] / 4.0) + grid[2] / 28.0
    moving = np.roll(fixed, 1, axis=0)
    register(fixed, moving, preset_name="mind", device="cpu", progress=False, iterations=2,
             mi_iterations=1, mi_samples=100, mi_min_correlation=-1,  # the MI level's kernels, whatever the gate
             mi_base_smoothing=3)  # and the mean filter of final_smoothing / mi_base_smoothing
    # the generic (not 12-channel) SSD-gradient kernel that learned encoders' features use
    features = np.ascontiguousarray(np.stack([fixed] * 5, axis=-1))
    cpu_kernels.ssd_gradient(features, features, torch.zeros(1, 3, *fixed.shape))
    zero = torch.zeros(1, 3, *fixed.shape)  # the MI level's edge check (pairs of different contrasts)
    EdgeAlignment(fixed.astype(np.float32), moving.astype(np.float32), np.arange(10), zero).score(zero)
    ndv_map(np.zeros((4, 4, 4, 3), np.float32))  # the metrics' exact NDV kernel
    distance_to(np.eye(4, dtype=bool)[None].repeat(3, 0), (1.0, 1.0, 1.0))  # HD95's distance transform
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.int64):  # the label types Dice and HD95 read
        label_counts(np.ones(3, dtype))
        label_boxes(np.ones((2, 2, 2), dtype))
    jit.wait_for_preload()  # register started it: its probe is cached too
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"dinoreg: CPU kernels compiled ({warm_up():.0f} s)")
