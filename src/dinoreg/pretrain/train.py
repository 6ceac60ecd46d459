"""Self-supervised 3D ViT pretraining (DINO + iBOT + dense correspondence InfoNCE), resumable.

``pretrain(volumes, config, out_dir, label_maps=...)`` trains a student network (ViT3D +
class-token head + patch head) against an EMA teacher. Views come from one of two samplers:

* ``views="pairs"`` (default): every volume becomes a :class:`~.synth.Subject` (its intensity
  quantiles as pseudo labels) and every label map a label-only subject; a sample is a *pair* of
  global views of one anatomy, differently deformed and differently contrasted (real, remapped
  or synthetic Gaussian-mixture intensities, :mod:`.synth`) with the known voxel
  correspondence, plus ``n_local`` local views;
* ``views="multicrop"``: DINO's multi-crop of the real volumes (:mod:`.augment`), no
  correspondence (so no dense loss).

Each step:

1. draw a batch (two global views, ``n_local`` local views per sample) and, for a fraction of the
   global views, a block mask of tokens;
2. teacher (no grad) encodes the unmasked global views; student encodes the masked global views
   and the local views;
3. loss = ``dino_weight`` x DINO loss on class tokens (teacher global views vs. every other
   student view) + ``ibot_weight`` x masked-patch loss + ``dense_weight`` x dense InfoNCE
   between the student's tokens of the two global views at corresponding positions
   (:func:`~.dense.dense_info_nce`; masked tokens are not anchors) + ``koleo_weight`` x KoLeo
   on the student's class tokens (each global view set apart). Teacher targets are centred by
   an EMA centre or by Sinkhorn-Knopp (``centering``), sharpened by a teacher temperature that
   warms up; their entropy is logged (``cls_entropy``, ``patch_entropy``: ``log K`` = a
   uniform, collapsed teacher) with the prototypes in use. With ``dino_weight = ibot_weight =
   0`` (dense only) the teacher is not run and is only the EMA of the student;
4. AdamW step (learning rate: warm-up then cosine; weight decay: cosine), gradient clipping,
   then EMA update of the teacher (momentum: cosine towards 1).

Every schedule is a function of the step; all randomness flows from one ``torch.Generator``
whose state is checkpointed with the networks, the optimizer and the loss centres. A run
interrupted and resumed from a checkpoint therefore continues with bitwise the same state as an
uninterrupted one (on the same device and thread count).

Files in ``out_dir``: ``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps and
at the end), ``log.jsonl`` (one JSON line per step), ``dino3d.safetensors`` (the final teacher
backbone with its :class:`~dinoreg.features.vit3d.ViT3DConfig` in the metadata).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from dinoreg.errors import DinoregError
from dinoreg.io.atomic import atomic_write
from dinoreg.features.vit3d import ViT3D, ViT3DConfig, save_vit3d
from dinoreg.pretrain.augment import AugmentConfig, foreground_points, make_batch
from dinoreg.pretrain.dense import dense_info_nce, koleo, token_correspondence
from dinoreg.pretrain.dino import DinoLoss, PatchLoss, ProjectionHead, block_mask, ema_update
from dinoreg.pretrain.schedules import cosine, linear_warmup, warmup_cosine
from dinoreg.pretrain.synth import (Subject, SynthConfig, label_foreground, make_pair_batch, subject_from_image,
                                    subject_from_labels)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
WEIGHTS = "dino3d.safetensors"
RESUMABLE_CHANGES = ("steps", "checkpoint_every")
# what a checkpoint written before a setting existed meant by its absence
LEGACY_DEFAULTS = {"views": "multicrop", "dense_weight": 0.0, "koleo_weight": 0.0, "centering": "ema"}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a pretraining run (saved in checkpoints and the final weights).

    Attributes:
        model: the backbone architecture.
        augment: multi-crop views.
        steps: optimisation steps.
        batch_size: samples per step (each gives 2 global + ``n_local`` local views).
        lr, min_lr, warmup_steps: AdamW learning rate, linear warm-up then cosine to ``min_lr``.
        weight_decay: ``(start, end)`` of the cosine weight-decay schedule (weights only).
        momentum: ``(start, end)`` of the cosine EMA momentum schedule of the teacher.
        teacher_temp: ``(start, end)`` teacher temperature, linear over ``teacher_temp_warmup`` steps.
        student_temp: student temperature.
        center_momentum: EMA momentum of the class-token centre (DINO: 0.9 with batches of
            1024; with a few views per step a slower centre is needed, else centring erases the
            teacher's signal and the class branch collapses to uniform outputs).
        patch_center_momentum: same for the patch centre (every step averages many tokens).
        out_dim, patch_out_dim: prototypes of the class-token and patch heads.
        head_hidden, head_bottleneck: head MLP widths.
        ibot_weight: weight of the masked-patch loss (0 turns it and masking off).
        mask_prob: fraction of global views that are masked.
        mask_ratio: ``(min, max)`` masked token fraction of a masked view.
        clip_grad: max global gradient norm (0: no clipping).
        checkpoint_every: steps between checkpoints.
        seed: seeds the network initialisation and the data generator.
        amp: bfloat16 autocast when training on CUDA.
        views: ``"pairs"`` (deformed, re-contrasted pairs with known correspondence, :mod:`.synth`)
            or ``"multicrop"`` (DINO's crops of the real volumes; no dense loss).
        synth: how pairs are deformed and rendered.
        dino_weight: weight of the class-token DINO loss (0: no class-token loss).
        dense_weight: weight of the dense correspondence InfoNCE (``views="pairs"`` only).
        dense_temp: its temperature on cosine similarities.
        dense_tokens: anchors per pair.
        dense_exclude: same-pair positions closer than this many tokens are not negatives.
        koleo_weight: KoLeo regulariser on the student's class tokens (DINOv2; 0: off).
        centering: teacher centring, ``"ema"`` (DINO) or ``"sinkhorn"`` (Sinkhorn-Knopp, DINOv2).
    """

    model: ViT3DConfig = field(default_factory=ViT3DConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    steps: int = 2500
    batch_size: int = 2
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 150
    weight_decay: tuple[float, float] = (0.04, 0.2)
    momentum: tuple[float, float] = (0.99, 1.0)
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup: int = 300
    student_temp: float = 0.1
    center_momentum: float = 0.99
    patch_center_momentum: float = 0.9
    out_dim: int = 256
    patch_out_dim: int = 1024
    head_hidden: int = 256
    head_bottleneck: int = 64
    ibot_weight: float = 1.0
    mask_prob: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    clip_grad: float = 3.0
    checkpoint_every: int = 100
    seed: int = 0
    amp: bool = True
    views: str = "pairs"
    synth: SynthConfig = field(default_factory=SynthConfig)
    dino_weight: float = 1.0
    dense_weight: float = 1.0
    dense_temp: float = 0.1
    dense_tokens: int = 256
    dense_exclude: float = 1.5
    koleo_weight: float = 0.1
    centering: str = "sinkhorn"

    def __post_init__(self) -> None:
        if self.views not in ("pairs", "multicrop"):
            raise DinoregError(f"views must be 'pairs' or 'multicrop', got {self.views!r}")
        if self.centering not in ("ema", "sinkhorn"):
            raise DinoregError(f"centering must be 'ema' or 'sinkhorn', got {self.centering!r}")
        if self.dense_weight > 0 and self.views != "pairs":
            raise DinoregError("the dense loss needs views='pairs' (known correspondences)")
        if self.dino_weight <= 0 and self.ibot_weight <= 0 and self.dense_weight <= 0:
            raise DinoregError("every loss weight is 0: nothing to train")

    @property
    def uses_teacher(self) -> bool:
        """Whether the teacher network is run (the DINO or iBOT loss is on)."""
        return self.dino_weight > 0 or self.ibot_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        """Inverse of :meth:`to_dict` (lists become tuples)."""
        tup = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        tup["model"] = ViT3DConfig.from_dict(dict(data["model"]))
        tup["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in data["augment"].items()})
        if "synth" in data:
            tup["synth"] = SynthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["synth"].items()})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in tup.items() if k in known})


