"""Named registrations (``--preset``): each a :class:`RegistrationSpec` instance with a description.

Every value not written here is the default of its settings class; ``dinoreg presets`` lists
them, and any setting can be overridden by flat ``key=value`` settings (see
:mod:`dinoreg.registration_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dinoreg.errors import DinoregError
from dinoreg.features.dinov2 import DINOv2Spec
from dinoreg.features.ensemble import EnsembleSpec
from dinoreg.features.mind import MindSpec
from dinoreg.methods.convex_adam import ConvexAdamSpec
from dinoreg.methods.ffd import FFDSpec
from dinoreg.methods.smoothed_adam import SmoothedAdamSpec
from dinoreg.registration_spec import RegistrationSpec


@dataclass(frozen=True)
class Preset:
    """A named registration and what it is for."""

    name: str
    description: str
    spec: RegistrationSpec


def _presets() -> dict[str, Preset]:
    items = [
        Preset("mind", "MIND-SSC + ConvexAdam tuned for CPU (the reference settings with 50 Adam iterations), "
                       "then a mutual-information level on the intensities (kept across contrasts only if it aligns the "
                       "edges better)",
               RegistrationSpec(ConvexAdamSpec(), (MindSpec(),))),
        Preset("convexadam", "MIND-SSC + ConvexAdam with the convexadam 0.2.0 package's defaults (80 iterations, "
                             "no MI level)",
               RegistrationSpec(ConvexAdamSpec(iterations=80, mi_iterations=0), (MindSpec(),))),
        Preset("dinoreg", "DINO-Reg on CPU: MIND-SSC + a tri-planar DINOv2 block (14 mm tokens, slices every 12 mm "
                          "along all three axes, joint PCA) guiding the convex search at power 0.2, MIND alone in "
                          "the Adam stage, from DINOv2's cls-token slice match",
               RegistrationSpec(ConvexAdamSpec(), (MindSpec(), DINOv2Spec(planes="tri", token_mm=14.0, every_mm=12.0)),
                                EnsembleSpec(ensemble="concat", ensemble_weights=(1.0, 0.2), refine_weights=(1.0, 0.0)))),
        Preset("dinoreg-fast", "MIND-SSC + ConvexAdam started from DINOv2's cls-token slice match (the global "
                               "foundation feature; dense DINOv2 channels measured to hurt, see the README)",
               RegistrationSpec(ConvexAdamSpec(), (MindSpec(), DINOv2Spec(token_mm=14.0, every_mm=12.0)),
                                EnsembleSpec(ensemble="concat", ensemble_weights=(1.0, 0.0)))),
        Preset("dinoreg-ensemble", "MIND-SSC + a small DINOv2 block (weight 0.05) and DINOv2's slice-match start, "
                                   "the mind preset's optimiser",
               RegistrationSpec(ConvexAdamSpec(), (MindSpec(), DINOv2Spec(upsample=2.0, every=6)),
                                EnsembleSpec(ensemble="concat", ensemble_weights=(1.0, 0.05)))),
        Preset("dinoreg-paper", "the DINO-Reg authors' published inference: ViT-L/14-reg4, 112x96 patches per "
                                "slice, every 3rd slice, PCA 24, Adam alone on the full-resolution field (1000 it, "
                                "lr 3, weight 2, smoothed 7x5 inside every iteration); GPU-sized",
               RegistrationSpec(SmoothedAdamSpec(), (DINOv2Spec(arch="vitl14_reg4", patch_grid=(112, 96), every=3,
                                                                slice_match=False),))),
        Preset("ffd", "B-spline FFD with NCC (3 mm grid, lambda 0.03, 2x100 steps); add "
                      "features=dinov2|litemedsam|sam|medsam and alpha > 0 for the encoder feature distance "
                      "(Kögl et al.; variant 2: features=dinov2 alpha=0.3)",
               RegistrationSpec(FFDSpec(), ())),
    ]
    return {p.name: p for p in items}


PRESETS: dict[str, Preset] = _presets()


def preset(name: str) -> Preset:
    """The named preset; :class:`DinoregError` listing the choices for an unknown name."""
    if name not in PRESETS:
        raise DinoregError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def resolve(preset_name: str = "mind", overrides: Mapping[str, Any] | None = None) -> RegistrationSpec:
    """The preset's spec with flat ``overrides`` applied (``None`` values mean "not given")."""
    spec = preset(preset_name).spec
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return spec.with_flat(given) if given else spec
