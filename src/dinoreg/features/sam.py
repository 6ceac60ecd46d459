"""SAM / MedSAM ViT-B image encoder (Kirillov et al. 2023; Ma et al. 2024).

Architecture (``ImageEncoderViT`` of segment-anything, ViT-B): 16x16 patch embedding 3 -> 768
(conv with bias), an absolute position embedding ``(1, 64, 64, 768)`` for the 1024x1024
pretraining input, 12 pre-norm blocks (LayerNorm eps 1e-6, 12 heads, MLP 3072 with GELU) of
which blocks 2, 5, 8, 11 attend globally and the others within 14x14 windows (zero padded to
a multiple of 14), every attention adding decomposed relative-position terms
(``rel_pos_h``/``rel_pos_w``, ``(2 * size - 1, 64)`` with size 14 in windows, 64 globally),
then a neck 768 -> 256 (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d).
Output: ``(B, 256, S/16, S/16)``, i.e. 64x64 for the native 1024 input (``patch_size = 16``).

Other input sizes ``S`` (a multiple of 16) are supported, for CPU use: the absolute position
embedding is resized bicubically to the token grid and the global blocks' relative-position
tables linearly (what segment-anything's ``get_rel_pos`` does) - an approximation of the
pretrained model, exact only at 1024.

Preprocessing:

* ``sam``: grey ``[0, 1]`` -> resize to ``S x S`` (bilinear; SAM itself resizes the longest
  side and pads, dinoreg stretches so the map covers the whole slice) -> 3 channels ->
  ``(255 * x - mean) / std`` with SAM's ``pixel_mean = (123.675, 116.28, 103.53)``,
  ``pixel_std = (58.395, 57.12, 57.375)``.
* ``medsam``: same resize, values kept in ``[0, 1]``: MedSAM's inference min-max scales the
  1024x1024 image to ``[0, 1]`` and feeds it to the image encoder directly (no mean/std).

Checkpoints: the official ``sam_vit_b_01ec64.pth`` and ``medsam_vit_b.pth`` (flat state dicts;
a ``{"model": ...}`` training checkpoint is unwrapped). Only ``image_encoder.*`` is read,
strictly (see :mod:`dinoreg.features.checkpoint`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.errors import DinoregError, WeightsNotFoundError
from dinoreg.features.base import SlicewiseSpec, square_rgb
from dinoreg.features.checkpoint import load_strict, read_checkpoint
from dinoreg.features.registry import slice_encoder
from dinoreg.features.tinyvit import sam_neck
from dinoreg.spec import setting

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
WEIGHT_FILES = {"sam": "sam_vit_b_01ec64.pth", "medsam": "medsam_vit_b.pth"}


@dataclass(frozen=True)
class SAMConfig:
    """ViT hyper-parameters; the defaults are SAM ViT-B. ``depth``/``global_blocks`` may be
    overridden (tests use 2 blocks) as long as the checkpoint matches."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    out_dim: int = 256
    window: int = 14
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)

    @property
    def grid(self) -> int:
        """Token grid side at the pretraining size (64 for ViT-B)."""
        return self.img_size // self.patch_size


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Relative-position embeddings ``(size, size, C)`` for query/key positions on an axis of
    ``size`` tokens, from a learned table ``(L, C)``: entry ``(q, k)`` is row ``q - k + size - 1``
    of the table, linearly resized to ``L = 2 * size - 1`` first when needed."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    pos = torch.arange(size, device=table.device)
    return table[pos[:, None] - pos[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, H, W, C)`` with decomposed relative positions."""

    def __init__(self, dim: int, heads: int, rel_size: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, self.head_dim).unbind(0)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        rq = q.reshape(-1, h, w, self.head_dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, relative_table(self.rel_pos_h, h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, relative_table(self.rel_pos_w, w))
        attn = (attn.view(-1, h, w, h, w) + rel_h[..., None] + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
        out = (attn.softmax(-1) @ v).view(b, self.heads, h, w, self.head_dim)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c))


class MLPBlock(nn.Module):
    """``lin1`` -> GELU -> ``lin2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def _windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, H, W, C)`` -> ``(B * n, window, window, C)`` after zero padding bottom/right."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    x = F.pad(x, (0, 0, 0, pw, 0, ph)) if ph or pw else x
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def _unwindows(x: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    x = x.view(-1, hp // window, wp // window, window, window, x.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, x.shape[-1])[:, : size[0], : size[1]]


class Block(nn.Module):
    """Pre-norm transformer block; ``window = 0`` means global attention."""

    def __init__(self, cfg: SAMConfig, window: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg.embed_dim, cfg.heads, window or cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = MLPBlock(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            size = (x.shape[1], x.shape[2])
            y, padded = _windows(y, self.window)
            y = _unwindows(self.attn(y), self.window, padded, size)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (``patch_embed.proj``): ``(B, 3, S, S) -> (B, S/p, S/p, C)``."""

    def __init__(self, cfg: SAMConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class SAMViT(nn.Module):
    """The image encoder network; its ``state_dict`` names equal the checkpoint's
    ``image_encoder.*`` names with the prefix removed."""

    def __init__(self, cfg: SAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg, 0 if i in cfg.global_blocks else cfg.window)
                                    for i in range(cfg.depth))
        self.neck = sam_neck(cfg.embed_dim, cfg.out_dim)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Absolute position embedding ``(1, h, w, C)``, bicubically resized when needed."""
        pos = self.pos_embed
        if pos.shape[1:3] == (h, w):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class SAMEncoder(nn.Module):
    """SAM or MedSAM ViT-B as a frozen :class:`~dinoreg.features.base.Encoder2D`.

    ``preprocess``: grey ``(B, 1, H, W)`` in ``[0, 1]`` -> ``(B, 3, S, S)`` with
    ``S = input_size`` (see module docstring for each flavour's normalisation).
    ``forward``: -> ``(features (B, 256, S/16, S/16), None)``; no global token.
    """

    patch_size = 16

    def __init__(self, flavour: str = "sam", input_size: int = 1024, cfg: SAMConfig | None = None) -> None:
        super().__init__()
        if flavour not in WEIGHT_FILES:
            raise DinoregError(f"unknown SAM flavour '{flavour}' (choose sam or medsam)")
        self.cfg = cfg or SAMConfig()
        if input_size % self.cfg.patch_size or input_size < self.cfg.patch_size:
            raise DinoregError(f"{flavour} input size must be a positive multiple of "
                               f"{self.cfg.patch_size}, got {input_size}")
        self.name, self.input_size = flavour, int(input_size)
        self.patch_size = self.cfg.patch_size
        self.embed_dim = self.cfg.out_dim
        self.vit = SAMViT(self.cfg)
        self.eval()

    def preprocess(self, grey: torch.Tensor) -> torch.Tensor:
        """Resize to ``S x S``, 3 channels, SAM's pixel normalisation (``sam``) or none (``medsam``)."""
        x = square_rgb(grey, self.input_size, self.name)
        if self.name == "medsam":
            return x
        mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (255.0 * x - mean) / std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(B, 3, S, S)`` -> ``((B, 256, S/16, S/16), None)``."""
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
            raise DinoregError(f"{self.name} expects (B, 3, H, W) input with H, W multiples of {p}, "
                               f"got {tuple(x.shape)}; call preprocess() first")
        return self.vit(x), None


def find_sam_weights(flavour: str, path: str | os.PathLike | None = None) -> Path:
    """Locate the checkpoint: an explicit file (or a folder holding the official file name),
    else ``$DINOREG_WEIGHTS_DIR/<official name>``."""
    name = WEIGHT_FILES.get(flavour)
    if name is None:
        raise DinoregError(f"unknown SAM flavour '{flavour}' (choose sam or medsam)")
    if path is not None:
        p = Path(path)
        p = p / name if p.is_dir() else p
        if not p.is_file():
            raise WeightsNotFoundError(f"{flavour} weights file not found", p)
        return p
    env = os.environ.get("DINOREG_WEIGHTS_DIR")
    if env and (Path(env) / name).is_file():
        return Path(env) / name
    raise WeightsNotFoundError(f"{flavour}: {name} not found; pass its path or put it in $DINOREG_WEIGHTS_DIR")


def load_sam(flavour: str = "sam", path: str | os.PathLike | None = None, input_size: int = 1024,
             cfg: SAMConfig | None = None) -> SAMEncoder:
    """Pretrained, frozen SAM/MedSAM image encoder (``eval()``, ``requires_grad=False``;
    gradients still flow to its input). Only ``image_encoder.*`` is read, strictly."""
    file = find_sam_weights(flavour, path)
    enc = SAMEncoder(flavour, input_size, cfg)
    load_strict(enc.vit, read_checkpoint(file), "image_encoder.", file)
    return enc.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the registered encoders


@dataclass(frozen=True)
class SAMSpec(SlicewiseSpec):
    """SAM ViT-B image-encoder settings (slices are squashed to 1024 x 1024: 64 x 64 features,
    resampled onto the slice's own patch grid)."""

    name: ClassVar[str] = "sam"
    upsample: float = setting(4.0, "in-plane slice upsampling (sets the patch grid the 64 x 64 features are "
                                   "resampled onto)", low=0.0, low_open=True, high=16.0)


@dataclass(frozen=True)
class MedSAMSpec(SAMSpec):
    """MedSAM (SAM ViT-B fine-tuned on medical images) settings."""

    name: ClassVar[str] = "medsam"


@lru_cache(maxsize=2)
def _cached(flavour: str, weights: str | None, device: str) -> SAMEncoder:
    return load_sam(flavour, weights).to(device)


@slice_encoder("sam", SAMSpec, "Segment Anything ViT-B image encoder (Kirillov et al. 2023)")
def _load_sam(spec: SAMSpec, device: str) -> SAMEncoder:
    return _cached("sam", spec.weights, device)


@slice_encoder("medsam", MedSAMSpec, "MedSAM ViT-B image encoder (Ma et al. 2024)")
def _load_medsam(spec: MedSAMSpec, device: str) -> SAMEncoder:
    return _cached("medsam", spec.weights, device)
