"""Dense objectives on token grids: InfoNCE over known correspondences, and KoLeo spreading.

* :func:`token_correspondence` - the voxel correspondence of a pair (:mod:`.synth`) read at
  B's token centres and expressed in A's token coordinates.
* :func:`dense_info_nce` - for sampled tokens of view B, the positive is view A's feature
  interpolated (trilinearly on the token grid) at the corresponding position; the negatives are
  the positives of every other sampled token of the batch (other positions of the same pair
  farther than ``exclude`` tokens, and every position of the other pairs). Symmetric
  cross-entropy (B -> A and A -> B) on cosine similarities over a temperature.
* :func:`koleo` - the Kozachenko-Leonenko entropy estimator used by DINOv2 as a regulariser:
  ``-mean(log(distance to the nearest neighbour))`` of L2-normalised vectors; spreads a batch
  so it cannot collapse to one point.

Layouts: feature grids ``(B, C, n, n, n)`` (token ``(a, b, c)`` covers voxels ``[a p, (a+1) p)``
along each axis); correspondences ``(B, 3, n, n, n)`` in A's token coordinates (token ``a``'s
centre is coordinate ``a``); masks ``(B, n, n, n)`` bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinoreg.spatial.grid import sample


def token_correspondence(corr: torch.Tensor, fg: torch.Tensor, patch: int, min_fg: float = 0.25
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Correspondence and validity at B's tokens.

    Args:
        corr: ``(B, 3, G, G, G)`` A-voxel coordinates of B's voxels.
        fg: ``(B, G, G, G)`` bool, labelled (non-background) voxels of B.
        patch: token edge ``p`` (``G`` a multiple of it).
        min_fg: a token is valid when at least this fraction of its voxels is labelled.

    Returns:
        ``(tok_corr (B, 3, n, n, n), valid (B, n, n, n))``: the mean voxel correspondence over the
        token's voxels mapped to A's token coordinates ``(x - (p-1)/2) / p``; valid also requires
        the position to fall inside A's token grid.
    """
    n = corr.shape[-1] // patch
    tok = (F.avg_pool3d(corr, patch) - (patch - 1) / 2.0) / patch
    frac = F.avg_pool3d(fg[:, None].float(), patch)[:, 0]
    inside = ((tok >= 0) & (tok <= n - 1)).all(dim=1)
    return tok, inside & (frac >= min_fg)


def dense_info_nce(fa: torch.Tensor, fb: torch.Tensor, corr: torch.Tensor, valid: torch.Tensor,
                   gen: torch.Generator, temperature: float = 0.1, max_tokens: int = 256,
                   exclude: float = 1.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE between corresponding tokens of A and B.

    Args:
        fa, fb: ``(B, C, n, n, n)`` features of views A and B (any scale; L2-normalised here).
        corr: ``(B, 3, n, n, n)`` A token coordinates of each B token.
        valid: ``(B, n, n, n)`` B tokens that may be anchors.
        gen: draws the (at most ``max_tokens`` per pair) anchors.
        temperature: softmax temperature on cosine similarities.
        exclude: positions of one pair closer than this (A tokens) are not negatives of each other.

    Returns:
        ``(loss, {"dense_acc": share of anchors whose best match is their positive})``; a zero
        loss (with a graph) when no anchor is valid.
    """
    b, c = fb.shape[:2]
    anchors, positives, pos, owner = [], [], [], []
    for i in range(b):
        idx = valid[i].flatten().nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        if idx.numel() > max_tokens:
            idx = idx[torch.randperm(idx.numel(), generator=gen)[:max_tokens]]
        anchors.append(fb[i].flatten(1)[:, idx.to(fb.device)].T)
        where = corr[i].flatten(1)[:, idx].to(fa.device)  # (3, m)
        positives.append(sample(fa[i:i + 1], where.reshape(1, 3, -1, 1, 1), mode="bilinear")[0, :, :, 0, 0].T)
        pos.append(where.T)
        owner.append(torch.full((idx.numel(),), i, device=fa.device))
    if not anchors:
        return (fa.sum() + fb.sum()) * 0.0, {"dense_acc": float("nan")}
    za = F.normalize(torch.cat(positives).float(), dim=-1)
    zb = F.normalize(torch.cat(anchors).float(), dim=-1)
    p, o = torch.cat(pos).float(), torch.cat(owner)
    logits = zb @ za.T / temperature
    near = (torch.cdist(p, p) < exclude) & (o[:, None] == o[None, :])
    near.fill_diagonal_(False)
    logits = logits.masked_fill(near, float("-inf"))
    target = torch.arange(len(zb), device=zb.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    acc = float((logits.detach().argmax(1) == target).float().mean())
    return loss, {"dense_acc": acc}


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of ``(N, C)`` vectors (L2-normalised here): ``-mean log(min_j!=i |x_i - x_j|)``."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    z = F.normalize(x.float(), dim=-1)
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    dist = (z - z[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()