class DinoNetwork(nn.Module):
    """Backbone + class-token head + (optional) patch head."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.backbone = ViT3D(cfg.model)
        dim = cfg.model.embed_dim
        self.head = ProjectionHead(dim, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck)
        self.patch_head = (ProjectionHead(dim, cfg.patch_out_dim, cfg.head_hidden, cfg.head_bottleneck)
                           if cfg.ibot_weight > 0 else None)


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint holds)."""

    student: DinoNetwork
    teacher: DinoNetwork
    optimizer: torch.optim.Optimizer
    dino_loss: DinoLoss
    patch_loss: PatchLoss
    generator: torch.Generator
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices/kernels only (not biases, norms, tokens, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]


def new_state(cfg: PretrainConfig, device: torch.device) -> TrainState:
    """Fresh student, teacher (= student copy), optimizer, loss centres and data generator."""
    torch.manual_seed(cfg.seed)
    student = DinoNetwork(cfg).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(student), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    dino_loss = DinoLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.centering).to(device)
    patch_loss = PatchLoss(cfg.patch_out_dim, cfg.student_temp, cfg.patch_center_momentum, cfg.centering).to(device)
    return TrainState(student, teacher, optimizer, dino_loss, patch_loss, gen)


def schedules(cfg: PretrainConfig, step: int) -> dict[str, float]:
    """Learning rate, weight decay, EMA momentum and teacher temperature at ``step``."""
    return {
        "lr": warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr),
        "wd": cosine(step, cfg.steps, *cfg.weight_decay),
        "momentum": cosine(step, cfg.steps, *cfg.momentum),
        "teacher_temp": linear_warmup(step, cfg.teacher_temp_warmup, *cfg.teacher_temp),
    }


