"""Train the shipped dino3d checkpoint on every unlabelled volume of ../shared/data (1 CPU thread).

Usage: PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/train_dino3d_shareddata.py DATA OUT_DIR [STEPS]
(re-running the same command resumes from OUT_DIR/checkpoint.pt).
"""

import sys
from dataclasses import replace

import torch

from dinoreg.pretrain.data import list_volumes, load_volumes
from dinoreg.pretrain.train import PretrainConfig, pretrain

if __name__ == "__main__":
    torch.set_num_threads(1)
    data, out_dir = sys.argv[1], sys.argv[2]
    # the recipe of the shipped smoke-test weights: DINO + iBOT on multi-crops of the real volumes
    config = PretrainConfig(views="multicrop", dense_weight=0.0, koleo_weight=0.0, centering="ema", out_dim=1024)
    if len(sys.argv) > 3:
        config = replace(config, steps=int(sys.argv[3]))
    paths = list_volumes(data)
    print("\n".join(str(p) for p in paths), flush=True)
    volumes = load_volumes(paths, progress=False)
    print(f"{len(volumes)} volumes: {[tuple(v.shape) for v in volumes]}", flush=True)
    weights = pretrain(volumes, config, out_dir, resume=True, progress=False)
    print(f"wrote {weights}", flush=True)
