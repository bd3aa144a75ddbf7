"""The instance loss of Ye et al. (CVPR 2019) as a PyTorch op, computed by the invaspread crate.

    import torch
    import invaspread.torch as ist

    z = encoder(torch.cat([view_a, view_b]))    # (2m, d): row i and row i + m are image i
    loss = ist.instance_loss(z, tau=0.1)        # a 0-d tensor of z's dtype
    loss.backward()                             # dL/dz, computed with the loss

`instance_loss` takes raw embeddings (it normalises the rows, as the authors' code does);
`instance_loss_normalized` takes rows the model has already normalised and returns dL/df.
CPU tensors (contiguous float32 or float64) are read in place through DLPack and the gradient
is written into a tensor PyTorch allocates. CUDA tensors (float32; float16 and bfloat16 are
cast to float32) go through the crate's CUDA kernels on the tensor's device and PyTorch's
current stream: PyTorch allocates the gradient, the loss and the kernels' scratch, the crate
queues its launches on that stream, and nothing waits for the GPU or copies to the host. The
forward pass computes the gradient too (the loss is a scalar, so backward only scales it):
memory O(N d), never the N x N matrix (but for the `unfused` version).

`instance_loss_gathered` is the loss of a global batch spread over the ranks of a
`torch.distributed` group.

`instance_loss_torch` is the same loss in plain PyTorch operations (N x N matrices, autograd),
for comparison and tests.
"""

from __future__ import annotations

import math

import torch

from . import _native

__all__ = ["instance_loss", "instance_loss_gathered", "instance_loss_normalized", "instance_loss_torch"]

SEMANTICS = ("query-only", "both-sides")
NEGATIVES = ("all", "hard", "easy")
SCALES = ("official", "mean")


def _check(z, name: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(z.shape)}: expected an N x d matrix")
    if z.is_cuda:
        if z.dtype in (torch.float16, torch.bfloat16):
            return z.float()  # the kernels read float32; autograd casts the gradient back
        if z.dtype != torch.float32:
            raise TypeError(
                f"{name} has dtype {z.dtype} on {z.device}: the CUDA versions compute in float32 "
                "(pass a float32, float16 or bfloat16 tensor, or a CPU tensor for float64)"
            )
    elif z.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} has dtype {z.dtype}: expected torch.float32 or torch.float64")
    return z


def _cuda_forward(rows, with_grad, tau, mu, semantics, negatives, fraction, scale, version):
    """The loss of the CUDA tensor `rows` on PyTorch's current stream of its device: a 0-d
    float32 tensor there, and dL/dz (None without `with_grad`); nothing waits for the GPU."""
    device = rows.device
    settings = dict(
        tau=float(tau), mu=float(mu), semantics=semantics, negatives=negatives,
        fraction=float(fraction), scale=scale,
    )
    name, scratch_bytes = _native.cuda_plan(
        rows.shape[0], rows.shape[1], version=version,
        capability=torch.cuda.get_device_capability(device),
        precision=torch.get_float32_matmul_precision(), **settings,
    )
    scratch = torch.zeros(scratch_bytes, dtype=torch.uint8, device=device)
    loss = torch.empty((), dtype=torch.float64, device=device)
    grad = torch.empty_like(rows, memory_format=torch.contiguous_format) if with_grad else None
    _native.instance_loss_cuda(
        rows.__dlpack__(), None if grad is None else grad.__dlpack__(),
        scratch.__dlpack__(), loss.__dlpack__(),
        stream=torch.cuda.current_stream(device).cuda_stream, version=name, **settings,
    )
    return loss.to(torch.float32), grad