def make_masks(n_views: int, grid: tuple[int, int, int], cfg: PretrainConfig,
               gen: torch.Generator) -> torch.Tensor:
    """Block masks ``(n_views, N)``: a view is masked with probability ``mask_prob``."""
    n = grid[0] * grid[1] * grid[2]
    masks = torch.zeros(n_views, n, dtype=torch.bool)
    if cfg.ibot_weight <= 0:
        return masks
    for v in range(n_views):
        if float(torch.rand(1, generator=gen)) < cfg.mask_prob:
            ratio = float(cfg.mask_ratio[0] + (cfg.mask_ratio[1] - cfg.mask_ratio[0]) * torch.rand(1, generator=gen))
            masks[v] = block_mask(grid, ratio, gen)
    return masks


def compute_loss(state: TrainState, cfg: PretrainConfig, globals_: torch.Tensor,
                 locals_: torch.Tensor | None, masks: torch.Tensor, temp: float,
                 pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Forward teacher and student on one batch.

    Args:
        globals_: ``(2B, 1, G, G, G)`` view-major (first views, then second views).
        locals_: ``(n_local*B, 1, L, L, L)`` or None.
        masks: ``(2B, N)`` iBOT token masks.
        temp: teacher temperature.
        pairs: ``(token correspondence (B, 3, n, n, n), valid (B, n, n, n))`` of the second views
            in the first views' token coordinates (``views="pairs"``), for the dense loss.

    Returns:
        ``{"loss", "dino", "ibot", "dense", "koleo", "dense_acc"}`` scalars.
    """
    teacher, student = state.teacher, state.student
    use_mask = masks.any() and cfg.ibot_weight > 0
    s_cls, s_patch, grid = student.backbone(globals_, mask=masks if use_mask else None)
    zero = s_cls.new_zeros((), dtype=torch.float32)
    out = {"dino": zero, "ibot": zero, "dense": zero, "koleo": zero, "dense_acc": zero}
    total = zero
    if cfg.uses_teacher:
        with torch.no_grad():
            t_cls, t_patch, _ = teacher.backbone(globals_)
    if cfg.dino_weight > 0:
        with torch.no_grad():
            t_logits = teacher.head(t_cls)
        cls_all = [s_cls]
        if locals_ is not None:
            cls_all.append(student.backbone(locals_)[0])
        out["dino"] = state.dino_loss(student.head(torch.cat(cls_all)), t_logits, 2, temp)
        total = total + cfg.dino_weight * out["dino"]
    if student.patch_head is not None and use_mask:
        view, token = masks.nonzero(as_tuple=True)
        with torch.no_grad():
            t_tok = teacher.patch_head(t_patch[view, token])
        s_tok = student.patch_head(s_patch[view, token])
        out["ibot"] = state.patch_loss(s_tok, t_tok, view.to(s_tok.device), masks.shape[0], temp)
        total = total + cfg.ibot_weight * out["ibot"]
    if cfg.dense_weight > 0 and pairs is not None:
        b = globals_.shape[0] // 2
        feats = s_patch.transpose(1, 2).reshape(2 * b, -1, *grid)
        corr, valid = pairs
        valid = valid & ~masks[b:].reshape(valid.shape)
        dense, stats = dense_info_nce(feats[:b], feats[b:], corr, valid, state.generator, cfg.dense_temp,
                                      cfg.dense_tokens, cfg.dense_exclude)
        out["dense"], out["dense_acc"] = dense, zero.new_tensor(stats["dense_acc"])
        total = total + cfg.dense_weight * dense
    if cfg.koleo_weight > 0:
        out["koleo"] = sum(koleo(chunk) for chunk in s_cls.chunk(2)) / 2
        total = total + cfg.koleo_weight * out["koleo"]
    out = {k: v.detach() for k, v in out.items()}
    out["loss"] = total
    return out


def train_step(state: TrainState, cfg: PretrainConfig, volumes: list[torch.Tensor] | list[Subject],
               fgs: list[torch.Tensor], weights: torch.Tensor, device: torch.device) -> dict[str, float]:
    """One optimisation step (batch, loss, AdamW, clipping, EMA); returns the logged numbers.

    ``volumes`` are the real volumes (``views="multicrop"``) or the subjects (``"pairs"``).
    """
    sch = schedules(cfg, state.step)
    gen = state.generator
    p = cfg.model.patch_size
    pairs = None
    if cfg.views == "pairs":
        aug = cfg.augment if cfg.dino_weight > 0 else replace(cfg.augment, n_local=0)  # locals serve DINO only
        batch = make_pair_batch(volumes, fgs, weights, cfg.batch_size, gen, aug, cfg.synth)  # type: ignore[arg-type]
        globals_, locals_ = batch["globals"], batch["locals"]
        corr, valid = token_correspondence(batch["corr"], batch["fg_b"], p)
        pairs = (corr.to(device), valid.to(device))
    else:
        globals_, locals_ = make_batch(volumes, fgs, weights, cfg.batch_size, gen, cfg.augment)  # type: ignore[arg-type]
    grid = (cfg.augment.global_size // p,) * 3
    masks = make_masks(globals_.shape[0], grid, cfg, gen).to(device)
    globals_ = globals_.to(device)
    locals_ = locals_.to(device) if locals_ is not None else None
    for i, group in enumerate(state.optimizer.param_groups):
        group["lr"] = sch["lr"]
        group["weight_decay"] = sch["wd"] if i == 0 else 0.0
    use_amp = cfg.amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = compute_loss(state, cfg, globals_, locals_, masks, sch["teacher_temp"], pairs)
    if not torch.isfinite(out["loss"]):
        raise DinoregError(f"pretraining loss became {float(out['loss'])} at step {state.step}; lower the lr")
    state.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(state.student.parameters(), cfg.clip_grad)
    state.optimizer.step()
    ema_update(state.teacher, state.student, sch["momentum"])
    state.step += 1
    stats = {f"cls_{k}": v for k, v in state.dino_loss.last_stats.items()}
    stats.update({f"patch_{k}": v for k, v in state.patch_loss.last_stats.items()})
    state.dino_loss.last_stats = {}
    state.patch_loss.last_stats = {}
    return {"step": state.step, **{k: float(v.detach()) for k, v in out.items()}, **sch, **stats}


def save_checkpoint(state: TrainState, cfg: PretrainConfig, path: Path, data_id: list) -> None:
    """Write the full training state atomically (temporary file, then rename)."""
    payload = {
        "step": state.step,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "data": json.dumps(data_id),
        "student": state.student.state_dict(),
        "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "dino_loss": state.dino_loss.state_dict(),
        "patch_loss": state.patch_loss.state_dict(),
        "generator": state.generator.get_state(),
        "history": json.dumps(state.history),
    }
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def _config_diff(saved: dict[str, Any], cfg: PretrainConfig) -> list[str]:
    """Top-level keys that differ (a key missing from an older checkpoint counts as its default)."""
    now = cfg.to_dict()
    default = {**PretrainConfig().to_dict(), **LEGACY_DEFAULTS}
    return [k for k in sorted(set(saved) | set(now)) if saved.get(k, default.get(k)) != now.get(k)]


def load_checkpoint(state: TrainState, cfg: PretrainConfig, path: Path, data_id: list) -> None:
    """Restore ``state`` from ``path``; refuse a checkpoint of another config or data set."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DinoregError(f"cannot read training checkpoint ({type(exc).__name__})", path) from exc
    diff = _config_diff(json.loads(payload["config"]), cfg)
    blocking = [k for k in diff if k not in RESUMABLE_CHANGES]
    if blocking:
        raise DinoregError(f"checkpoint was written with another config ({', '.join(blocking)} differ); "
                           "use another output folder or resume=False", path)
    if "steps" in diff:
        warnings.warn(f"{path}: resuming with a different number of steps; schedules follow the new length")
    if json.loads(payload["data"]) != data_id:
        raise DinoregError("checkpoint was trained on other volumes (count or shapes differ)", path)
    state.student.load_state_dict(payload["student"])
    state.teacher.load_state_dict(payload["teacher"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.dino_loss.load_state_dict(payload["dino_loss"])
    state.patch_loss.load_state_dict(payload["patch_loss"])
    state.generator.set_state(payload["generator"])
    state.step = int(payload["step"])
    state.history = json.loads(payload["history"])


def _as_volumes(volumes: Sequence[torch.Tensor | np.ndarray] | str | os.PathLike,
                progress: bool) -> list[torch.Tensor]:
    if isinstance(volumes, (str, os.PathLike)):
        from dinoreg.pretrain.data import list_volumes, load_volumes

        return load_volumes(list_volumes(volumes), progress=progress)
    out = [torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32) for v in volumes]
    if not out or any(v.ndim != 3 for v in out):
        raise DinoregError("pretraining needs a non-empty list of 3D volumes (I, J, K)")
    return out


def _rewrite_log(path: Path, history: list[dict[str, float]]) -> None:
    with open(path, "w") as handle:
        for row in history:
            handle.write(json.dumps(row) + "\n")


def training_subjects(volumes: list[torch.Tensor], label_maps: Sequence[torch.Tensor | np.ndarray],
                      cfg: PretrainConfig) -> list[Subject]:
    """Image subjects (pseudo labels) then label-only subjects, for ``views="pairs"``."""
    subjects = [subject_from_image(v, cfg.synth.n_clusters) for v in volumes]
    for lab in label_maps:
        subjects.append(subject_from_labels(torch.as_tensor(np.asarray(lab) if not torch.is_tensor(lab) else lab)))
    return subjects


def pretrain(volumes: Sequence[torch.Tensor | np.ndarray] | str | os.PathLike,
             config: PretrainConfig | None = None, out_dir: str | os.PathLike = "dino3d_pretrain",
             resume: bool = True, progress: bool = True, device: str | torch.device | None = None,
             label_maps: Sequence[torch.Tensor | np.ndarray] = (), snapshots: bool = False) -> Path:
    """Train the 3D ViT (DINO + iBOT + dense correspondence loss) and write the teacher backbone.

    Args:
        volumes: preprocessed ``(I, J, K)`` volumes in ``[0, 1]`` (see
            :func:`dinoreg.pretrain.data.load_volumes`), or a folder / ``dataset.json`` to read.
        label_maps: ``(I, J, K)`` integer label maps rendered as synthetic contrasts
            (``views="pairs"`` only; see :func:`dinoreg.pretrain.data.load_label_maps`).
        snapshots: also write the teacher backbone at every checkpoint as
            ``snapshots/dino3d_step<step>.safetensors`` (to probe a run while it trains).
        config: the run's :class:`PretrainConfig` (default: the defaults).
        out_dir: folder for ``checkpoint.pt``, ``log.jsonl`` and ``dino3d.safetensors``.
        resume: continue from ``out_dir/checkpoint.pt`` when present (same config and data).
        progress: tqdm bar.
        device: ``"cuda"``/``"cpu"``; default CUDA when available.

    Returns:
        the path of ``dino3d.safetensors`` (load it with ``Dino3DEncoder.from_file``).
    """
    cfg = config or PretrainConfig()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vols = _as_volumes(volumes, progress)
    data_id: list = [list(v.shape) for v in vols]
    if label_maps and cfg.views != "pairs":
        raise DinoregError("label maps need views='pairs' (synthetic contrasts)")
    data_id += [["labels", *np.shape(lab)] for lab in label_maps]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = new_state(cfg, dev)
    ckpt, log = out / CHECKPOINT, out / LOG
    if resume and ckpt.exists():
        load_checkpoint(state, cfg, ckpt, data_id)
    _rewrite_log(log, state.history)
    if cfg.views == "pairs":
        data: list = training_subjects(vols, label_maps, cfg)
        fgs = [label_foreground(s) for s in data]
        weights = torch.tensor([float(s.labels.numel()) ** 0.5 for s in data], dtype=torch.float64)
    else:
        data = vols
        fgs = [foreground_points(v) for v in vols]
        weights = torch.tensor([float(v.numel()) ** 0.5 for v in vols], dtype=torch.float64)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=min(state.step, cfg.steps), desc="dino3d pretrain", disable=not progress)
    with open(log, "a") as handle:
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            row = train_step(state, cfg, data, fgs, weights, dev)
            row["seconds"] = time.perf_counter() - t0
            state.history.append(row)
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                save_checkpoint(state, cfg, ckpt, data_id)
                if snapshots:
                    write_weights(state, cfg, out / "snapshots" / f"dino3d_step{state.step:06d}.safetensors")
    bar.close()
    return write_weights(state, cfg, out / WEIGHTS)


def write_weights(state: TrainState, cfg: PretrainConfig, path: Path) -> Path:
    """Save the teacher backbone with its architecture and the run summary in the metadata."""
    last = state.history[-1] if state.history else {}
    extra = {"pretrain_config": json.dumps(cfg.to_dict(), sort_keys=True), "steps": str(state.step),
             "final_loss": str(last.get("loss", "nan"))}
    backbone = copy.deepcopy(state.teacher.backbone).cpu()
    return save_vit3d(backbone, path, extra)
