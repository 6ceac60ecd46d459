"""Named settings bundles (``--preset``). Any key can be overridden from the CLI or the API.

Keys:
    features: encoder name, or ``a+b`` for an ensemble (see ``dinoreg.features.registry``).
    grid_sp, disp_hw, coupling, ic: the convex stage (cells of ``grid_sp`` voxels, search
        ``[-disp_hw, disp_hw]`` cells per axis, coupling weights, inverse consistency).
    grid_sp_adam, iterations, lr, lambda_weight, similarity: the Adam stage.
    final_smoothing: odd mean-filter size applied three times to the final field (0 = off).
    Encoder options (``mind_radius``, ``mind_dilation``, ``mind_downsample``, ...) are passed on.
"""

from __future__ import annotations

from typing import Any

from dinoreg.errors import DinoregError

PRESETS: dict[str, dict[str, Any]] = {
    # MIND-SSC + ConvexAdam tuned for 2 CPU cores (see the README's benchmark table).
    "mind": dict(features="mind", mind_radius=1, mind_dilation=2, mind_downsample=1,
                 grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2, iterations=40, lr=1.0,
                 lambda_weight=1.25, similarity="ssd", final_smoothing=0),
    # The reference ConvexAdam settings (convexadam 0.2.0 defaults), slower.
    "convexadam": dict(features="mind", mind_radius=1, mind_dilation=2, mind_downsample=1,
                       grid_sp=6, disp_hw=4, ic=True, grid_sp_adam=2, iterations=80, lr=1.0,
                       lambda_weight=1.25, similarity="ssd", final_smoothing=0),
}


def preset(name: str) -> dict[str, Any]:
    """A copy of the named preset; :class:`DinoregError` listing the choices for an unknown name."""
    if name not in PRESETS:
        raise DinoregError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
