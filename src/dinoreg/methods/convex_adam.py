"""ConvexAdam (Siebert, Hansen & Heinrich): a coupled convex discrete search on coarse cells,
then Adam instance optimisation of a dense field, on any encoder's feature volumes.

Stages: :class:`~dinoreg.optim.convex_adam.ConvexStage` -> ``AdamStage`` -> (a final level when
``fine_iterations`` > 0: a second ``AdamStage`` on cells of ``fine_grid_sp`` voxels started from the
first's field, or, with ``fine_reencode``, a ``ReencodedAdamStage`` on the moving image warped by
that field and encoded again) -> (a ``MutualInformationStage`` on the images' intensities when
``mi_iterations`` > 0, the default; it skips itself when the images do not show one contrast) ->
(``SmoothStage`` when ``final_smoothing`` > 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Sequence

import numpy as np
import torch

from dinoreg.errors import DinoregError
from dinoreg.features.base import EncodeRequest, EncoderSpec
from dinoreg.features.registry import encoder_entry
from dinoreg.methods.registry import MethodSpec, method
from dinoreg.optim.convex import ConvexConfig
from dinoreg.optim.convex_adam import AdamStage, ConvexStage, MovingEncoder, ReencodedAdamStage, SmoothStage
from dinoreg.optim.instance import InstanceConfig
from dinoreg.optim.mutual_information import MIConfig, MutualInformationStage
from dinoreg.pair import RegistrationPair, Stage
from dinoreg.progress import Progress
from dinoreg.spec import setting


@dataclass(frozen=True)
class ConvexAdamSpec(MethodSpec):
    """Settings of both stages (defaults: the ``mind`` preset; the ``convexadam`` preset, the
    package's settings, turns the MI level off)."""

    name: ClassVar[str] = "convexadam"
    grid_sp: int = setting(6, "convex stage: cell size, voxels", low=1, high=32)
    disp_hw: int = setting(4, "convex stage: search half-width, cells", low=0, high=16)
    reach_mm_2d: float = setting(40.0, "convex stage on a 2D pair (one slice): the in-plane search reaches at least "
                                       "this far, mm (the half-width grows beyond disp_hw; 0: disp_hw alone)",
                                 low=0.0, high=1000.0)
    ic: bool = setting(True, "convex stage: inverse consistency")
    grid_sp_adam: int = setting(2, "Adam stage: cell size, voxels", low=1, high=32)
    iterations: int = setting(50, "Adam stage: iterations (0: no Adam stage; with mi_iterations=0 the convex stage "
                                  "alone)", low=0, high=100000)
    lr: float = setting(1.0, "Adam stage: learning rate, cells", low=0.0, low_open=True, high=1000.0)
    lambda_weight: float = setting(1.25, "Adam stage: diffusion regulariser weight", low=0.0, high=1e6)
    similarity: str = setting("ssd", "Adam stage: feature similarity", choices=("ssd", "lcc"))
    param_factor: int = setting(1, "Adam stage: parameters on a grid this many times coarser", low=1, high=8)
    grid_sp_adam_2d: int = setting(1, "Adam stage on a 2D pair (one slice): cell size, voxels (0: grid_sp_adam; "
                                      "full resolution is cheap in 2D)", low=0, high=32)
    lambda_scale_2d: float = setting(2.0, "Adam stage on a 2D pair: the regulariser weight is lambda_weight times "
                                          "this (finer 2D cells and 16 MIND channels need more)", low=0.0, high=100.0)
    fine_iterations: int = setting(0, "final level: Adam iterations on cells of fine_grid_sp voxels, from the "
                                      "Adam stage's field (0: off)", low=0, high=100000)
    fine_grid_sp: int = setting(2, "final level: cell size, voxels (1: the image grid; MIND is then pooled "
                                   "no coarser than 1)", low=1, high=32)
    fine_lr: float = setting(1.0, "final level: learning rate, cells", low=0.0, low_open=True, high=1000.0)
    fine_lambda: float = setting(1.25, "final level: diffusion regulariser weight", low=0.0, high=1e6)
    fine_reencode: bool = setting(False, "final level: warp the moving image by the field so far, encode it again "
                                         "and optimise an increment from zero (methods with one encoder)")
    mi_iterations: int = setting(100, "MI level: Adam iterations on the images' mutual information after the "
                                      "feature stages, when both show one contrast (0: off)", low=0, high=100000)
    mi_grid_sp: int = setting(3, "MI level: cell size of the increment, voxels", low=1, high=32)
    mi_lr: float = setting(0.1, "MI level: learning rate, cells", low=0.0, low_open=True, high=100.0)
    mi_lr_end: float = setting(1.0, "MI level: the learning rate falls geometrically to mi_lr times this by the "
                                    "last iteration (1: constant)", low=0.0, low_open=True, high=1.0)
    mi_base_smoothing: int = setting(0, "MI level: when it runs, first smooth the feature stages' field by three "
                                        "passes of this odd mean filter, voxels (0: off; smoother fields, see README)",
                                     low=0, high=31)
    mi_select_smoothing: int = setting(9, "MI level: a second start, the feature stages' field smoothed by this odd "
                                          "mean filter (voxels, three passes); both run on the same draws and the "
                                          "one with the higher MI goes on (0: one start)", low=0, high=31)
    mi_select_lr_end: float = setting(0.1, "MI level: the second start's learning rate falls geometrically to "
                                           "mi_lr times this by the last iteration (1: constant)",
                                      low=0.0, low_open=True, high=1.0)
    mi_select_grid_sp: int = setting(4, "MI level: the second start's increment on cells of this many voxels (0: "
                                        "mi_grid_sp)", low=0, high=32)
    mi_select_iterations: int = setting(30, "MI level: iterations after which the start with the lower MI is dropped "
                                           "(0: at the end)", low=0, high=100000)
    mi_cross_contrast: str = setting("check", "MI level on a pair of different contrasts (rank correlation below "
                                            "mi_min_correlation): skip it, or check: run it and keep its field only "
                                            "if it aligns the edges (NGF) better than the field so far",
                                     choices=("skip", "check"))
    mi_samples: int = setting(40000, "MI level: random fixed-foreground voxels per iteration", low=100, high=10**7)
    mi_bins: int = setting(32, "MI level: histogram bins per image", low=4, high=256)
    mi_lambda: float = setting(10.0, "MI level: diffusion weight on the increment, relative to -MI", low=0.0, high=1e6)
    mi_min_correlation: float = setting(0.5, "MI level: runs only when the fixed and the warped moving intensities' "
                                             "Spearman rank correlation is at least this (one contrast; -1: always)",
                                        low=-1.0, high=1.0)
    mi_sample_margin: int = setting(3, "MI level: samples from the fixed foreground dilated by this many voxels",
                                    low=0, high=64)
    final_smoothing: int = setting(0, "odd mean-filter size applied three times to the final field (0: off)",
                                   low=0, high=31)

    def cell_sizes(self) -> tuple[int, ...]:
        fine = (self.fine_grid_sp,) if self.fine_iterations > 0 else ()
        return (self.grid_sp, self.grid_sp_adam, *fine)

    def fine_config(self) -> InstanceConfig:
        """The final level's optimiser settings."""
        return InstanceConfig(grid_sp=self.fine_grid_sp, iterations=self.fine_iterations, lr=self.fine_lr,
                              lambda_weight=self.fine_lambda, similarity=self.similarity)


@method("convexadam", ConvexAdamSpec, "coupled convex search + Adam instance optimisation on feature volumes")
def convex_adam_stages(spec: ConvexAdamSpec, encoders: Sequence[EncoderSpec] = ()) -> list[Stage]:
    """The stages for ``spec``."""
    stages: list[Stage] = [
        ConvexStage(ConvexConfig(grid_sp=spec.grid_sp, disp_hw=spec.disp_hw, inverse_consistent=spec.ic),
                    reach_mm_2d=spec.reach_mm_2d)]
    if spec.iterations > 0:
        config = InstanceConfig(grid_sp=spec.grid_sp_adam, iterations=spec.iterations, lr=spec.lr,
                                lambda_weight=spec.lambda_weight, similarity=spec.similarity,
                                param_factor=spec.param_factor)
        stages.append(AdamStage(config, config_2d=_config_2d(config, spec)))
    if spec.fine_iterations > 0:
        stages.append(ReencodedAdamStage(spec.fine_config(), moving_encoder(spec, encoders)) if spec.fine_reencode
                      else AdamStage(spec.fine_config(), name="adam_fine"))
    if spec.mi_iterations > 0:
        stages.append(MutualInformationStage(MIConfig(grid_sp=spec.mi_grid_sp, iterations=spec.mi_iterations,
                                                      samples=spec.mi_samples, lr=spec.mi_lr, lr_end=spec.mi_lr_end,
                                                      bins=spec.mi_bins, base_smoothing=spec.mi_base_smoothing,
                                                      select_smoothing=spec.mi_select_smoothing,
                                                      select_lr_end=spec.mi_select_lr_end,
                                                      select_grid_sp=spec.mi_select_grid_sp,
                                                      select_iterations=spec.mi_select_iterations,
                                                      cross_contrast=spec.mi_cross_contrast,
                                                      lambda_weight=spec.mi_lambda,
                                                      min_correlation=spec.mi_min_correlation,
                                                      sample_margin=spec.mi_sample_margin)))
    if spec.final_smoothing > 1:
        stages.append(SmoothStage(spec.final_smoothing))
    return stages


def _config_2d(config: InstanceConfig, spec: ConvexAdamSpec) -> InstanceConfig:
    """The Adam stage's settings on a 2D pair: ``grid_sp_adam_2d`` cells (when set) and the
    regulariser weight scaled by ``lambda_scale_2d``."""
    return replace(config, grid_sp=spec.grid_sp_adam_2d or spec.grid_sp_adam,
                   lambda_weight=spec.lambda_weight * spec.lambda_scale_2d)


def moving_encoder(spec: ConvexAdamSpec, encoders: Sequence[EncoderSpec]) -> MovingEncoder:
    """``(image, mask, pair) -> (fixed features or None, moving features)`` of a new moving image
    on the fixed grid by the method's one encoder, pooled as the pair's own features (the same
    cell sizes). A per-image encoder (MIND) encodes the new image alone (``None``: the pair's
    fixed features still hold); a joint one (a PCA fitted on both images) encodes the fixed image
    again together with it, so that both sides share one basis."""
    if len(encoders) != 1:
        raise DinoregError(f"fine_reencode needs a method with one encoder, not {len(encoders)}")
    encoder, cells = encoders[0], spec.cell_sizes()
    entry = encoder_entry(encoder.name)

    def encode(image: np.ndarray, mask: np.ndarray,
               pair: RegistrationPair) -> tuple[torch.Tensor | None, torch.Tensor]:
        if entry.per_image:
            request = EncodeRequest(image, image, mask, mask, pair.affine, pair.device, Progress(False), encoder,
                                    cell_sizes=cells)
            return None, entry.encode_pair(request).fixed
        request = EncodeRequest(pair.fixed, image, pair.fixed_mask, mask, pair.affine, pair.device, Progress(False),
                                encoder, cell_sizes=cells)
        both = entry.encode_pair(request)
        return both.fixed, both.moving
    return encode
