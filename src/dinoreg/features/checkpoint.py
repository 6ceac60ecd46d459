"""Strict loading of one sub-network's tensors from a PyTorch checkpoint.

A SAM-family checkpoint (``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``, ``lite_medsam.pth``)
is a flat ``{name: tensor}`` dict holding the image encoder under ``image_encoder.*`` next to
the prompt encoder and mask decoder. dinoreg needs only the image encoder: it takes every
tensor under the prefix, and refuses the file (:class:`DinoregError` naming it) when a tensor
the module needs is missing, a tensor under the prefix is not used, or a shape differs.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from dinoreg.errors import DinoregError


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict (tensors only, ``weights_only``); a ``{"model": ...}`` or
    ``{"state_dict": ...}`` wrapper (training checkpoints) is unwrapped."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DinoregError("checkpoint file not found", path) from None
    except Exception as exc:  # pickle / zip errors: report as a bad file
        raise DinoregError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", path) from None
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DinoregError("checkpoint is not a {name: tensor} state dict", path)
    return dict(state)


def _listing(names: list[str], limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(sorted(names)[:limit]) + more


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str,
                path: str | os.PathLike) -> None:
    """Copy ``state[prefix + name]`` into every tensor of ``module.state_dict()``.

    Raises :class:`DinoregError` naming ``path`` when a needed tensor is missing, a tensor under
    ``prefix`` is unused (unexpected), or a shape differs. Tensors outside ``prefix`` are ignored.
    """
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise DinoregError(f"no '{prefix}*' tensors in checkpoint", path)
    own = module.state_dict()
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    if missing:
        raise DinoregError(f"checkpoint lacks {len(missing)} {prefix}* tensors: {_listing(missing)}", path)
    if unexpected:
        raise DinoregError(f"checkpoint has {len(unexpected)} unexpected {prefix}* tensors: "
                           f"{_listing(unexpected)}", path)
    for name, tensor in own.items():
        if tuple(sub[name].shape) != tuple(tensor.shape):
            raise DinoregError(f"tensor {prefix}{name} has shape {tuple(sub[name].shape)}, "
                               f"the architecture needs {tuple(tensor.shape)}", path)
    module.load_state_dict(sub, strict=True)