class _InstanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, normalized, tau, mu, semantics, negatives, fraction, scale, version):
        rows = z.detach()
        if not rows.is_contiguous():
            rows = rows.contiguous()  # the one copy: a strided view cannot be read in place
        with_grad = ctx.needs_input_grad[0]
        if rows.is_cuda:
            loss, grad = _cuda_forward(
                rows, with_grad, tau, mu, semantics, negatives, fraction, scale, version
            )
        else:
            grad = torch.empty_like(rows, memory_format=torch.contiguous_format) if with_grad else None
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
            loss = torch.tensor(value, dtype=z.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

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
    `invaspread.CPU_VERSIONS` for a CPU tensor; for a CUDA tensor a name in
    `invaspread.CUDA_VERSIONS` (`fused-v2`, `fused-v3-tf32`, `fused-v3-bf16`, ...), or None for
    the card's best within PyTorch's float32 matmul precision: `fused-v2` at "highest" (PyTorch's
    default; `unfused` with hard/easy negatives, the float32 version that selects),
    `fused-v3-tf32` at "high" and `fused-v3-bf16` at "medium" on compute capability 8.0 or
    later (`torch.set_float32_matmul_precision`). Bad input raises TypeError or ValueError with
    the crate's message.
    """
    z = _check(z, "z")
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
    similarities are f_a . f_b as given and the gradient is dL/df.

    On CUDA the kernels normalise the rows again (a no-op on unit rows), so the gradient is
    dL/df's component tangent to each row, (I - f f^T) dL/df: the same gradient upstream of the
    model's normalisation, whose backward removes the radial part anyway, but not dL/df itself
    where f is of unit length for another reason."""
    f = _check(f, "f")
    return _InstanceLoss.apply(f, True, tau, mu, semantics, negatives, fraction, scale, version)


def instance_loss_gathered(
    z: torch.Tensor,
    group=None,
    tau: float = 0.1,
    mu: float = 1.0,
    semantics: str = "query-only",
    negatives: str = "all",
    fraction: float = 1.0,
    version: str | None = None,
    scale: str = "official",
    normalized: bool = False,
) -> torch.Tensor:
    """The loss of the global batch of a `torch.distributed` group (None: the default group),
    each rank holding its own `z` (2 m_r x d: view A of its m_r images, then view B; m_r may
    differ between ranks).

    Every rank all-gathers the rows and computes the loss of one device's batch of the same
    images (view A of every rank's images in rank order, then view B: the same pairs, so the
    same loss, as `loss::gathered` in the crate), which is the value returned on every rank. The
    gradient reaching `z` is that global loss's gradient with respect to this rank's own rows,
    exactly, with no collective in the backward pass. Under DistributedDataParallel, which
    averages the ranks' parameter gradients, the result is the single-device gradient divided by
    the world size; multiply the loss by the world size to get it exactly.

    Each rank computes the whole global loss (O(N^2 d) per rank, as on one device); the crate's
    rank-split kernels (`invaspread launch`) need its own NCCL collectives between launches and
    are not reachable through a torch.distributed group.
    """
    import torch.distributed as dist

    z = _check(z, "z")
    if z.shape[0] % 2 != 0:
        raise ValueError(f"z has {z.shape[0]} rows: expected 2 m (view A, then view B)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    m = z.shape[0] // 2
    sizes = [torch.zeros(1, dtype=torch.int64, device=z.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([m], dtype=torch.int64, device=z.device), group=group)
    counts = [int(c.item()) for c in sizes]
    widest = max(counts)
    if min(counts) == 0:
        raise ValueError(f"rows per rank {[2 * c for c in counts]}: every rank needs at least one image")
    padded = torch.zeros(2 * widest, z.shape[1], dtype=z.dtype, device=z.device)
    padded[:m] = z[:m].detach()
    padded[widest:widest + m] = z[m:].detach()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    views = []
    for v in range(2):
        for r, c in enumerate(counts):
            # This rank's own rows come from z itself, so that autograd reaches them.
            views.append(z[v * m:(v + 1) * m] if r == rank else gathered[r][v * widest:v * widest + c])
    rows = torch.cat(views)
    apply = instance_loss_normalized if normalized else instance_loss
    return apply(rows, tau, mu, semantics, negatives, fraction, version, scale)


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
    rows = torch.arange(n, device=f.device)
    partner = (rows + m) % n
    negative = torch.ones(n, n, dtype=torch.bool, device=f.device)
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
        negative = torch.zeros(n, n, dtype=torch.bool, device=f.device)
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
