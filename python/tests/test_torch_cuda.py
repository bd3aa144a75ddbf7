"""The op's CUDA path on a real GPU: every CUDA version against the plain-PyTorch loss in
float64 on the same device, the default version, PyTorch's current stream, no host
synchronisation, bad input, half-precision input and a training loop. Without a GPU every test
is skipped with `SKIPPED (no GPU)`, and fails instead under REQUIRE_GPU=1 (the device check)."""

import os

import pytest
import torch

import invaspread
import invaspread.torch as ist


@pytest.fixture(autouse=True)
def gpu(request):
    if not torch.cuda.is_available():
        if os.environ.get("REQUIRE_GPU") == "1":
            pytest.fail(f"REQUIRE_GPU=1 but torch sees no CUDA device: {request.node.name}")
        pytest.skip(f"SKIPPED (no GPU): {request.node.name}")
    return torch.device("cuda")


def rows(n, d, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(device)


def loss_and_grad(fn, z, **kw):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, **kw)
    loss.backward()
    return loss.detach().double(), z.grad.double()


# A version's bound on the loss (relative) and on dL/dz (relative Frobenius norm).
BOUNDS = {
    "unfused": (1e-5, 1e-4),
    "fused-v1": (1e-5, 1e-4),
    "fused-v2": (1e-5, 1e-4),
    "fused-v3-tf32": (3e-3, 3e-2),
    "fused-v3-bf16": (2e-2, 2e-1),
}
SELECTS = {"unfused", "fused-v3-tf32", "fused-v3-bf16"}


def test_the_versions_are_the_registrys():
    assert set(invaspread.CUDA_VERSIONS) == set(BOUNDS)


@pytest.mark.parametrize("version", sorted(BOUNDS))
@pytest.mark.parametrize("semantics", ["query-only", "both-sides"])
@pytest.mark.parametrize("n,d", [(6, 3), (70, 5), (130, 128), (4098, 130)])
def test_every_version_against_plain_pytorch_in_float64(version, semantics, n, d):
    z = rows(n, d, seed=n + d)
    want, want_grad = loss_and_grad(ist.instance_loss_torch, z, semantics=semantics)
    got, grad = loss_and_grad(ist.instance_loss, z.float(), semantics=semantics, version=version)
    loss_bound, grad_bound = BOUNDS[version]
    assert abs(got - want) <= loss_bound * abs(want), f"{got} vs {want}"
    err = (grad - want_grad).norm() / want_grad.norm()
    assert err <= grad_bound, f"gradient error {err:e}"


@pytest.mark.parametrize("version", sorted(SELECTS))
@pytest.mark.parametrize("negatives,fraction", [("hard", 0.5), ("easy", 0.25)])
def test_hard_and_easy_negatives(version, negatives, fraction):
    z = rows(70, 16, seed=3)
    kw = dict(negatives=negatives, fraction=fraction, semantics="both-sides")
    want, want_grad = loss_and_grad(ist.instance_loss_torch, z, **kw)
    got, grad = loss_and_grad(ist.instance_loss, z.float(), version=version, **kw)
    loss_bound, grad_bound = BOUNDS[version]
    assert abs(got - want) <= loss_bound * abs(want), f"{got} vs {want}"
    if version == "unfused":  # float32 similarities keep the float64 selection here
        err = (grad - want_grad).norm() / want_grad.norm()
        assert err <= grad_bound, f"gradient error {err:e}"


