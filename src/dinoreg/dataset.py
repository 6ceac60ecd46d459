"""Register and score every pair of a Learn2Reg dataset split, resumably.

Output folder layout (``OUTDIR``)::

    disp_<fix>_<mov>.nii.gz ...   Learn2Reg fields (the folder can be zipped for submission)
    pairs/<stem>.json             per-pair record: status, paths, metrics, timings — written
                                  atomically *last*, so it is the "done" marker
    qc/<stem>.png                 QC figure per pair (``qc=True``)
    runs.jsonl                    append-only log: one ``start`` and one ``done``/``failed``
                                  line per attempt (pid, time)
    metrics.csv                   one row per finished pair, every scalar metric
    summary.csv, summary.json     mean, std, "30" (30th percentile, the Learn2Reg statistic), n
    report.html                   written by ``dinoreg report`` (see :mod:`dinoreg.report`)

A pair counts as finished only when its record says ``done`` and its field exists; every file
is written under a temporary name and renamed, so a run killed at any moment leaves either a
finished pair or nothing usable for it, and a rerun redoes only unfinished pairs. One run at a
time per folder (a lock file; the lock dies with the process).

Evaluation follows Learn2Reg: labels (``labelsTr``) give Dice/HD95 over the dataset's labels
(``labels`` in dataset.json, background skipped) or ``eval_labels``; masks (``masksTr``) restrict
SDlogJ/folding and serve as registration masks; keypoints (``keypointsTr``, CSV of voxel
coordinates) give TRE.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dinoreg.errors import DinoregError
from dinoreg.io.atomic import atomic_write, remove_stale_temporaries, write_json_atomic
from dinoreg.io.learn2reg import Pair, load_dataset

RECORDS = "pairs"
QC = "qc"
RUN_LOG = "runs.jsonl"
_LOCK = ".dinoreg-dataset.lock"


@dataclass(frozen=True)
class RunConfig:
    """Settings shared by every pair of a run (picklable: sent to worker processes)."""

    outdir: str
    preset: str = "mind"
    overrides: dict[str, Any] = field(default_factory=dict)
    eval_labels: tuple[int, ...] | None = None
    device: str = "auto"
    seed: int = 0
    qc: bool = True


@dataclass(frozen=True)
class PairJob:
    """One pair to register: its position in the split, its files and the run settings."""

    index: int
    pair: Pair
    config: RunConfig

    @property
    def stem(self) -> str:
        return pair_stem(self.pair)


def pair_stem(pair: Pair) -> str:
    """``disp_0001_0002.nii.gz`` -> ``0001_0002``: the pair's name in records and pictures."""
    name = pair.disp_name
    return name[len("disp_"):-len(".nii.gz")] if name.endswith(".nii.gz") else name[len("disp_"):]


def record_path(outdir: str | os.PathLike, stem: str) -> Path:
    return Path(outdir) / RECORDS / f"{stem}.json"


# --------------------------------------------------------------------------- small file helpers

