"""Paired views with a known voxel correspondence, in synthetic or real contrasts (SynthSeg /
SynthMorph / anatomix idea), for dense contrastive pretraining.

A *subject* is a label map ``(I, J, K)`` (long, consecutive values ``0 .. L-1``) and, when it
came from an image, that image in ``[0, 1]``. Label maps are real segmentations (FreeSurfer
aseg, TotalSegmentator...) or, for an unlabelled image, :func:`pseudo_labels` (intensity
quantiles of the lightly smoothed image, ``0`` = background).

One *pair* (:func:`synth_pair`) around a centre of a subject:

* view A samples the source at ``c + M (q - h)`` (``q`` the output voxel, ``h = (G-1)/2``,
  ``M`` a random scale x rotation x flip as in :mod:`.augment`);
* view B samples it at ``c + M (q' - h)`` with ``q' = h + R (q - h) + t + d(q)``: a small
  random rotation/scale ``R``, a translation ``t`` and a smooth random displacement ``d``
  (Gaussian noise on a coarse control grid, upsampled trilinearly). So voxel ``q`` of B shows
  the anatomy of position ``q'(q)`` of A - the correspondence returned with the pair, in A's
  voxel coordinates ``(3, G, G, G)``;
* each view is then *rendered* independently (:func:`render`): with probability
  ``real_prob`` (when the subject has an image) the real intensities, passed through a random
  non-monotone look-up table with probability ``lut_prob``; otherwise a Gaussian mixture on the
  labels (random mean and spread per label). Then blur, a lower resolution along one axis, a
  multiplicative smooth bias field, rescaling to ``[0, 1]``, gamma and noise. A CT-like and an
  MR-like view of one anatomy thus look alike only through their shapes. With probability
  ``same_contrast_prob`` both views share one rendering draw (a mono-modal pair).

All randomness flows from the ``torch.Generator`` passed in (checkpointed by the trainer).
Layouts: volumes ``(I, J, K)``; views ``(1, G, G, G)``; correspondences ``(3, G, G, G)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinoreg.pretrain.augment import AugmentConfig, rotation_matrix, sample_centre, uniform, view_matrix
from dinoreg.spatial.grid import identity_grid, sample


@dataclass(frozen=True)
class SynthConfig:
    """How paired views are deformed and rendered.

    Attributes:
        real_prob: probability that a view of an image subject shows its real intensities.
        lut_prob: probability that a real view goes through a random non-monotone look-up table.
        lut_knots: knots of that table (values uniform in ``[0, 1]``, linear in between).
        label_std: ``(min, max)`` of the per-label standard deviation of a synthetic view.
        background_zero_prob: probability that label 0 renders as 0 (air) in a synthetic view.
        blur: ``(min, max)`` Gaussian sigma in voxels applied to every view.
        lowres_prob: probability of a lower resolution along one random axis (factor up to
            ``lowres_max``; box-averaged then trilinearly restored).
        bias: max log-amplitude of the multiplicative bias field (control grid ``bias_grid``).
        gamma: ``(min, max)`` gamma exponent (log-uniform).
        noise_std: max standard deviation of additive Gaussian noise.
        pair_rotation_deg: max rotation of B relative to A about each axis.
        pair_scale: ``(min, max)`` isotropic scale of B relative to A.
        pair_shift: max translation of B relative to A, voxels of the view.
        disp_max: standard deviation of the smooth displacement, voxels of the view.
        disp_grid: control points per axis of that displacement.
        n_clusters: intensity classes of :func:`pseudo_labels` for unlabelled images.
        same_contrast_prob: probability that B is rendered with A's draw (same contrast, bias,
            blur, noise pattern): a mono-modal pair, an easier task that teaches geometry first.
    """

    real_prob: float = 0.3
    lut_prob: float = 0.5
    lut_knots: int = 6
    label_std: tuple[float, float] = (0.0, 0.08)
    background_zero_prob: float = 0.5
    blur: tuple[float, float] = (0.0, 1.2)
    lowres_prob: float = 0.25
    lowres_max: float = 3.0
    bias: float = 0.4
    bias_grid: int = 4
    gamma: tuple[float, float] = (0.6, 1.6)
    noise_std: float = 0.04
    pair_rotation_deg: float = 10.0
    pair_scale: tuple[float, float] = (0.9, 1.1)
    pair_shift: float = 4.0
    disp_max: float = 2.0
    disp_grid: int = 4
    n_clusters: int = 10
    same_contrast_prob: float = 0.0


@dataclass
class Subject:
    """A label map ``(I, J, K)`` long (values ``0 .. n_labels-1``) and an optional image in ``[0, 1]``.

    ``labels_float`` is the same map as float32 ``(1, 1, I, J, K)`` (what ``grid_sample`` reads),
    converted once; ``n_labels`` is computed once too.
    """

    labels: torch.Tensor
    image: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.labels_float = self.labels[None, None].float()
        self.image_5d = None if self.image is None else self.image[None, None].float()
        self.n_labels = int(self.labels.max()) + 1


def relabel(labels: torch.Tensor) -> torch.Tensor:
    """Map the values of a label map to consecutive ``0 .. L-1`` (0 stays 0 when present)."""
    values, inverse = torch.unique(labels.long(), return_inverse=True)
    if values.numel() and int(values[0]) != 0:
        inverse = inverse + 1
    return inverse.reshape(labels.shape)


def gaussian_blur(volume: torch.Tensor, sigma: float | tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, I, J, K)`` with per-axis ``sigma`` (voxels; 0 = none)."""
    sigmas = (sigma,) * 3 if isinstance(sigma, (int, float)) else sigma
    out = volume
    for axis, s in enumerate(sigmas):
        if s <= 0.05:
            continue
        r = max(1, int(math.ceil(2.5 * s)))
        x = torch.arange(-r, r + 1, dtype=volume.dtype)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = (k / k.sum()).reshape([1, 1] + [len(x) if a == axis else 1 for a in range(3)])
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        c = out.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.expand(c, 1, *k.shape[2:]), groups=c)
    return out


