"""``dinoreg pretrain DATA -o OUT``: self-supervised DINO (+ iBOT) training of the 3D ViT.

DATA is a folder of NIfTI/MHA/NRRD volumes (DICOM series folders too) or a Learn2Reg
``dataset.json``; label, segmentation and mask files are skipped. Checkpoints are written to
``OUT/checkpoint.pt`` every ``--checkpoint-every`` steps (temporary name, then rename); rerunning
the same command resumes from the last one. The final teacher backbone is
``OUT/dino3d.safetensors`` (its architecture in the metadata), usable as
``dinoreg register --features dino3d --weights OUT/dino3d.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses

from dinoreg.cli import command


@command("pretrain", "train a 3D ViT with DINO self-distillation on unlabelled volumes (resumable)")
def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="folder of volumes or a Learn2Reg dataset.json")
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoint, log, dino3d.safetensors)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--ibot-weight", type=float, default=1.0, help="masked-patch loss weight (0: DINO only)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("--quiet", action="store_true")


@_pretrain_args.handler
def _pretrain(args: argparse.Namespace) -> int:
    import math

    from dinoreg.errors import DinoregError
    from dinoreg.features.vit3d import ViT3DConfig
    from dinoreg.pipeline import resolve_device
    from dinoreg.pretrain.train import PretrainConfig, pretrain
    from dinoreg.result import check_outdir

    check_outdir(args.output)
    for option in ("steps", "batch_size", "embed_dim", "depth", "heads", "patch_size", "checkpoint_every"):
        if getattr(args, option) < 1:
            raise DinoregError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise DinoregError(f"must be a positive finite number, got {args.lr}", "--lr")
    if not (args.ibot_weight >= 0 and math.isfinite(args.ibot_weight)):
        raise DinoregError(f"must be a finite number >= 0, got {args.ibot_weight}", "--ibot-weight")
    if args.seed < 0:
        raise DinoregError(f"must be >= 0, got {args.seed}", "--seed")
    if args.embed_dim % args.heads:
        raise DinoregError(f"--embed-dim {args.embed_dim} must be a multiple of --heads {args.heads}")

    if args.device is not None:
        resolve_device(args.device)
    model = ViT3DConfig(patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    config = dataclasses.replace(PretrainConfig(), model=model, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, ibot_weight=args.ibot_weight, checkpoint_every=args.checkpoint_every,
                                 seed=args.seed)
    path = pretrain(args.data, config, args.output, resume=not args.no_resume, progress=not args.quiet,
                    device=args.device)
    print(f"weights: {path}")
    return 0