def _log_event(outdir: str | os.PathLike, event: str, stem: str, **extra: Any) -> None:
    """Append one line to ``runs.jsonl`` (O_APPEND: lines from several workers do not mix)."""
    line = json.dumps({"event": event, "pair": stem, "pid": os.getpid(),
                       "time": datetime.datetime.now().isoformat(timespec="seconds"), **extra})
    fd = os.open(Path(outdir) / RUN_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_record(outdir: str | os.PathLike, stem: str) -> dict[str, Any] | None:
    """The finished record of a pair, or ``None`` (absent, unreadable, or its field missing)."""
    path = record_path(outdir, stem)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("status") != "done" or not (Path(outdir) / record.get("disp", "")).is_file():
        return None
    return record


def read_run_log(outdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of ``runs.jsonl`` (a line cut by a kill is skipped)."""
    path = Path(outdir) / RUN_LOG
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


@contextlib.contextmanager
def folder_lock(outdir: Path) -> Iterator[None]:
    """Exclusive lock on ``outdir`` for one run; released when the process ends, even by a kill."""
    with open(outdir / _LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DinoregError("another 'dinoreg dataset' run is writing into this folder", outdir) from exc
        yield


def _remove_stale_temporaries(outdir: Path) -> None:
    """Drop temporary files a killed run left behind (any owner: we hold the folder lock)."""
    for folder in (outdir, outdir / RECORDS, outdir / QC):
        remove_stale_temporaries(folder, any_owner=True)


# --------------------------------------------------------------------------- one pair (in a worker)

def worker_init(cache_dir: str | None, cache_bytes: int, cache_half: bool, threads: int) -> None:
    """Per-worker set-up: torch threads and the feature cache."""
    import torch

    from dinoreg.cache import activate

    if threads > 0:
        torch.set_num_threads(threads)
    if cache_dir is not None:
        activate(cache_dir, cache_bytes, cache_half)


def _register_pair(job: PairJob) -> dict[str, Any]:
    """Register one pair, write its field (and QC figure); returns the record (not yet written)."""
    from dinoreg.api import register
    from dinoreg.io.images import save_image
    from dinoreg.metrics import to_jsonable

    p, cfg, out = job.pair, job.config, Path(job.config.outdir)
    result = register(p.fixed, p.moving, preset_name=cfg.preset, fixed_mask=p.fixed_mask, moving_mask=p.moving_mask,
                      fixed_labels=p.fixed_label if p.moving_label else None,
                      moving_labels=p.moving_label if p.fixed_label else None,
                      fixed_landmarks=p.fixed_keypoints if p.moving_keypoints else None,
                      moving_landmarks=p.moving_keypoints if p.fixed_keypoints else None,
                      landmarks_space="voxel", eval_labels=list(cfg.eval_labels) if cfg.eval_labels else None,
                      device=cfg.device, seed=cfg.seed, progress=False, **cfg.overrides)
    metrics = result.metrics
    if metrics is None:  # nothing to compare: still report the field's regularity
        from dinoreg.metrics import evaluate_pair

        metrics = evaluate_pair(result.disp)
    save_image(result.disp, result.fixed.affine, out / p.disp_name)
    qc_rel = None
    if cfg.qc:
        from dinoreg.qc import qc_figure

        qc_rel = f"{QC}/{job.stem}.png"
        qc_figure(result.fixed.array, _moving_on_fixed_grid(p, result.fixed), result.warped, result.disp,
                  out / qc_rel, title=job.stem, spacing=tuple(float(s) for s in result.fixed.spacing),
                  affine=result.fixed.affine)
    return {"status": "done", "index": job.index, "pair": job.stem, "fixed": str(p.fixed), "moving": str(p.moving),
            "disp": p.disp_name, "qc": qc_rel, "preset": cfg.preset, "overrides": to_jsonable(cfg.overrides),
            "settings": result.settings,
            "metrics": to_jsonable(metrics), "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def _moving_on_fixed_grid(pair: Pair, fixed: Any) -> Any:
    from dinoreg.io.images import load_image, to_fixed_grid

    return to_fixed_grid(load_image(pair.moving), fixed).array


def run_pair(job: PairJob) -> dict[str, Any]:
    """Worker entry point: register, write the field, then the record (the done marker).

    Never raises for a problem with this pair: returns ``{"status": "failed", "error": ...}``
    so the other pairs go on (a rerun retries it).
    """
    out = Path(job.config.outdir)
    _log_event(out, "start", job.stem)
    try:
        record = _register_pair(job)
    except Exception as exc:  # one bad pair must not stop the dataset
        message = str(exc) if isinstance(exc, DinoregError) else f"{type(exc).__name__}: {exc}"
        _log_event(out, "failed", job.stem, error=message)
        return {"status": "failed", "pair": job.stem, "error": message}
    write_json_atomic(record_path(out, job.stem), record)
    _log_event(out, "done", job.stem)
    return record


# --------------------------------------------------------------------------- the whole split

def dataset_labels(meta_labels: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Non-zero integer labels declared in dataset.json's ``labels`` (``{"1": "liver", ...}``)."""
    labels = []
    for key in meta_labels:
        with contextlib.suppress(ValueError):
            if int(key) != 0:
                labels.append(int(key))
    return tuple(sorted(labels)) or None


def plan(dataset_json: str | os.PathLike, split: str, config: RunConfig) -> list[PairJob]:
    """The jobs of a split, checking that no two pairs share an output name."""
    ds = load_dataset(dataset_json)
    if config.eval_labels is None:
        config = RunConfig(**{**asdict(config), "eval_labels": dataset_labels(ds.labels)})
    jobs = [PairJob(n, pair, config) for n, pair in enumerate(ds.pairs(split))]
    seen: dict[str, int] = {}
    for job in jobs:
        if job.stem in seen:
            raise DinoregError(f"pairs {seen[job.stem]} and {job.index} of split {split!r} have the same output "
                               f"name {job.pair.disp_name}", ds.json_path)
        seen[job.stem] = job.index
    return jobs


def run_dataset(dataset_json: str | os.PathLike, split: str, config: RunConfig, *, workers: int = 1,
                executor: str = "local", ray_address: str | None = None, cache_dir: str | None = None,
                cache_bytes: int = 10 * 2**30, cache_half: bool = False, threads: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Register every unfinished pair of ``split``, then write the tables.

    Args:
        dataset_json: the ``dataset.json`` (or its folder).
        split: ``val``, ``test`` or ``train-pairs``.
        config: output folder, preset, overrides, labels, device, seed, QC.
        workers, executor, ray_address: see :func:`dinoreg.executors.run_jobs`.
        cache_dir, cache_bytes, cache_half: feature cache activated in every worker.
        threads: torch threads per worker (0: all cores in one worker, else cores / workers).
        progress: a progress bar over pairs.

    Returns:
        the summary (also in ``summary.json``) with ``failed``: the pairs that failed this run.
    """
    from tqdm.auto import tqdm

    from dinoreg.executors import run_jobs
    from dinoreg.presets import resolve

    resolve(config.preset, config.overrides)  # bad settings: one error before any work
    jobs = plan(dataset_json, split, config)
    out = Path(config.outdir)
    try:
        for folder in (out, out / RECORDS, out / QC):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DinoregError(f"cannot create output directory ({exc.strerror})", out) from exc
    if threads <= 0 and workers > 1:  # no oversubscription: share the cores between the workers
        threads = max(1, (os.cpu_count() or 1) // workers)
    with folder_lock(out):
        _remove_stale_temporaries(out)
        todo = [job for job in jobs if read_record(out, job.stem) is None]
        failed: list[dict[str, Any]] = []
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="pairs", unit="pair", disable=not progress,
                  dynamic_ncols=True) as bar:
            for _, record in run_jobs(run_pair, todo, executor=executor, workers=workers, ray_address=ray_address,
                                      initializer=worker_init,
                                      initargs=(cache_dir, cache_bytes, cache_half, threads)):
                if record["status"] != "done":
                    failed.append(record)
                    bar.write(f"dinoreg: pair {record['pair']} failed: {record['error']}")
                bar.update(1)
        summary = write_tables(out, [job.stem for job in jobs], split=split, dataset=str(dataset_json))
    summary["failed"] = failed
    return summary


# --------------------------------------------------------------------------- tables

HEADLINE = ("dice_mean", "hd95_vox_mean", "hd95_mm_mean", "tre_mm_mean", "sdlogj", "folding_fraction")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV table, written atomically; ``None`` and NaN cells are left empty."""
    def cell(v: Any) -> Any:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v

    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([[cell(v) for v in row] for row in rows])


def write_tables(outdir: str | os.PathLike, stems: Sequence[str] | None = None, split: str | None = None,
                 dataset: str | None = None) -> dict[str, Any]:
    """Write ``metrics.csv``, ``summary.csv`` and ``summary.json`` from the finished records.

    ``stems`` (the split's pairs, in order) defaults to every record in ``outdir/pairs``.
    """
    from dinoreg.metrics import aggregate, flatten, to_jsonable

    out = Path(outdir)
    if stems is None:
        stems = sorted((p.stem for p in (out / RECORDS).glob("*.json") if not p.name.startswith(".")),
                       key=lambda s: (json.loads((out / RECORDS / f"{s}.json").read_text()).get("index", 0), s))
    records = [r for r in (read_record(out, s) for s in stems) if r is not None]
    flats = [flatten(r["metrics"]) for r in records]
    columns = [c for c in HEADLINE if any(c in f for f in flats)]
    columns += [c for c in dict.fromkeys(k for f in flats for k in f) if c not in columns]
    _write_csv(out / "metrics.csv", ["pair", "fixed", "moving", "disp", "seconds"] + columns,
               [[r["pair"], Path(r["fixed"]).name, Path(r["moving"]).name, r["disp"],
                 r.get("timings", {}).get("total")] + [f.get(c) for c in columns] for r, f in zip(records, flats)])
    agg = aggregate([r["metrics"] for r in records])
    ordered = {c: agg[c] for c in columns if c in agg}
    _write_csv(out / "summary.csv", ["metric", "mean", "std", "30", "n"],
               [[c, *(to_jsonable(v[s]) for s in ("mean", "std", "30")), v["n"]] for c, v in ordered.items()])
    summary = {"dataset": dataset, "split": split, "n_pairs": len(stems), "n_done": len(records),
               "missing": [s for s in stems if read_record(out, s) is None],
               "aggregate": to_jsonable(ordered),
               "pairs": [{"pair": r["pair"], "disp": r["disp"], "metrics": r["metrics"]} for r in records]}
    write_json_atomic(out / "summary.json", summary)
    return summary


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """Human-readable headline lines: ``dice_mean: mean 0.71 ± 0.03, 30% 0.69 (n=2)``."""
    lines = [f"pairs: {summary['n_done']} of {summary['n_pairs']} finished"]
    for key in HEADLINE:
        stats = summary["aggregate"].get(key)
        if stats and stats.get("mean") is not None:
            std = stats.get("std")
            lines.append(f"{key}: mean {stats['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
                         + f", 30th percentile {stats['30']:.4f} (n={stats['n']})")
    return lines