def pseudo_labels(image: torch.Tensor, n_clusters: int = 10, background: float = 0.02,
                  sigma: float = 0.7) -> torch.Tensor:
    """Label map of an unlabelled image ``(I, J, K)`` in ``[0, 1]``: ``0`` where the smoothed image is
    at most ``background``, else ``1 .. n_clusters`` by quantiles of the foreground intensities."""
    smooth = gaussian_blur(image[None, None].float(), sigma)[0, 0]
    fg = smooth > background
    out = torch.zeros(image.shape, dtype=torch.long)
    if int(fg.sum()) < n_clusters:
        return out
    vals = smooth[fg]
    sub = vals[torch.linspace(0, len(vals) - 1, min(len(vals), 200_000)).long()]
    edges = torch.quantile(sub, torch.linspace(0, 1, n_clusters + 1)[1:-1])
    out[fg] = torch.bucketize(vals, edges) + 1
    return relabel(out)


def subject_from_image(image: torch.Tensor, n_clusters: int = 10) -> Subject:
    """An image subject with :func:`pseudo_labels`."""
    return Subject(pseudo_labels(image, n_clusters), image.float())


def subject_from_labels(labels: torch.Tensor) -> Subject:
    """A label-only subject (rendered only as synthetic contrasts)."""
    return Subject(relabel(labels))


def label_foreground(subject: Subject, step: int = 4) -> torch.Tensor:
    """Voxel coordinates ``(M, 3)`` of labelled voxels on a ``step``-subsampled grid (for centres)."""
    pts = (subject.labels[::step, ::step, ::step] > 0).nonzero() * step
    return pts if len(pts) else torch.zeros(1, 3, dtype=torch.long)


def smooth_displacement(gen: torch.Generator, size: int, amplitude: float, grid: int) -> torch.Tensor:
    """Random smooth displacement ``(3, size, size, size)`` (voxels): ``N(0, amplitude^2)`` on a
    ``grid^3`` control grid, trilinearly upsampled (corners aligned)."""
    ctrl = torch.randn((1, 3, grid, grid, grid), generator=gen) * amplitude
    return F.interpolate(ctrl, size=(size,) * 3, mode="trilinear", align_corners=True)[0]