def test_the_default_follows_the_float32_matmul_precision():
    z = rows(130, 64, seed=5).float()
    before = torch.get_float32_matmul_precision()
    try:
        for precision, version in [("highest", "fused-v2"), ("high", "fused-v3-tf32"), ("medium", "fused-v3-bf16")]:
            torch.set_float32_matmul_precision(precision)
            if precision != "highest" and torch.cuda.get_device_capability()[0] < 8:
                version = "fused-v2"
            default = ist.instance_loss(z)
            named = ist.instance_loss(z, version=version)
            assert default.item() == named.item(), precision
        torch.set_float32_matmul_precision("highest")
        hard = ist.instance_loss(z, negatives="hard", fraction=0.5)
        assert hard.item() == ist.instance_loss(z, negatives="hard", fraction=0.5, version="unfused").item()
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_launches_go_to_the_current_stream_in_order():
    # z is written by a long matmul queued on a side stream just before the op: launched on any
    # other stream, the op would read z before it is written.
    side = torch.cuda.Stream()
    a = rows(4096, 4096, seed=7).float()
    b = rows(4096, 64, seed=8).float()
    torch.cuda.synchronize()
    want = ist.instance_loss_torch((a @ b).double()).item()
    with torch.cuda.stream(side):
        busy = a
        for _ in range(4):
            busy = busy @ a  # tens of milliseconds queued ahead of z
        z = (a @ b) + 0.0 * busy[: a.shape[0], :1]
        got = ist.instance_loss(z)
    side.synchronize()
    assert abs(got.item() - want) <= 1e-4 * abs(want), f"{got.item()} vs {want}"


def test_nothing_waits_for_the_gpu():
    z = rows(256, 128, seed=9).float().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ist.instance_loss(z, version="fused-v2")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.device.type == "cuda" and z.grad.device.type == "cuda"


def test_half_precision_inputs_are_cast_and_their_gradient_too():
    z = rows(64, 32, seed=10)
    for dtype in (torch.float16, torch.bfloat16):
        x = z.to(dtype).requires_grad_(True)
        loss = ist.instance_loss(x)
        loss.backward()
        assert x.grad.dtype == dtype
        want = ist.instance_loss_torch(x.detach().double()).item()
        assert abs(loss.item() - want) <= 1e-4 * abs(want)


def test_normalized_rows_give_the_same_gradient_upstream_of_the_normalisation():
    z = rows(70, 24, seed=11).float()
    raw, raw_grad = loss_and_grad(ist.instance_loss, z)
    through, through_grad = loss_and_grad(
        lambda x: ist.instance_loss_normalized(torch.nn.functional.normalize(x, dim=1)), z
    )
    assert abs(raw - through) <= 1e-6 * abs(raw)
    assert (raw_grad - through_grad).norm() <= 1e-4 * raw_grad.norm()


@pytest.mark.parametrize(
    "call,error,needle",
    [
        (lambda: ist.instance_loss(torch.randn(8, 3, device="cuda", dtype=torch.float64)), TypeError, "compute in float32"),
        (lambda: ist.instance_loss(torch.randn(8, 3, device="cuda"), version="fused"), ValueError, "runs on CPU tensors"),
        (lambda: ist.instance_loss(torch.randn(8, 3, device="cuda"), version="unfused-cublas"), ValueError, "own stream"),
        (lambda: ist.instance_loss(torch.randn(8, 3, device="cuda"), version="fused-v9"), ValueError, "fused-v9"),
        (lambda: ist.instance_loss(torch.randn(8, 3, device="cuda"), tau=0.01), ValueError, "tau"),
        (lambda: ist.instance_loss(torch.randn(7, 3, device="cuda")), ValueError, "N = 7"),
        (lambda: ist.instance_loss(torch.randn(8, 3, device="cuda"), negatives="hard", fraction=0.5, version="fused-v2"), ValueError, "hard"),
    ],
)
def test_bad_input_raises_the_crates_message(call, error, needle):
    with pytest.raises(error) as info:
        call()
    assert needle in str(info.value), str(info.value)


def test_a_training_loop_matches_the_pure_pytorch_loop():
    def train(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        images = torch.randn(32, 24, generator=g).cuda()
        losses = []
        for step in range(25):
            batch = images[torch.randperm(32, generator=g)[:8].cuda()]
            z = model(torch.cat([batch + 0.1 * torch.randn(batch.shape, generator=g).cuda(),
                                 batch + 0.1 * torch.randn(batch.shape, generator=g).cuda()]))
            loss = loss_fn(z)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ours = train(lambda z: ist.instance_loss(z, tau=0.1))
        plain = train(lambda z: ist.instance_loss_torch(z, tau=0.1))
    finally:
        torch.set_float32_matmul_precision(before)
    for step, (a, b) in enumerate(zip(ours, plain)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"
    assert ours[-1] < ours[0]
