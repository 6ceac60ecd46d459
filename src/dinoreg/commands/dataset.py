"""``dinoreg dataset``: register and score every pair of a Learn2Reg split (resumable)."""

from __future__ import annotations

import argparse

from dinoreg.cli import add_set_option, command, parse_label_list, parse_overrides
from dinoreg.errors import DinoregError


@command("dataset", "register and score every pair of a Learn2Reg dataset split (resumable)")
def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_json", help="Learn2Reg dataset.json (or its folder)")
    p.add_argument("--split", default="val", choices=["val", "test", "train-pairs"],
                   help="registration_val, registration_test or training_paired_images")
    p.add_argument("-o", "--output", required=True, help="output folder (fields, records, tables, QC)")
    p.add_argument("--preset", default="mind", help="settings bundle (mind, convexadam, dinoreg, ...)")
    add_set_option(p)
    p.add_argument("--labels", help="labels to score: comma list or .npz/.txt (default: dataset.json labels)")
    p.add_argument("--workers", type=int, default=1, help="pairs in parallel (default 1, in this process)")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local processes (default) or Ray tasks")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: all cores, shared between workers)")
    p.add_argument("--cache-dir", help="feature cache folder (encoder outputs reused across pairs and runs)")
    p.add_argument("--cache-size-gb", type=float, default=10.0, help="feature cache size limit (LRU), GB")
    p.add_argument("--cache-float16", action="store_true", help="store cached features as float16")
    p.add_argument("--no-qc", action="store_true", help="skip the QC figure per pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@_dataset_args.handler
def _dataset(args: argparse.Namespace) -> int:
    from dinoreg.dataset import RunConfig, run_dataset, summary_lines
    from dinoreg.pipeline import resolve_device
    from dinoreg.presets import resolve
    from dinoreg.result import check_outdir

    overrides = parse_overrides(args.overrides)
    check_outdir(args.output)
    resolve(args.preset, {**overrides, "seed": args.seed})  # bad settings: one error before any work
    resolve_device(args.device)
    labels = parse_label_list(args.labels)
    config = RunConfig(outdir=args.output, preset=args.preset, overrides=overrides,
                       eval_labels=tuple(labels) if labels else None, device=args.device, seed=args.seed,
                       qc=not args.no_qc)
    if not 0 < args.cache_size_gb < 2**20:  # also NaN and Inf
        raise DinoregError(f"must be a positive number of GB, got {args.cache_size_gb}", "--cache-size-gb")
    if args.workers < 1 or args.threads < 0:
        raise DinoregError("--workers must be >= 1 and --threads >= 0")
    summary = run_dataset(args.dataset_json, args.split, config, workers=args.workers, executor=args.executor,
                          ray_address=args.ray_address, cache_dir=args.cache_dir,
                          cache_bytes=int(args.cache_size_gb * 2**30), cache_half=args.cache_float16,
                          threads=args.threads, progress=not args.quiet)
    for line in summary_lines(summary):
        print(line)
    print(f"tables: {args.output}/metrics.csv, summary.csv, summary.json")
    if summary["failed"]:
        first = summary["failed"][0]
        raise DinoregError(f"{len(summary['failed'])} pair(s) failed (rerun to retry); first: "
                           f"{first['pair']}: {first['error']}", args.output)
    return 0