def random_lut(x: torch.Tensor, gen: torch.Generator, knots: int) -> torch.Tensor:
    """A random piecewise-linear (generally non-monotone) map of ``[0, 1]`` onto ``[0, 1]``."""
    values = torch.rand(knots, generator=gen)
    pos = x.clamp(0, 1) * (knots - 1)
    lo = pos.floor().long().clamp(max=knots - 2)
    frac = pos - lo
    return values[lo] * (1 - frac) + values[lo + 1] * frac


def render(labels: torch.Tensor, image: torch.Tensor | None, n_labels: int, gen: torch.Generator,
           cfg: SynthConfig) -> torch.Tensor:
    """One view ``(1, G, G, G)`` in about ``[0, 1]`` from its sampled labels ``(G, G, G)`` (and image).

    See the module docstring for the steps.
    """
    use_real = image is not None and float(torch.rand(1, generator=gen)) < cfg.real_prob
    if use_real:
        x = image.clone()
        if float(torch.rand(1, generator=gen)) < cfg.lut_prob:
            x = random_lut(x, gen, cfg.lut_knots)
    else:
        means = torch.rand(n_labels, generator=gen)
        stds = uniform(gen, *cfg.label_std, n_labels).float()
        if float(torch.rand(1, generator=gen)) < cfg.background_zero_prob:
            means[0], stds[0] = 0.0, 0.0
        x = means[labels] + stds[labels] * torch.randn(labels.shape, generator=gen)
    x = x[None, None]
    x = gaussian_blur(x, float(uniform(gen, *cfg.blur)))
    if float(torch.rand(1, generator=gen)) < cfg.lowres_prob:
        axis = int(torch.randint(3, (1,), generator=gen))
        factor = float(uniform(gen, 1.0, cfg.lowres_max))
        size = list(x.shape[2:])
        small = list(size)
        small[axis] = max(2, int(round(size[axis] / factor)))
        x = F.interpolate(F.interpolate(x, size=small, mode="area"), size=size, mode="trilinear", align_corners=False)
    if cfg.bias > 0:
        ctrl = torch.randn((1, 1) + (cfg.bias_grid,) * 3, generator=gen) * float(uniform(gen, 0, cfg.bias))
        x = x * torch.exp(F.interpolate(ctrl, size=x.shape[2:], mode="trilinear", align_corners=True))
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / max(hi - lo, 1e-6)
    gamma = math.exp(float(uniform(gen, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]))))
    x = x.clamp(0, 1).pow(gamma)
    std = float(uniform(gen, 0.0, cfg.noise_std))
    return (x + std * torch.randn(x.shape, generator=gen))[0]


