"""2D encoders by name, for methods that run the encoder inside the loss (FFD).

``load_encoder2d(name, weights=None, device="cpu")`` returns a frozen :class:`Encoder2D`:
``dinov2`` (ViT-S/14 unless the weights say otherwise), ``litemedsam`` (TinyViT-5M),
``sam`` / ``medsam`` (ViT-B). Weights are resolved as each loader documents.
"""

from __future__ import annotations

from typing import Callable

import torch

from dinoreg.errors import DinoregError
from dinoreg.features.base import Encoder2D


def _dinov2(weights: str | None, device: str) -> Encoder2D:
    from dinoreg.features.dinov2_pair import cached_model

    return cached_model(None, weights, device)


def _litemedsam(weights: str | None, device: str) -> Encoder2D:
    from dinoreg.features.tinyvit import load_litemedsam

    return load_litemedsam(weights).to(device)


def _sam(flavour: str) -> Callable[[str | None, str], Encoder2D]:
    def load(weights: str | None, device: str) -> Encoder2D:
        from dinoreg.features.sam import load_sam

        return load_sam(flavour, weights).to(device)
    return load


LOADERS: dict[str, Callable[[str | None, str], Encoder2D]] = {
    "dinov2": _dinov2, "litemedsam": _litemedsam, "sam": _sam("sam"), "medsam": _sam("medsam"),
}


def load_encoder2d(name: str, weights: str | None = None, device: str | torch.device = "cpu") -> Encoder2D:
    """A frozen 2D encoder; :class:`DinoregError` listing the choices for an unknown name."""
    if name not in LOADERS:
        raise DinoregError(f"unknown 2D encoder {name!r}; choose from {', '.join(sorted(LOADERS))}")
    return LOADERS[name](weights, str(device))
