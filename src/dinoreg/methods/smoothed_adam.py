"""Adam-only registration on feature volumes with the field smoothed inside every iteration
(no convex stage): the DINO-Reg authors' published inference (``dinoreg-paper`` preset).
One :class:`~dinoreg.optim.smoothed_adam.SmoothedAdamStage`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from dinoreg.errors import DinoregError
from dinoreg.features.base import EncoderSpec
from dinoreg.methods.registry import MethodSpec, method
from dinoreg.optim.smoothed_adam import SmoothedAdamConfig, SmoothedAdamStage
from dinoreg.pair import Stage
from dinoreg.spec import setting


@dataclass(frozen=True)
class SmoothedAdamSpec(MethodSpec):
    """Settings (defaults: the authors' values)."""

    name: ClassVar[str] = "adam"
    grid_sp_adam: int = setting(1, "cell size of the field, voxels (1: the image grid)", low=1, high=32)
    iterations: int = setting(1000, "Adam iterations", low=1, high=100000)
    lr: float = setting(3.0, "Adam learning rate, cells", low=0.0, low_open=True, high=1000.0)
    lambda_weight: float = setting(2.0, "diffusion regulariser weight", low=0.0, high=1e6)
    smooth_kernel: int = setting(7, "box filter applied to the field inside every iteration, cells (odd)",
                                 low=1, high=31)
    smooth_passes: int = setting(5, "box filter passes inside every iteration", low=0, high=20)

    def check(self) -> None:
        if self.smooth_kernel % 2 == 0:
            raise DinoregError(f"setting 'smooth_kernel' must be odd, got {self.smooth_kernel}")

    def cell_sizes(self) -> tuple[int, ...]:
        return (self.grid_sp_adam,)


@method("adam", SmoothedAdamSpec, "Adam alone on a dense field smoothed inside every iteration (DINO-Reg's script)")
def smoothed_adam_stages(spec: SmoothedAdamSpec, encoders: Sequence[EncoderSpec] = ()) -> list[Stage]:
    """One smoothed-Adam stage."""
    return [SmoothedAdamStage(SmoothedAdamConfig(grid_sp=spec.grid_sp_adam, iterations=spec.iterations, lr=spec.lr,
                                                 lambda_weight=spec.lambda_weight, smooth_kernel=spec.smooth_kernel,
                                                 smooth_passes=spec.smooth_passes))]
