"""instance_loss_gathered over a torch.distributed group: two CPU processes (gloo) with
different numbers of images, against one device's loss of the same images (view A of every
rank's images in rank order, then view B) in plain PyTorch, loss and each rank's gradient."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import invaspread.torch as ist

IMAGES = [3, 5]  # per rank: uneven on purpose
D = 7


def local_rows(rank, dtype):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2 * IMAGES[rank], D, generator=g, dtype=torch.float64).to(dtype)


def worker(rank, world, init, out, kw):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        z = local_rows(rank, kw.pop("dtype")).requires_grad_(True)
        loss = ist.instance_loss_gathered(z, **kw)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": z.grad}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "kw",
    [
        dict(dtype=torch.float64, semantics="query-only"),
        dict(dtype=torch.float64, semantics="both-sides", negatives="hard", fraction=0.5),
        dict(dtype=torch.float32, semantics="both-sides", mu=2.0),
    ],
)
def test_two_ranks_give_one_devices_loss_and_gradient(kw):
    world = len(IMAGES)
    with tempfile.TemporaryDirectory() as out:
        init = "file://" + os.path.join(out, "rendezvous")
        mp.spawn(worker, args=(world, init, out, dict(kw)), nprocs=world, join=True)
        results = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    dtype = kw["dtype"]
    settings = {k: v for k, v in kw.items() if k != "dtype"}
    parts = [local_rows(r, torch.float64).requires_grad_(True) for r in range(world)]
    a = torch.cat([p[: IMAGES[r]] for r, p in enumerate(parts)])
    b = torch.cat([p[IMAGES[r]:] for r, p in enumerate(parts)])
    want = ist.instance_loss_torch(torch.cat([a, b]), **settings)
    want.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for r, got in enumerate(results):
        assert abs(got["loss"].item() - want.item()) <= tol * abs(want.item()), f"rank {r}"
        err = (got["grad"].double() - parts[r].grad).abs().max() / parts[r].grad.abs().max()
        assert err <= tol * 10, f"rank {r}: gradient error {err:e}"


def test_one_rank_is_the_plain_loss():
    with tempfile.TemporaryDirectory() as out:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "r"), rank=0, world_size=1)
        try:
            z = local_rows(1, torch.float64).requires_grad_(True)
            got = ist.instance_loss_gathered(z, tau=0.2)
            assert abs(got.item() - ist.instance_loss(z.detach(), tau=0.2).item()) <= 1e-12
            with pytest.raises(ValueError, match="expected 2 m"):
                ist.instance_loss_gathered(z[:5])
        finally:
            dist.destroy_process_group()
