"""A small 3D Vision Transformer with dense outputs, and the ``dino3d`` volumetric encoder.

The network follows PRIMUS (a plain 3D ViT for medical volumes) as used by Kats & Heinrich for
DINO-pretrained registration features:

* **Patch embedding**: a 3D convolution with kernel = stride = ``patch_size`` (default 4), so a
  volume ``(N, 1, I, J, K)`` (with ``I, J, K`` multiples of the patch size) becomes a token grid
  ``(n_i, n_j, n_k) = (I/p, J/p, K/p)``; token ``(a, b, c)`` sees input voxels
  ``[a*p, (a+1)*p) x [b*p, (b+1)*p) x [c*p, (c+1)*p)``.
* **Position embeddings** that adapt to the token grid: ``conv`` (default; a depthwise 3x3x3
  convolution of the token grid added to the tokens - a conditional positional encoding that is
  translation-equivariant, so features do not encode where a token sits inside its window),
  ``sinusoidal`` (fixed, computed for any grid; a third of the channels encode each axis) or
  ``learned`` (a parameter on a reference grid, resampled trilinearly to the actual grid). With
  absolute embeddings (``sinusoidal``/``learned``) the output features of a window carry its
  in-window positions, which biases feature matching towards zero displacement.
* Pre-norm transformer blocks (LayerNorm -> multi-head self-attention -> residual; LayerNorm ->
  MLP -> residual), one class token, a final LayerNorm.
* **Dense output**: the patch tokens reshaped to a feature volume ``(N, C, n_i, n_j, n_k)``.

Volumes larger than a window are encoded by :func:`sliding_window_features` (overlapping
windows blended with a Gaussian or linear weight), so the memory use is bounded by the window
size whatever the volume size. :class:`Dino3DEncoder` wraps a trained network as a volumetric
encoder (see :mod:`dinoreg.features.base`), loaded from a safetensors checkpoint whose metadata
holds the network configuration as JSON (key ``dinoreg_vit3d_config``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoreg.errors import DinoregError, WeightsNotFoundError
from dinoreg.io.atomic import atomic_write

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "dino3d_shareddata.safetensors"
CONFIG_KEY = "dinoreg_vit3d_config"
FORMAT_KEY = "format"
FORMAT_VALUE = "dinoreg-vit3d"


@dataclass(frozen=True)
class ViT3DConfig:
    """Architecture of a :class:`ViT3D`.

    Attributes:
        patch_size: edge of the cubic patch in voxels (tokens are ``p x p x p`` cells).
        embed_dim: token width ``C`` (the feature channels of :meth:`ViT3D.features`).
        depth: number of transformer blocks.
        num_heads: attention heads (``embed_dim`` must be divisible by it).
        mlp_ratio: hidden width of the MLP relative to ``embed_dim``.
        pos_embed: ``"conv"`` (depthwise 3x3x3 conv, translation-equivariant), ``"sinusoidal"``
            (fixed, any grid) or ``"learned"`` (interpolated).
        pos_grid: reference token grid of learned position embeddings.
        window: sliding-window edge in voxels used by the encoder (multiple of ``patch_size``).
    """

    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pos_embed: str = "conv"
    pos_grid: tuple[int, int, int] = (12, 12, 12)
    window: int = 48

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise DinoregError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("conv", "sinusoidal", "learned"):
            raise DinoregError(f"unknown pos_embed {self.pos_embed!r} (use conv, sinusoidal or learned)")
        if self.window % self.patch_size:
            raise DinoregError(f"window {self.window} is not a multiple of patch_size {self.patch_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViT3DConfig":
        """Build from a dict (unknown keys raise ``TypeError``; lists become tuples)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TypeError(f"unknown config keys {sorted(unknown)}")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**clean)


