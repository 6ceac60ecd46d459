"""B-spline FFD with encoder features in the loss (Kögl, Reithmeir et al., MICCAI 2024).

``(1 - alpha) NCC(F, M∘φ) + alpha D_feat(enc(F), enc(M∘φ)) + reg_weight ||∇u||²``, the frozen
2D encoder (the registration's one slice encoder) run on the *warped* moving image at every
iteration. One stage (:class:`FFDStage`) working on the images, not on feature volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.base import EncoderSpec
from dinoreg.features.registry import encoder_entry, encoder_names, load_encoder2d
from dinoreg.features.slicewise_pair import slice_axis
from dinoreg.methods.registry import MethodSpec, method
from dinoreg.optim.ffd import FEATURE_DISTANCES, IMAGE_DISTANCES, FFDRegistration
from dinoreg.pair import RegistrationPair, Stage
from dinoreg.progress import Progress
from dinoreg.spatial.bspline import spacing_from_mm
from dinoreg.spec import setting


@dataclass(frozen=True)
class FFDSpec(MethodSpec):
    """FFD settings (defaults: the ``ffd`` preset).

    Defaults chosen by measurement (``benchmarks/ffd_sweep.py``, 2D slices; README *Studies*): a
    3 mm control grid with a light regulariser (0.03), 100 Adam steps per level of a 2-level
    pyramid. Variant 2 of Kögl et al. is ``alpha=0.3`` with ``features=dinov2`` (cosine distance,
    the last block's tokens, balanced): on the OASIS brain slice it beats NCC alone at these
    settings and at NCC's own best, on the LapIRN slice it is level, on the abdominal MR -> CT
    slice it loses. ``alpha`` stays 0 (NCC alone) so that the preset runs without weights."""

    name: ClassVar[str] = "ffd"
    uses_features: ClassVar[bool] = False
    needs_slice_encoder: ClassVar[bool] = True
    alpha: float = setting(0.0, "weight of the feature distance (0: NCC alone, 1: features alone)", low=0.0, high=1.0)
    feature_distance: str = setting("cos", "feature distance", choices=tuple(FEATURE_DISTANCES))
    image_distance: str = setting("ncc", "image distance", choices=tuple(IMAGE_DISTANCES))
    grid_spacing: float = setting(3.0, "control-point spacing, mm", low=0.0, low_open=True, high=1000.0)
    reg_weight: float = setting(0.03, "diffusion regulariser weight", low=0.0, high=1e6)
    iterations: int = setting(100, "Adam iterations per pyramid level", low=1, high=100000)
    lr: float = setting(0.1, "Adam learning rate", low=0.0, low_open=True, high=1000.0)
    levels: tuple[int, ...] = setting((2, 1), "pyramid factors, coarse to fine", low=1, high=16)
    slice_stride: int = setting(1, "3D: encode every k-th slice per iteration", low=1)
    feature_upsample: float = setting(1.0, "slice upsampling before the encoder", low=0.0, low_open=True, high=16.0)
    balance: bool = setting(True, "rescale the feature term once so its gradient matches NCC's")
    feature_layer: int = setting(0, "encoder block whose tokens are compared (0: the output; k: block k, "
                                    "dinov2 only)", low=0, high=64)

    def accepts_encoder(self, encoder: EncoderSpec) -> bool:
        return encoder_entry(encoder.name).kind == "slice"

    def check_encoders(self, encoders: Sequence[EncoderSpec]) -> None:
        choices = ", ".join(encoder_names("slice"))
        if len(encoders) > 1:
            raise DinoregError(f"method ffd takes one encoder in its loss, got {'+'.join(e.name for e in encoders)}")
        if encoders and not self.accepts_encoder(encoders[0]):
            raise DinoregError(f"method ffd needs a 2D slice encoder in its loss ({choices}), got {encoders[0].name}")
        if self.alpha > 0 and not encoders:
            raise DinoregError(f"setting 'alpha' > 0 needs an encoder for the feature distance (features: {choices})")
        if self.feature_layer and encoders and encoders[0].name != "dinov2":
            raise DinoregError(f"setting 'feature_layer' {self.feature_layer} needs the dinov2 encoder "
                               f"(intermediate-layer tokens), got {encoders[0].name}")


class FFDStage:
    """The FFD optimisation (2D for single-slice images, else 3D with a slicewise encoder)."""

    name = "ffd"

    def __init__(self, spec: FFDSpec, encoder: EncoderSpec | None) -> None:
        self.spec = spec
        self.encoder = encoder

    def run(self, pair: RegistrationPair, previous: torch.Tensor | None,
            progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        import time

        spec, dev = self.spec, pair.device
        is_2d = pair.shape[2] == 1
        start = time.perf_counter()
        network = None
        if self.encoder is not None and spec.alpha > 0:
            network = load_encoder2d(self.encoder.name, self.encoder, dev)
        load_s = time.perf_counter() - start
        axis_option = getattr(self.encoder, "slice_axis", "auto")
        ffd = FFDRegistration(
            network, alpha=spec.alpha, feature_distance=spec.feature_distance, image_distance=spec.image_distance,
            grid_spacing=spacing_from_mm(spec.grid_spacing, tuple(pair.spacing[: 2 if is_2d else 3])),
            reg_weight=spec.reg_weight, iterations=spec.iterations, lr=spec.lr, levels=spec.levels,
            slice_axis=-1 if is_2d else slice_axis(axis_option, pair.affine), slice_stride=spec.slice_stride,
            feature_upsample=spec.feature_upsample, balance=spec.balance, feature_layer=spec.feature_layer,
            progress=progress.enabled)
        fixed_t = torch.from_numpy(pair.fixed).to(dev)[None, None]
        moving_t = torch.from_numpy(pair.moving).to(dev)[None, None]
        mask = pair.user_fixed_mask
        mask_t = None if mask is None else torch.from_numpy(mask.astype(np.float32)).to(dev)[None, None]
        if is_2d:
            fixed_t, moving_t = fixed_t[..., 0], moving_t[..., 0]
            mask_t = None if mask_t is None else mask_t[..., 0]
        disp = ffd.register(fixed_t, moving_t, mask=mask_t)
        if is_2d:
            disp = torch.cat([disp, torch.zeros_like(disp[:, :1])], 1)[..., None]
        return disp.detach().float(), {"load_encoder": load_s}


@method("ffd", FFDSpec, "B-spline FFD, NCC mixed with a 2D encoder's feature distance by alpha (Kögl et al.)")
def ffd_stages(spec: FFDSpec, encoders: Sequence[EncoderSpec] = ()) -> list[Stage]:
    """One FFD stage; the registration's encoder (at most one, a 2D slice encoder) is its loss's."""
    return [FFDStage(spec, encoders[0] if encoders else None)]
