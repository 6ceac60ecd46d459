"""dinoreg: training-free deformable medical image registration with foundation-model features.

Python API (mirrors the CLI)::

    import dinoreg
    result = dinoreg.register("fixed.nii.gz", "moving.nii.gz", preset_name="mind")
    result.disp      # (I, J, K, 3) float32, voxels of the fixed grid, pull-back (Learn2Reg)
    result.save("out/")
"""

from dinoreg.api import Result, evaluate, register, warp
from dinoreg.errors import DinoregError
from dinoreg.io.images import Image, load_image, save_image

__all__ = ["register", "warp", "evaluate", "Result", "Image", "load_image", "save_image", "DinoregError"]
__version__ = "0.1.0"
