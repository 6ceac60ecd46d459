"""DINOv2 vision transformer (our own implementation, no timm) as a 2D slice encoder.

Architecture (Oquab et al. 2023, ``facebookresearch/dinov2``): a 14x14 convolutional patch
embedding, a cls token, optionally 4 register tokens, learned position embeddings for a 37x37
patch grid (518x518 pixels) resized **bicubically** (``align_corners=False``,
``antialias=False``) to the input's patch grid, pre-norm transformer blocks
``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))`` with LayerScale vectors, and a final
LayerNorm (eps 1e-6). ``vitg14`` uses a SwiGLU MLP; the others GELU.

Token order inside the network: ``[cls, registers..., patches (row-major)]``. :meth:`DINOv2.forward`
returns the normed patch tokens as a map ``(B, C, h, w)`` and the normed cls token ``(B, C)``.

Accepted checkpoints (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
``.safetensors``), all converted to our parameter names, which are the official ones:

* official ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` (``cls_token``, ``pos_embed``,
  ``register_tokens``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``; ``mask_token`` is
  accepted and dropped; chunked ``blocks.C.N.*`` is flattened);
* the same layout in safetensors (timm ``vit_*_patch14_dinov2`` keys are identical);
* Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``embeddings.*``,
  ``encoder.layer.N.*`` with separate query/key/value, ``layer_scale1.lambda1``,
  ``layernorm.*``), optionally under a ``dinov2.``/``backbone.``/``model.``/``module.`` prefix.

Loading is strict: every backbone tensor must be used and every shape must match the named
architecture; anything else is a one-line :class:`~dinoreg.errors.DinoregError` naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.errors import DinoregError
from dinoreg.features.base import SlicewiseSpec
from dinoreg.features.registry import slice_encoder
from dinoreg.features.weights import resolve_weights
from dinoreg.spec import setting

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 14
POS_GRID = 37  # the checkpoints' position-embedding grid (518 / 14)


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of one DINOv2 variant."""

    embed_dim: int
    depth: int
    heads: int
    registers: int = 0
    swiglu: bool = False
    mlp_ratio: float = 4.0
    patch_size: int = PATCH
    pos_grid: int = POS_GRID

    @property
    def hidden(self) -> int:
        """MLP hidden width (SwiGLU: 2/3 of ``mlp_ratio * C`` rounded up to a multiple of 8)."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden


_BASE = {
    "vits14": ViTConfig(384, 12, 6),
    "vitb14": ViTConfig(768, 12, 12),
    "vitl14": ViTConfig(1024, 24, 16),
    "vitg14": ViTConfig(1536, 40, 24, swiglu=True),
}
ARCHS: dict[str, ViTConfig] = {
    **_BASE,
    **{f"{k}_reg": ViTConfig(c.embed_dim, c.depth, c.heads, 4, c.swiglu) for k, c in _BASE.items()},
}


def normalise_arch(arch: str) -> str:
    """``"dinov2_vitb14_reg4"`` -> ``"vitb14_reg"``; raises for unknown names."""
    key = arch.lower().removeprefix("dinov2_").replace("_reg4", "_reg")
    if key not in ARCHS:
        raise DinoregError(f"unknown DINOv2 size {arch!r}; choose one of {', '.join(ARCHS)}")
    return key


def arch_config(arch: str) -> ViTConfig:
    """Config for ``vits14``, ``vitb14``, ``vitl14``, ``vitg14`` or their ``_reg`` variants."""
    return ARCHS[normalise_arch(arch)]


# ----------------------------------------------------------------------------- network


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` (exact erf GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``(a, b) = w12(x)`` split in halves (ViT-g)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLU if cfg.swiglu else Mlp)(dim, cfg.hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens, as a strided convolution."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class DINOv2(nn.Module):
    """A DINOv2 ViT implementing :class:`~dinoreg.features.base.Encoder2D`.

    Build one with :func:`load_dinov2` (pretrained) or ``DINOv2(arch_config("vits14"))``
    (random weights). The network is frozen in eval mode by the loader.
    """

    def __init__(self, cfg: ViTConfig, name: str = "dinov2") -> None:
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, dim)) if cfg.registers else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def preprocess(self, grey: torch.Tensor) -> torch.Tensor:
        """Grey slices ``(B, 1, H, W)`` in ``[0, 1]`` -> network input ``(B, 3, H', W')``.

        The slice is **zero-padded at the bottom and right** (value 0 = background, before
        normalisation) to ``H' = 14 * ceil(H / 14)``, ``W' = 14 * ceil(W / 14)``; nothing is
        cropped, so patch ``(y, x)`` covers original pixels ``[14y, 14y + 14) x [14x, 14x + 14)``
        and the last row/column of patches may extend past the slice. Then the grey value is
        repeated to 3 channels and normalised with the ImageNet mean and std.
        """
        if grey.ndim != 4 or grey.shape[1] != 1:
            raise DinoregError(f"dinov2 expects grey slices (B, 1, H, W), got {tuple(grey.shape)}")
        p = self.patch_size
        pad_h, pad_w = -grey.shape[2] % p, -grey.shape[3] % p
        if pad_h or pad_w:
            grey = F.pad(grey, (0, pad_w, 0, pad_h), value=0.0)
        mean = torch.tensor(IMAGENET_MEAN, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
        return (grey.expand(-1, 3, -1, -1) - mean) / std

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + h*w, C)`` for an ``h x w`` patch grid (cls first)."""
        g = self.cfg.pos_grid
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) != (g, g):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False,
                                 antialias=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid], dim=1)

    def forward(self, x: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input ``(B, 3, 14h, 14w)`` -> ``(patch tokens (B, C, h, w), cls (B, C))``.

        ``layer`` 0: the last block's tokens; ``k`` in ``1..depth``: block ``k``'s output (only
        the first ``k`` blocks run). Either way the final LayerNorm is applied (as DINOv2's
        ``get_intermediate_layers(norm=True)``)."""
        depth = len(self.blocks)
        if not 0 <= int(layer) <= depth:
            raise DinoregError(f"dinov2 layer must be 0 (last) or 1..{depth}, got {layer}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise DinoregError(f"dinov2 input {tuple(x.shape[-2:])} is not a multiple of "
                               f"{self.patch_size}; call preprocess() first")
        tokens = self.patch_embed(x)
        b, c, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h, w)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        for block in self.blocks[: int(layer) or depth]:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        patches = tokens[:, 1 + self.cfg.registers:].transpose(1, 2).reshape(b, c, h, w)
        return patches, tokens[:, 0]


# ----------------------------------------------------------------------------- checkpoints

_PREFIXES = ("", "module.", "model.", "backbone.", "dinov2.", "teacher.backbone.",
             "student.backbone.", "teacher.", "encoder.")
_OURS_ANCHOR = "patch_embed.proj.weight"
_HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_DROPPED = ("mask_token",)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict.

    Unwraps ``state_dict``/``model``/``teacher`` sub-dicts; an unreadable file is a one-line
    :class:`DinoregError` naming it.
    """
    try:
        if path.name.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a corrupt/unsupported file
        raise DinoregError(f"cannot read weights ({type(exc).__name__}: {exc})", path) from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and _OURS_ANCHOR not in sd:
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DinoregError("weights file does not hold a state dict of tensors", path)
    return sd


def _strip_prefix(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Keep the backbone's tensors with the wrapper prefix (``backbone.``, ...) removed."""
    for prefix in _PREFIXES:
        if prefix + _OURS_ANCHOR in sd or prefix + _HF_ANCHOR in sd:
            if not prefix:
                return dict(sd)
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    raise DinoregError("not a DINOv2 checkpoint (no patch embedding "
                       f"'{_OURS_ANCHOR}' or '{_HF_ANCHOR}')", path)


_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")


def _hf_key(key: str) -> str:
    """Our name for one Hugging Face ``Dinov2Model`` key (unknown keys are returned unchanged)."""
    if key in _HF_TOP:
        return _HF_TOP[key]
    match = _HF_LAYER.match(key)
    if match:
        rest = match.group(2)
        for hf, ours in _HF_BLOCK.items():
            if rest.startswith(hf + ".") or rest == hf:
                return f"blocks.{match.group(1)}.{ours}{rest[len(hf):]}"
    return "hf:" + key


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``Dinov2Model`` state dict to ours; q, k, v are concatenated to qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        match = _HF_QKV.match(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
        else:
            out[_hf_key(key)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            out[f"hf:encoder.layer.{layer}.attention.attention.*.{kind} (incomplete q/k/v)"] = \
                next(iter(parts.values()))
            continue
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def to_ours(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Any accepted layout -> our parameter names (``mask_token`` dropped, chunks flattened)."""
    sd = _strip_prefix(sd, path)
    if _HF_ANCHOR in sd:
        sd = from_hf(sd)
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block_chunks > 0
        if key not in _DROPPED:
            out[key] = value
    if "pos_embed" in out and out["pos_embed"].ndim == 2:
        out["pos_embed"] = out["pos_embed"][None]
    return out


def infer_arch(sd: dict[str, torch.Tensor], path: Path) -> str:
    """Architecture name (``vits14``, ``vitb14_reg``, ...) of a state dict in our layout."""
    dim = int(sd[_OURS_ANCHOR].shape[0])
    names = {c.embed_dim: n for n, c in _BASE.items()}
    if dim not in names:
        raise DinoregError(f"unrecognised DINOv2 width {dim} (known: "
                           f"{', '.join(f'{c.embed_dim}={n}' for n, c in _BASE.items())})", path)
    return names[dim] + ("_reg" if "register_tokens" in sd else "")


def _describe(sd: dict[str, torch.Tensor]) -> str:
    """Best-effort architecture name for messages (never raises)."""
    if _OURS_ANCHOR not in sd:
        return "no DINOv2"
    dim = int(sd[_OURS_ANCHOR].shape[0])
    names = {c.embed_dim: n for n, c in _BASE.items()}
    return names.get(dim, f"width {dim}") + ("_reg" if "register_tokens" in sd else "")


def load_into(model: DINOv2, sd: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Copy ``sd`` (our layout) into ``model`` strictly: same keys, same shapes."""
    if _OURS_ANCHOR in sd and sd[_OURS_ANCHOR].ndim == 4:
        found = infer_arch(sd, path) if sd[_OURS_ANCHOR].shape[0] != model.embed_dim else arch
        if found.removesuffix("_reg") != arch.removesuffix("_reg"):
            raise DinoregError(f"weights are DINOv2 {found} (width {sd[_OURS_ANCHOR].shape[0]}), "
                               f"not {arch}", path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        found = _describe(sd)
        detail = "; ".join(part for part in (
            f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
        ) if part)
        raise DinoregError(f"weights do not fit DINOv2 {arch} (they look like {found}): {detail}", path)
    for key, target in expected.items():
        if tuple(sd[key].shape) != tuple(target.shape):
            raise DinoregError(f"weights do not fit DINOv2 {arch}: {key} has shape "
                               f"{tuple(sd[key].shape)}, expected {tuple(target.shape)}", path)
        if not torch.isfinite(sd[key]).all():
            raise DinoregError(f"weights tensor {key} holds NaN or infinite values", path)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)


def weight_names(arch: str) -> list[str]:
    """Accepted file names for ``arch``: the official ``.pth`` first, then converted variants."""
    official = official_name(arch)
    stem = official.removesuffix("_pretrain")
    return [f"{official}.pth", f"{stem}.safetensors", f"{stem}.pth", f"{official}.safetensors"]


def official_name(arch: str) -> str:
    """``dinov2_vits14_pretrain``, ``dinov2_vitb14_reg4_pretrain``, ..."""
    key = normalise_arch(arch)
    base = key.removesuffix("_reg")
    return f"dinov2_{base}_reg4_pretrain" if key.endswith("_reg") else f"dinov2_{base}_pretrain"


def official_url(arch: str) -> str:
    """Meta's download URL for ``arch``'s pretrained backbone."""
    name = official_name(arch)
    folder = name.removesuffix("_pretrain").removesuffix("_reg4")
    return f"https://dl.fbaipublicfiles.com/dinov2/{folder}/{name}.pth"


def load_dinov2(arch: str | None = None, weights: str | os.PathLike | None = None,
                device: str | torch.device = "cpu", *, download: bool | None = None,
                progress: bool = True) -> DINOv2:
    """A frozen, pretrained DINOv2 in eval mode.

    Args:
        arch: ``vits14`` ... ``vitg14`` (``_reg`` for register variants); None infers it from
            the weights (an explicit ``weights`` file is then required, else ``vits14``).
        weights: a checkpoint file or folder; None resolves the official file name through
            :func:`~dinoreg.features.weights.resolve_weights` (env folder, cache, download).
        device: where the model lives.
        download: allow downloading the official checkpoint (None: unless ``DINOREG_OFFLINE``).
        progress: download progress bar.
    """
    lookup = normalise_arch(arch) if arch else "vits14"
    path = resolve_weights(f"dinov2 {lookup}", weight_names(lookup), explicit=weights,
                           url=official_url(lookup), download=download, progress=progress)
    sd = to_ours(read_state_dict(path), path)
    name = normalise_arch(arch) if arch else infer_arch(sd, path)
    model = DINOv2(arch_config(name), name=f"dinov2_{name}")
    load_into(model, sd, path, name)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------- the registered encoder


@dataclass(frozen=True)
class DINOv2Spec(SlicewiseSpec):
    """DINO-Reg settings of the DINOv2 slice encoder (ViT-S/14 unless the weights say otherwise)."""

    name: ClassVar[str] = "dinov2"
    arch: str | None = setting(None, "DINOv2 size: vits14, vitb14, vitl14, vitg14 (+ _reg4 for register "
                                     "variants); none infers it from the weights")

    def check(self) -> None:
        if self.arch is not None:
            normalise_arch(self.arch)


@lru_cache(maxsize=2)
def cached_model(arch: str | None, weights: str | None, device: str) -> DINOv2:
    """Load a DINOv2 once per process (weights resolved as ``features.weights`` describes)."""
    return load_dinov2(arch, weights, device=device)


@slice_encoder("dinov2", DINOv2Spec, "DINOv2 ViT slice features (DINO-Reg; Oquab et al. 2023)")
def _load(spec: DINOv2Spec, device: str) -> DINOv2:
    return cached_model(spec.arch, spec.weights, device)
