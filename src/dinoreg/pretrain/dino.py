"""DINO / iBOT objectives: projection head, centred and sharpened teacher targets, EMA teacher.

* :class:`ProjectionHead` - MLP -> bottleneck -> L2 normalisation -> linear layer with unit-norm
  rows (DINO's weight-normalised last layer with its gain frozen at 1) -> ``K`` prototype logits.
* :class:`DinoLoss` - cross-entropy between the teacher's centred, sharpened distribution
  ``softmax((t - center) / T_t)`` and the student's ``log_softmax(s / T_s)`` over all pairs of
  different views; the centre is an EMA of the teacher's mean output (prevents collapse).
* :class:`PatchLoss` - iBOT's masked-patch objective: the student sees a global view with some
  tokens replaced by a mask token and predicts, at the masked positions, the teacher's centred,
  sharpened distribution computed from the unmasked view; it is what trains dense features.
* :func:`block_mask` - random 3D boxes of tokens covering a target fraction of the grid.
* :func:`sinkhorn_knopp` - the alternative teacher centring of SwAV / DINOv2: a few Sinkhorn
  iterations make every prototype carry equal mass over the batch, so the teacher cannot put
  every sample on one prototype nor give every sample the uniform distribution.
* :func:`teacher_stats` - collapse monitors (per-sample entropy, prototypes in use).
* :func:`ema_update` - ``teacher = m * teacher + (1 - m) * student``.

Layouts: view-major batches (``V`` views x ``B`` samples), logits ``(V*B, K)``, patch logits
``(M, K)`` at the ``M`` masked tokens, masks ``(V*B, N)`` boolean.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def teacher_stats(probs: torch.Tensor) -> dict[str, float]:
    """Collapse monitors of teacher distributions ``(M, K)``.

    ``entropy``: mean per-sample entropy (nats; ``log K`` = uniform collapse);
    ``prototypes``: ``exp`` of the entropy of the mean distribution, i.e. the effective number of
    prototypes in use (1 = everything maps to one prototype).
    """
    p = probs.detach().float()
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p.mean(0)
    usage = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {"entropy": float(ent), "prototypes": float(usage)}


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets ``(M, K)`` from logits ``(M, K)``: ``exp(logits / T)`` alternately
    normalised so prototypes share the batch's mass equally and every row sums to 1."""
    q = (logits.float() / temperature)
    q = torch.exp(q - q.max()).T  # (K, M)
    q = q / q.sum()
    k, m = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / m
    return (q * m).T


class ProjectionHead(nn.Module):
    """DINO head: ``(..., in_dim) -> (..., out_dim)`` prototype logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last.weight, dim=1))


class CentredLoss(nn.Module):
    """Shared state of the teacher-centred losses: student temperature, the centring
    (``"ema"``: subtract the EMA centre of the teacher logits, ``center_momentum``, updated after
    every call; ``"sinkhorn"``: :func:`sinkhorn_knopp`, the centre is still tracked for logs)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "ema") -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, float] = {}

    def targets(self, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher distributions ``(M, K)`` (detached) from teacher logits ``(M, K)``."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher, teacher_temp)
        return F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1).detach()

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        mean = teacher.float().mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


class DinoLoss(CentredLoss):
    """Cross-view DINO loss on class-token logits with teacher centring (EMA ``center_momentum``)."""


    def forward(self, student: torch.Tensor, teacher: torch.Tensor, n_global: int,
                teacher_temp: float) -> torch.Tensor:
        """``student`` ``(V_s*B, K)`` (globals first), ``teacher`` ``(n_global*B, K)`` -> scalar.

        Averages ``CE(teacher view i, student view j)`` over all ``i != j``; updates the centre.
        """
        s_chunks = (student.float() / self.student_temp).chunk(student.shape[0] // (teacher.shape[0] // n_global))
        t_probs = self.targets(teacher, teacher_temp)
        self.last_stats = teacher_stats(t_probs)
        t_chunks = t_probs.chunk(n_global)
        total, count = student.new_zeros((), dtype=torch.float32), 0
        for i, t in enumerate(t_chunks):
            for j, s in enumerate(s_chunks):
                if i == j:
                    continue
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                count += 1
        self.update_center(teacher)
        return total / max(count, 1)



class PatchLoss(CentredLoss):
    """iBOT masked-patch loss with its own EMA centre, evaluated at masked tokens only."""


    def forward(self, student: torch.Tensor, teacher: torch.Tensor, image_index: torch.Tensor,
                n_images: int, teacher_temp: float) -> torch.Tensor:
        """Loss over ``M`` masked tokens.

        Args:
            student: ``(M, K)`` student logits at the masked tokens (from the masked view).
            teacher: ``(M, K)`` teacher logits at the same tokens (from the unmasked view).
            image_index: ``(M,)`` long, the view each token belongs to (``0 .. n_images-1``).
            n_images: number of views in the batch.

        Returns:
            cross-entropy averaged per view, then over views holding at least one masked token.
        """
        if student.shape[0] == 0:
            return student.sum() * 0.0
        t = self.targets(teacher, teacher_temp)
        self.last_stats = teacher_stats(t)
        ce = torch.sum(-t * F.log_softmax(student.float() / self.student_temp, dim=-1), dim=-1)
        sums = torch.zeros(n_images, dtype=ce.dtype, device=ce.device).index_add(0, image_index, ce)
        counts = torch.bincount(image_index, minlength=n_images).to(ce.dtype)
        has = counts > 0
        self.update_center(teacher)
        return (sums[has] / counts[has]).mean()



def block_mask(grid: tuple[int, int, int], ratio: float, gen: torch.Generator,
               min_side: int = 2, max_side: int | None = None) -> torch.Tensor:
    """Boolean mask ``(n_i*n_j*n_k,)`` made of random boxes covering about ``ratio`` of the grid.

    Boxes have sides in ``[min_side, max_side]`` tokens (default max: half the grid edge); they
    are added until the masked fraction reaches ``ratio`` (at most ``4 * ratio * N`` tries).
    """
    mask = torch.zeros(grid, dtype=torch.bool)
    total = mask.numel()
    target = int(round(ratio * total))
    max_side = max_side or max(min_side, min(grid) // 2)
    tries = 0
    while int(mask.sum()) < target and tries < 4 * total:
        tries += 1
        sides = torch.randint(min_side, max_side + 1, (3,), generator=gen).tolist()
        sides = [min(s, n) for s, n in zip(sides, grid)]
        start = [int(torch.randint(0, n - s + 1, (1,), generator=gen)) for s, n in zip(sides, grid)]
        mask[start[0]:start[0] + sides[0], start[1]:start[1] + sides[1], start[2]:start[2] + sides[2]] = True
    return mask.flatten()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher_param = momentum * teacher_param + (1 - momentum) * student_param`` (in place)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
