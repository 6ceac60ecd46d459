"""One registry of encoders by name, filled by the modules of ``dinoreg.features`` themselves.

Two kinds of encoder register here:

* a **volume encoder** (``@volume_encoder("mind", MindSpec, "...")`` on a function
  ``EncodeRequest -> PairFeatures``): it turns a normalised pair into feature volumes itself
  (MIND-SSC, the 3D ViT);
* a **slice encoder** (``@slice_encoder("dinov2", DINOv2Spec, "...")`` on a loader
  ``(spec, device) -> Encoder2D``): a frozen 2D network. It feeds the feature-volume methods
  through the one generic slicewise pair encoder (``features.slicewise_pair``: slices, joint
  PCA, slice-match start) and the FFD loss directly.

Every module of the ``dinoreg.features`` package is imported once, the first time a name is
looked up, so adding an encoder means writing one module there (see the README's development
section). The spec class owns the encoder's settings and their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from dinoreg.errors import DinoregError
from dinoreg.plugins import import_submodules
from dinoreg.features.base import Encoder2D, EncodeRequest, EncoderSpec, PairFeatures, SlicewiseSpec

PairEncoder = Callable[[EncodeRequest], PairFeatures]
Loader2D = Callable[[EncoderSpec, str], Encoder2D]


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder.

    Attributes:
        name: what ``--features`` accepts.
        spec: its settings class (defaults included).
        description: one line for help texts and ``dinoreg presets``.
        encode_pair: normalised pair -> feature volumes (for ConvexAdam and ``dinoreg encode``).
        load_2d: for slice encoders, ``(spec, device) -> Encoder2D`` (FFD, capture range).
        per_image: each image's features depend on that image alone (MIND-SSC); False where the
            pair is encoded jointly (a PCA fitted on both, a slice match), so that features of a
            new moving image only match fixed features encoded together with it.
    """

    name: str
    spec: type[EncoderSpec]
    description: str
    encode_pair: PairEncoder
    load_2d: Loader2D | None = None
    per_image: bool = False

    @property
    def kind(self) -> str:
        """``"slice"`` (a 2D network lifted slice by slice) or ``"volume"``."""
        return "slice" if self.load_2d is not None else "volume"


_ENTRIES: dict[str, EncoderEntry] = {}


def _add(entry: EncoderEntry) -> None:
    if entry.name in _ENTRIES and _ENTRIES[entry.name].encode_pair is not entry.encode_pair:
        raise ValueError(f"encoder {entry.name!r} is registered twice")
    _ENTRIES[entry.name] = entry


def volume_encoder(name: str, spec: type[EncoderSpec], description: str,
                   per_image: bool = False) -> Callable[[PairEncoder], PairEncoder]:
    """Register ``fn(request) -> PairFeatures`` as the encoder ``name`` with settings ``spec``
    (``per_image``: see :class:`EncoderEntry`)."""

    def wrap(fn: PairEncoder) -> PairEncoder:
        _add(EncoderEntry(name, spec, description, fn, per_image=per_image))
        return fn

    return wrap


def slice_encoder(name: str, spec: type[SlicewiseSpec], description: str) -> Callable[[Loader2D], Loader2D]:
    """Register a 2D network loader ``fn(spec, device) -> Encoder2D`` as the encoder ``name``;
    its pair encoder is the generic slicewise one."""
    from dinoreg.features.slicewise_pair import slicewise_pair

    def wrap(loader: Loader2D) -> Loader2D:
        _add(EncoderEntry(name, spec, description, partial(slicewise_pair, loader), loader))
        return loader

    return wrap


def discover() -> None:
    """Import every module of ``dinoreg.features`` once (each registers its encoders)."""
    import_submodules("dinoreg.features")


def encoder_names(kind: str | None = None) -> list[str]:
    """Registered names, optionally only ``"slice"`` or ``"volume"`` encoders."""
    discover()
    return sorted(n for n, e in _ENTRIES.items() if kind is None or e.kind == kind)


def encoder_entry(name: str) -> EncoderEntry:
    """The entry called ``name``; a :class:`DinoregError` listing the registered names otherwise."""
    discover()
    if name not in _ENTRIES:
        raise DinoregError(f"unknown encoder {name!r}; choose from {', '.join(encoder_names())}")
    return _ENTRIES[name]


def load_encoder2d(name: str, spec: EncoderSpec | None = None, device: str | torch.device = "cpu") -> Encoder2D:
    """A frozen 2D network by name (its default settings unless ``spec`` is given)."""
    entry = encoder_entry(name)
    if entry.load_2d is None:
        raise DinoregError(f"encoder {name!r} is not a 2D slice encoder; choose from "
                           f"{', '.join(encoder_names('slice'))}")
    return entry.load_2d(spec if spec is not None else entry.spec(), str(device))
