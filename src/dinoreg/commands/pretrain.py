"""``dinoreg pretrain DATA... -o OUT``: self-supervised training of the 3D ViT (DINO + iBOT + dense
correspondence InfoNCE on deformed, re-contrasted pairs; synthetic contrasts from label maps).

Each DATA is a folder of NIfTI/MHA/NRRD volumes (DICOM series folders too), one such file or
DICOM folder, or a Learn2Reg ``dataset.json``; label, segmentation and mask files are skipped.
``--synth-labels`` adds label maps (files, or folders searched for seg/label/mask files) that are
rendered as random synthetic contrasts. Checkpoints are written to
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
    p.add_argument("data", nargs="+", help="folders of volumes, volume files or Learn2Reg dataset.json files")
    p.add_argument("--synth-labels", nargs="+", default=[], metavar="LABELS",
                   help="label maps (files or folders) rendered as synthetic contrasts")
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoint, log, dino3d.safetensors)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=150, help="linear learning-rate warm-up, steps")
    p.add_argument("--teacher-temp-warmup", type=int, default=300,
                   help="steps over which the teacher temperature rises from 0.04 to 0.07")
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--ibot-weight", type=float, default=1.0, help="masked-patch loss weight (0: off)")
    p.add_argument("--dino-weight", type=float, default=1.0, help="class-token DINO loss weight (0: off)")
    p.add_argument("--dense-weight", type=float, default=1.0,
                   help="dense correspondence InfoNCE weight (0 with --views multicrop: the plain DINO recipe)")
    p.add_argument("--koleo-weight", type=float, default=0.1, help="KoLeo weight on class tokens (0: off)")
    p.add_argument("--centering", choices=("sinkhorn", "ema"), default="sinkhorn", help="teacher centring")
    p.add_argument("--views", choices=("pairs", "multicrop"), default="pairs",
                   help="pairs: deformed, re-contrasted pairs with known correspondence; multicrop: DINO crops")
    p.add_argument("--same-contrast", type=float, default=0.0,
                   help="probability that both views of a pair share one contrast (mono-modal pairs)")
    p.add_argument("--global-size", type=int, default=32, help="edge of the global views, voxels")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--snapshots", action="store_true",
                   help="also write the teacher backbone at every checkpoint (OUT/snapshots/)")
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
    from dinoreg.pretrain.augment import AugmentConfig
    from dinoreg.pretrain.synth import SynthConfig
    from dinoreg.pretrain.data import list_label_maps, list_volumes, load_label_maps, load_volumes
    from dinoreg.pretrain.train import PretrainConfig, pretrain
    from dinoreg.result import check_outdir

    check_outdir(args.output)
    for option in ("steps", "batch_size", "embed_dim", "depth", "heads", "patch_size", "checkpoint_every",
                   "global_size"):
        if getattr(args, option) < 1:
            raise DinoregError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise DinoregError(f"must be a positive finite number, got {args.lr}", "--lr")
    for option in ("ibot_weight", "dino_weight", "dense_weight", "koleo_weight"):
        value = getattr(args, option)
        if not (value >= 0 and math.isfinite(value)):
            raise DinoregError(f"must be a finite number >= 0, got {value}", f"--{option.replace('_', '-')}")
    if args.seed < 0:
        raise DinoregError(f"must be >= 0, got {args.seed}", "--seed")
    if args.embed_dim % args.heads:
        raise DinoregError(f"--embed-dim {args.embed_dim} must be a multiple of --heads {args.heads}")
    if args.global_size % args.patch_size or args.global_size % 2:
        raise DinoregError(f"--global-size {args.global_size} must be an even multiple of --patch-size")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.device is not None:
        resolve_device(args.device)

    model = ViT3DConfig(patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
                        window=max(args.global_size, 48 // args.patch_size * args.patch_size))
    augment = dataclasses.replace(AugmentConfig(), global_size=args.global_size,
                                  local_size=max(args.patch_size, args.global_size // 2 // args.patch_size * args.patch_size))
    if args.warmup_steps < 0 or args.teacher_temp_warmup < 0:
        raise DinoregError("--warmup-steps and --teacher-temp-warmup must be >= 0")
    if not 0.0 <= args.same_contrast <= 1.0:
        raise DinoregError(f"--same-contrast must be in [0, 1], got {args.same_contrast}")
    synth = dataclasses.replace(SynthConfig(), same_contrast_prob=args.same_contrast)
    config = PretrainConfig(model=model, augment=augment, synth=synth, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=args.warmup_steps, teacher_temp_warmup=args.teacher_temp_warmup,
                            ibot_weight=args.ibot_weight, dino_weight=args.dino_weight, dense_weight=args.dense_weight,
                            koleo_weight=args.koleo_weight, centering=args.centering, views=args.views,
                            checkpoint_every=args.checkpoint_every, seed=args.seed)
    paths = [p for source in args.data for p in list_volumes(source)]
    volumes = load_volumes(list(dict.fromkeys(paths)), progress=not args.quiet)
    labels = load_label_maps(list_label_maps(args.synth_labels)) if args.synth_labels else []
    path = pretrain(volumes, config, args.output, resume=not args.no_resume, progress=not args.quiet,
                    device=args.device, label_maps=labels, snapshots=args.snapshots)
    print(f"weights: {path}")
    return 0