def sinusoidal_pos_embed_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sine-cosine embeddings for a token grid: ``(n_i * n_j * n_k, dim)``.

    Channels are split into three groups (one per axis, each an even number of sin/cos pairs;
    left-over channels are zero). Positions are token indices, so the embedding of a token does
    not depend on the grid size.
    """
    per_axis = (dim // 3) // 2 * 2
    half = per_axis // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / max(half, 1)))
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * freqs.reshape(1, -1)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; tokens ``(B, N, C)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """3D ViT: ``(B, 1, I, J, K)`` (multiples of the patch size) -> class token + patch tokens."""

    def __init__(self, config: ViT3DConfig | None = None) -> None:
        super().__init__()
        self.config = config or ViT3DConfig()
        cfg = self.config
        self.patch_embed = nn.Conv3d(1, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, *cfg.pos_grid))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if cfg.pos_embed == "conv":
            self.pos_conv = nn.Conv3d(cfg.embed_dim, cfg.embed_dim, 3, padding=1, groups=cfg.embed_dim)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Absolute position embeddings for a token grid: ``(1, n_i*n_j*n_k, C)`` (not for ``conv``)."""
        if self.config.pos_embed == "conv":
            raise DinoregError("pos_embed='conv' has no absolute position embedding")
        if self.config.pos_embed == "sinusoidal":
            return sinusoidal_pos_embed_3d(grid, self.embed_dim).to(self.cls_token).unsqueeze(0)
        pe = self.pos_embed
        if tuple(pe.shape[2:]) != tuple(grid):
            pe = F.interpolate(pe, size=grid, mode="trilinear", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Encode a batch.

        Args:
            x: ``(B, 1, I, J, K)`` intensities in ``[0, 1]``; ``I, J, K`` multiples of the patch size.
            mask: optional boolean ``(B, n_i*n_j*n_k)``; masked tokens are replaced by a learned
                mask token before the position embedding is added (iBOT-style).
                With ``conv`` position encoding the convolution sees the masked grid.

        Returns:
            ``(cls (B, C), patches (B, N, C), grid (n_i, n_j, n_k))`` after the final LayerNorm.
        """
        p = self.patch_size
        if any(s % p for s in x.shape[2:]):
            raise DinoregError(f"input spatial shape {tuple(x.shape[2:])} is not a multiple of patch size {p}")
        tokens = self.patch_embed(x)
        grid = tuple(int(s) for s in tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        if mask is not None:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        if self.config.pos_embed == "conv":
            token_grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
            tokens = tokens + self.pos_conv(token_grid).flatten(2).transpose(1, 2)
        else:
            tokens = tokens + self.position_embedding(grid).to(tokens.dtype)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1:], grid  # type: ignore[return-value]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, C, n_i, n_j, n_k)`` of ``x`` ``(B, 1, I, J, K)``."""
        _, patches, grid = self.forward(x)
        return patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- sliding window

def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Start indices of windows of size ``window`` covering ``[0, n)`` with step ``stride``
    (the last window is flush with the end; one window starting at 0 when ``n <= window``)."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window + 1, max(stride, 1)))
    if starts[-1] != n - window:
        starts.append(n - window)
    return starts


def blend_weights(shape: tuple[int, int, int], mode: str = "gaussian") -> torch.Tensor:
    """Blending weight of a window on its token grid ``shape``: ``(1, 1, *shape)``, max 1.

    ``gaussian``: sigma = 1/4 of the window edge per axis (nnU-Net uses 1/8 of a much larger
    window); ``linear``: a tent falling from 1 at the centre to ``1/(n/2+1)`` at the border;
    ``constant``: plain averaging.
    """
    profiles = []
    for n in shape:
        centre = (n - 1) / 2.0
        d = torch.arange(n, dtype=torch.float32) - centre
        if mode == "gaussian":
            prof = torch.exp(-0.5 * (d / max(n / 4.0, 1e-3)) ** 2)
        elif mode == "linear":
            prof = 1.0 - d.abs() / (centre + 1.0)
        elif mode == "constant":
            prof = torch.ones(n)
        else:
            raise DinoregError(f"unknown blend mode {mode!r} (use gaussian, linear or constant)")
        profiles.append(prof.clamp_min(1e-3))
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return w[None, None]


def pad_to_multiple(volume: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``(N, C, I, J, K)`` at the high end of each axis to a multiple of ``multiple``."""
    pads: list[int] = []
    for s in reversed(volume.shape[2:]):
        pads += [0, (-int(s)) % multiple]
    return F.pad(volume, pads) if any(pads) else volume


def sliding_window_features(model: ViT3D, volume: torch.Tensor, window: int | None = None,
                            overlap: float = 0.5, blend: str = "gaussian",
                            progress: bool = False) -> torch.Tensor:
    """Dense features of a whole volume, computed window by window.

    Args:
        model: the network (in eval mode); runs on the device of its parameters.
        volume: ``(I, J, K)`` or ``(1, 1, I, J, K)`` intensities in ``[0, 1]``.
        window: window edge in voxels (multiple of the patch size; default ``model.config.window``).
            An axis shorter than the window is processed whole.
        overlap: fraction of a window shared with the next one (``0 <= overlap < 1``).
        blend: ``gaussian``, ``linear`` or ``constant`` weighting of overlapping windows.
        progress: show a tqdm bar over windows.

    Returns:
        ``(C, n_i, n_j, n_k)`` float32 on the CPU with ``n = ceil(size / p)``: the volume is
        zero-padded at the high end to a multiple of ``p``, and feature voxel ``a`` covers input
        voxels ``[a*p, (a+1)*p)`` (its centre is at input coordinate ``a*p + (p-1)/2``).
    """
    if not 0.0 <= overlap < 1.0:
        raise DinoregError(f"overlap must be in [0, 1), got {overlap}")
    p = model.patch_size
    window = window or model.config.window
    if window % p:
        raise DinoregError(f"window {window} is not a multiple of patch size {p}")
    param = next(model.parameters())
    vol = volume.reshape(1, 1, *volume.shape[-3:]).to(device=param.device, dtype=torch.float32)
    vol = pad_to_multiple(vol, p)
    grid = tuple(int(s) // p for s in vol.shape[2:])
    w_tok = window // p
    stride = max(1, int(round(w_tok * (1.0 - overlap))))
    starts = [window_starts(n, w_tok, stride) for n in grid]
    out = torch.zeros(model.embed_dim, *grid)
    norm = torch.zeros(1, *grid)
    boxes = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    from tqdm import tqdm

    with torch.no_grad():
        for a, b, c in tqdm(boxes, desc="dino3d windows", disable=not progress or len(boxes) == 1):
            size = tuple(min(w_tok, n) for n in grid)
            sl = tuple(slice(s * p, (s + m) * p) for s, m in zip((a, b, c), size))
            feats = model.features(vol[(slice(None), slice(None)) + sl])[0].float().cpu()
            w = blend_weights(size, blend)[0]
            tsl = tuple(slice(s, s + m) for s, m in zip((a, b, c), size))
            out[(slice(None),) + tsl] += feats * w
            norm[(slice(None),) + tsl] += w
    return out / norm


def align_to_field_of_view(features: torch.Tensor, shape: tuple[int, int, int], patch: int) -> torch.Tensor:
    """Re-grid padded-patch features so they follow the volumetric-encoder contract.

    ``features`` ``(C, n_i, n_j, n_k)`` with ``n = ceil(s / p)`` cover the zero-padded volume
    (feature ``a`` centred at input coordinate ``a*p + (p-1)/2``). The contract of
    :mod:`dinoreg.features.base` wants feature ``a`` to cover ``[a*s/n, (a+1)*s/n)`` (centre
    ``(a+0.5)*s/n - 0.5``). Along axes where ``s`` is a multiple of ``p`` both agree and nothing
    changes; elsewhere the features are linearly interpolated at the contract centres (a shift of
    at most ``p/2`` input voxels at the far border, none at the near one).
    """
    out = features
    for axis, s in enumerate(shape):
        n = out.shape[1 + axis]
        if s % patch == 0:
            continue
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) * s / n - 0.5  # input coords
        pos = ((centres - (patch - 1) / 2.0) / patch).clamp(0, n - 1)  # padded-feature index
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo).float()
        shape_b = [1] * out.ndim
        shape_b[1 + axis] = n
        frac = frac.view(shape_b)
        out = out.index_select(1 + axis, lo) * (1 - frac) + out.index_select(1 + axis, hi) * frac
    return out


# --------------------------------------------------------------------------- checkpoints

def save_vit3d(model: ViT3D, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights as safetensors with its config (JSON) in the metadata; atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {CONFIG_KEY: model.config.to_json(), FORMAT_KEY: FORMAT_VALUE, **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_vit3d(path: str | os.PathLike) -> tuple[ViT3D, dict[str, str]]:
    """Read a checkpoint written by :func:`save_vit3d` (strict). Returns ``(model, metadata)``.

    Raises:
        DinoregError: missing file, not safetensors, no/invalid embedded config, or weights that
            do not match the config exactly (missing, unexpected or mis-shaped tensors).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError("dino3d weights not found", p)
    try:
        with safe_open(str(p), framework="pt") as handle:
            meta = handle.metadata() or {}
        state = load_file(str(p))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise DinoregError(f"not a readable safetensors checkpoint ({type(exc).__name__})", p) from exc
    if CONFIG_KEY not in meta:
        raise DinoregError(f"safetensors file has no {CONFIG_KEY} metadata (not a dino3d checkpoint)", p)
    try:
        config = ViT3DConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    except (ValueError, TypeError) as exc:
        raise DinoregError(f"invalid embedded dino3d config ({exc})", p) from exc
    model = ViT3D(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise DinoregError(f"weights do not match the embedded config ({first[0].strip()})", p) from exc
    return model.eval(), meta


# --------------------------------------------------------------------------- encoder

class Dino3DEncoder:
    """The ``dino3d`` volumetric encoder: a 3D ViT applied by sliding windows.

    ``encode(volume)`` maps an ``(I, J, K)`` volume in ``[0, 1]`` to features
    ``(C, ceil(I/p), ceil(J/p), ceil(K/p))`` following the cell-centred contract of
    :mod:`dinoreg.features.base` (feature voxel ``a`` covers ``[a*I/n, (a+1)*I/n)``); with ``I`` a
    multiple of ``p`` that is exactly the patch ``[a*p, (a+1)*p)``.
    """

    name = "dino3d"

    def __init__(self, model: ViT3D, window: int | None = None, overlap: float = 0.5,
                 blend: str = "gaussian", device: str | torch.device = "cpu", progress: bool = False) -> None:
        self.model = model.to(device).eval()
        self.window = window or model.config.window
        self.overlap = overlap
        self.blend = blend
        self.progress = progress

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> "Dino3DEncoder":
        """Load a safetensors checkpoint (config embedded in the metadata); see :func:`load_vit3d`.

        ``path=None`` loads the checkpoint shipped with dinoreg (:data:`SHIPPED_WEIGHTS`, trained
        on the development data only - see ``assets/dino3d_shareddata.md``). Keyword arguments go
        to the constructor (``window``, ``overlap``, ``blend``, ``device``, ``progress``).
        """
        model, _ = load_vit3d(SHIPPED_WEIGHTS if path is None else path)
        return cls(model, **kwargs)

    def encode(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(I, J, K)`` float in ``[0, 1]`` -> ``(C, I', J', K')`` float32 CPU tensor."""
        vol = torch.as_tensor(volume if torch.is_tensor(volume) else np.asarray(volume), dtype=torch.float32)
        if vol.ndim != 3:
            raise DinoregError(f"dino3d expects a 3D volume, got shape {tuple(vol.shape)}")
        feats = sliding_window_features(self.model, vol, self.window, self.overlap, self.blend, self.progress)
        shape = (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2]))
        return align_to_field_of_view(feats, shape, self.patch_size)
