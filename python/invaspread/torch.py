"""The instance loss of Ye et al. (CVPR 2019) as a PyTorch op, computed by the invaspread crate.

    import torch
    import invaspread.torch as ist

    z = encoder(torch.cat([view_a, view_b]))    # (2m, d): row i and row i + m are image i
    loss = ist.instance_loss(z, tau=0.1)        # a 0-d tensor of z's dtype
    loss.backward()                             # dL/dz, computed with the loss

`instance_loss` takes raw embeddings (it normalises the rows, as the authors' code does);
`instance_loss_normalized` takes rows the model has already normalised and returns dL/df.
CPU tensors (contiguous float32 or float64) are read in place through DLPack and the gradient
is written into a tensor PyTorch allocates. The forward pass computes the gradient too (the
loss is a scalar, so backward only scales it): memory O(N d), never the N x N matrix.

`instance_loss_torch` is the same loss in plain PyTorch operations (N x N matrices, autograd),
for comparison and tests.
"""

from __future__ import annotations

import math

import torch

from . import _native

__all__ = ["instance_loss", "instance_loss_normalized", "instance_loss_torch"]

SEMANTICS = ("query-only", "both-sides")
NEGATIVES = ("all", "hard", "easy")
SCALES = ("official", "mean")


def _check(z, name: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(z).__name__}")
    if z.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} has dtype {z.dtype}: expected torch.float32 or torch.float64")
    if z.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(z.shape)}: expected an N x d matrix")
    return z


class _InstanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, normalized, tau, mu, semantics, negatives, fraction, scale, version):
        rows = z.detach()
        if not rows.is_contiguous():
            rows = rows.contiguous()  # the one copy: a strided view cannot be read in place
        grad = torch.empty_like(rows, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        value = _native.instance_loss(
            rows.__dlpack__(),
            None if grad is None else grad.__dlpack__(),
            tau=float(tau),
            mu=float(mu),
            semantics=semantics,
            negatives=negatives,
            fraction=float(fraction),
            scale=scale,
            normalized=normalized,
            version=version,
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        return torch.tensor(value, dtype=z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None, None


def instance_loss(
    z: torch.Tensor,
    tau: float = 0.1,
    mu: float = 1.0,
    semantics: str = "query-only",
    negatives: str = "all",
    fraction: float = 1.0,
    version: str | None = None,
    scale: str = "official",
) -> torch.Tensor:
    """The instance loss of raw embeddings `z` (N x d, N = 2m even, rows a and a + m two views
    of image a), as a 0-d tensor with a gradient.

    tau: temperature (> 0); mu: weight of the negatives (>= 1, `negM` of the authors' code);
    semantics: "query-only" (keys are constants, the authors' code) or "both-sides";
    negatives: "all", or "hard" / "easy" with `fraction` F in (0, 1] of each row's negatives
    (`scale` "official": the authors' K = floor(N F) and loss -(A + mu F B) / (K + 1); "mean":
    the crate's earlier form); version: None (the fused CPU loss in z's dtype) or a name in
    `invaspread.CPU_VERSIONS`. Bad input raises TypeError or ValueError with the crate's message.
    """
    _check(z, "z")
    return _InstanceLoss.apply(z, False, tau, mu, semantics, negatives, fraction, scale, version)


def instance_loss_normalized(
    f: torch.Tensor,
    tau: float = 0.1,
    mu: float = 1.0,
    semantics: str = "query-only",
    negatives: str = "all",
    fraction: float = 1.0,
    version: str | None = None,
    scale: str = "official",
) -> torch.Tensor:
    """`instance_loss` of rows already of unit length (the model normalises them): the
    similarities are f_a . f_b as given and the gradient is dL/df."""
    _check(f, "f")
    return _InstanceLoss.apply(f, True, tau, mu, semantics, negatives, fraction, scale, version)


def instance_loss_torch(
    z: torch.Tensor,
    tau: float = 0.1,
    mu: float = 1.0,
    semantics: str = "query-only",
    negatives: str = "all",
    fraction: float = 1.0,
    scale: str = "official",
    normalized: bool = False,
) -> torch.Tensor:
    """The same loss in plain PyTorch (N x N matrices, autograd), written from the math of
    `shared/notes/loss.md` and the authors' `BatchCriterion`; ties in a hard/easy selection go
    to torch.topk's order (the crate sends them to the lower index)."""
    if semantics not in SEMANTICS or negatives not in NEGATIVES or scale not in SCALES:
        raise ValueError(f"semantics {semantics!r}, negatives {negatives!r}, scale {scale!r}")
    f = z if normalized else torch.nn.functional.normalize(z, dim=1)
    n = f.shape[0]
    m = n // 2
    keys = f.detach() if semantics == "query-only" else f
    s = f @ keys.T / tau
    e = torch.exp(s - 1.0 / tau)  # the offset cancels in P and Q
    rows = torch.arange(n)
    partner = (rows + m) % n
    negative = torch.ones(n, n, dtype=torch.bool)
    negative[rows, rows] = False
    negative[rows, partner] = False
    if negatives != "all":
        if scale == "official":
            k = min(max(math.floor(n * fraction), 1), n - 2)
        else:
            k = min(max(int(math.floor(fraction * (n - 2) + 0.5)), 1), n - 2)
        hard = negatives == "hard"
        fill = float("-inf") if hard else float("inf")
        ranked = s.detach().masked_fill(~negative, fill)
        kept = ranked.topk(k, dim=1, largest=hard).indices
        negative = torch.zeros(n, n, dtype=torch.bool)
        negative[rows[:, None], kept] = True
    pos = e[rows, partner]
    d = pos + mu * (e * negative).sum(dim=1)
    log_p = torch.log(pos / d)
    q = torch.where(negative, e / d[:, None], torch.zeros_like(e))
    log_not_q = torch.where(negative, torch.log1p(-q), torch.zeros_like(e)).sum(dim=1)
    if negatives == "all":
        return -(log_p + mu * log_not_q).mean()
    if scale == "official":
        return -(log_p.sum() + mu * fraction * log_not_q.sum()) / (k + 1)
    return -(log_p.sum() + mu * log_not_q.sum()) / (n * (k + 1))