def _sample_views(subject: Subject, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels (nearest, 0 outside) and image (trilinear, 0 outside) at source coordinates ``(3, *out)``."""
    c = coords[None].float()
    labels = sample(subject.labels_float, c, mode="nearest", padding_mode="zeros")[0, 0].long()
    image = None
    if subject.image_5d is not None:
        image = sample(subject.image_5d, c, mode="bilinear", padding_mode="zeros")[0, 0]
    return labels, image


def pair_coordinates(gen: torch.Generator, size: int, cfg: SynthConfig) -> torch.Tensor:
    """``q'(q)`` of view B in A's voxel coordinates: ``(3, size, size, size)`` float64."""
    h = (size - 1) / 2.0
    q = identity_grid((size,) * 3, dtype=torch.float64)[0].reshape(3, -1) - h
    angles = uniform(gen, -cfg.pair_rotation_deg, cfg.pair_rotation_deg, 3) * math.pi / 180.0
    r = float(uniform(gen, *cfg.pair_scale)) * rotation_matrix(angles)
    t = uniform(gen, -cfg.pair_shift, cfg.pair_shift, 3).reshape(3, 1)
    d = smooth_displacement(gen, size, cfg.disp_max, cfg.disp_grid).double().reshape(3, -1)
    return (r @ q + t + d + h).reshape(3, size, size, size)


def source_coordinates(centre: torch.Tensor, matrix: torch.Tensor, view_coords: torch.Tensor) -> torch.Tensor:
    """Source voxel coordinates ``c + M (q - h)`` of view coordinates ``(3, *out)`` (``h``: view centre)."""
    size = view_coords.shape[1]
    h = (size - 1) / 2.0
    flat = view_coords.reshape(3, -1).double() - h
    return (matrix @ flat + centre.reshape(3, 1).double()).reshape(view_coords.shape)


def synth_pair(subject: Subject, fg: torch.Tensor, gen: torch.Generator, aug: AugmentConfig,
               cfg: SynthConfig) -> dict[str, torch.Tensor]:
    """Two global views with their correspondence, plus ``aug.n_local`` local views.

    Returns:
        ``a``, ``b``: ``(1, G, G, G)`` views; ``corr``: ``(3, G, G, G)`` float32, the position in
        A's voxel coordinates of each voxel of B; ``fg_b``: ``(G, G, G)`` bool, B voxels whose
        label is not background; ``locals``: ``(n_local, 1, L, L, L)`` (or an empty tensor).
    """
    g = aug.global_size
    centre = sample_centre(gen, subject.labels, fg, aug.foreground_prob)
    m = view_matrix(gen, aug.global_scale, aug.max_rotation_deg, aug.flip_prob)
    grid_a = identity_grid((g,) * 3, dtype=torch.float64)[0]
    corr = pair_coordinates(gen, g, cfg)
    n = subject.n_labels
    lab_a, img_a = _sample_views(subject, source_coordinates(centre, m, grid_a))
    lab_b, img_b = _sample_views(subject, source_coordinates(centre, m, corr))
    if float(torch.rand(1, generator=gen)) < cfg.same_contrast_prob:
        seed = int(torch.randint(2 ** 62, (1,), generator=gen))
        a = render(lab_a, img_a, n, torch.Generator().manual_seed(seed), cfg)
        b = render(lab_b, img_b, n, torch.Generator().manual_seed(seed), cfg)
    else:
        a = render(lab_a, img_a, n, gen, cfg)
        b = render(lab_b, img_b, n, gen, cfg)
    locals_ = []
    for _ in range(aug.n_local):
        ml = view_matrix(gen, aug.local_scale, aug.max_rotation_deg, aug.flip_prob)
        offset = uniform(gen, -0.5, 0.5, 3) * g * aug.global_scale[0]
        grid_l = identity_grid((aug.local_size,) * 3, dtype=torch.float64)[0]
        lab_l, img_l = _sample_views(subject, source_coordinates(centre + offset, ml, grid_l))
        locals_.append(render(lab_l, img_l, n, gen, cfg))
    loc = torch.stack(locals_) if locals_ else torch.zeros(0)
    return {"a": a, "b": b, "corr": corr.float(), "fg_b": lab_b > 0, "locals": loc}


def make_pair_batch(subjects: list[Subject], fgs: list[torch.Tensor], weights: torch.Tensor, batch_size: int,
                    gen: torch.Generator, aug: AugmentConfig, cfg: SynthConfig) -> dict[str, torch.Tensor | None]:
    """A batch of pairs, view-major like :func:`.augment.make_batch`.

    Returns:
        ``globals``: ``(2B, 1, G, G, G)`` (all A views, then all B views); ``locals``:
        ``(n_local*B, 1, L, L, L)`` or None; ``corr``: ``(B, 3, G, G, G)``; ``fg_b``: ``(B, G, G, G)``.
    """
    picks = torch.multinomial(weights.double(), batch_size, replacement=True, generator=gen).tolist()
    pairs = [synth_pair(subjects[i], fgs[i], gen, aug, cfg) for i in picks]
    glob = torch.stack([p["a"] for p in pairs] + [p["b"] for p in pairs])
    loc = None
    if aug.n_local:
        loc = torch.stack([p["locals"][n] for n in range(aug.n_local) for p in pairs])
    return {"globals": glob, "locals": loc, "corr": torch.stack([p["corr"] for p in pairs]),
            "fg_b": torch.stack([p["fg_b"] for p in pairs])}
