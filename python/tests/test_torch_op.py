"""invaspread.torch's op against plain PyTorch (instance_loss_torch, autograd over N x N
matrices), loss.md's test vector, gradcheck in float64, strided and wrong inputs, and a small
training loop whose losses must match the pure-PyTorch loop's."""

import math

import pytest
import torch

import invaspread
import invaspread.torch as ist

SEMANTICS = ["query-only", "both-sides"]


def random_rows(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def loss_and_grad(fn, z, **kw):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, **kw)
    loss.backward()
    return loss.detach(), z.grad


# loss.md's test vector: F normalised, gradients dL/dF (before the normalisation backward).
F = [
    [0.78710704, 0.58950303, -0.18151772],
    [-0.92940589, 0.04346545, -0.36649072],
    [0.82002432, -0.56831977, -0.06762214],
    [0.20016328, 0.97969795, 0.01125106],
]
VECTOR = [
    ("query-only", 1.0, 1.88204830, [[-0.40349389, 1.0062762, 0.0511484], [0.21076491, -0.31070366, -0.05049338], [-0.22820454, 0.02452549, 0.01850786], [1.16799121, 0.44900241, 0.11854804]]),
    ("query-only", 2.0, 2.26205528, [[-0.3470207, 0.80090544, 0.03503303], [0.25786652, -0.38153571, -0.06162433], [-0.32335564, 0.03389984, 0.02584686], [0.89239206, 0.25776027, 0.09863183]]),
    ("both-sides", 1.0, 1.88204830, [[-0.639971, 1.886332, 0.002567], [0.136418, -1.021202, -0.063328], [-0.892877, -0.417232, 0.080759], [2.143487, 0.721202, 0.117713]]),
]


@pytest.mark.parametrize("semantics,mu,loss,grad", VECTOR)
def test_the_test_vector_of_loss_md(semantics, mu, loss, grad):
    f = torch.tensor(F, dtype=torch.float64)
    got, g = loss_and_grad(ist.instance_loss_normalized, f, tau=0.5, mu=mu, semantics=semantics)
    assert abs(got.item() - loss) < 1e-7
    assert torch.allclose(g, torch.tensor(grad, dtype=torch.float64), atol=2e-6)


CASES = [
    (negatives, fraction, scale)
    for negatives, fraction in [("all", 1.0), ("hard", 0.5), ("hard", 0.25), ("easy", 0.5)]
    for scale in (["official", "mean"] if negatives != "all" else ["official"])
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("negatives,fraction,scale", CASES)
@pytest.mark.parametrize("n,d", [(6, 3), (70, 5), (130, 128)])
@pytest.mark.parametrize("normalized", [False, True])
def test_against_plain_pytorch(dtype, semantics, negatives, fraction, scale, n, d, normalized):
    z = random_rows(n, d, dtype, seed=n * 1000 + d)
    if normalized:
        z = torch.nn.functional.normalize(z, dim=1)
    kw = dict(tau=0.1, mu=1.5, semantics=semantics, negatives=negatives, fraction=fraction, scale=scale)
    op = ist.instance_loss_normalized if normalized else ist.instance_loss
    got, g = loss_and_grad(op, z, **kw)
    want, w = loss_and_grad(ist.instance_loss_torch, z.double(), normalized=normalized, **kw)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    scale_of_grad = w.abs().max().item()
    assert (g.double() - w).abs().max().item() <= 10 * tol * scale_of_grad


@pytest.mark.parametrize("negatives,fraction", [("all", 1.0), ("hard", 0.5), ("easy", 0.5)])
@pytest.mark.parametrize("normalized", [False, True])
def test_gradcheck_in_float64(negatives, fraction, normalized):
    # both-sides only: it is the loss's derivative, which finite differences measure;
    # query-only holds the keys constant (the authors' .data) and is checked against plain
    # PyTorch's detached keys above.
    z = random_rows(8, 4, torch.float64, seed=3).requires_grad_(True)
    op = ist.instance_loss_normalized if normalized else ist.instance_loss
    fn = lambda x: op(x, tau=0.5, mu=1.5, semantics="both-sides", negatives=negatives, fraction=fraction)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)


def test_query_only_is_the_gradient_with_the_keys_held_constant():
    z = random_rows(8, 4, torch.float64, seed=4)
    _, g = loss_and_grad(ist.instance_loss, z, tau=0.5)
    keys = torch.nn.functional.normalize(z, dim=1)
    def with_keys(x):
        f = torch.nn.functional.normalize(x, dim=1)
        s = f @ keys.T / 0.5
        n, m = 8, 4
        e = torch.exp(s) * (1 - torch.eye(n, dtype=s.dtype))
        partner = (torch.arange(n) + m) % n
        pos = e[torch.arange(n), partner]
        d = e.sum(dim=1)
        neg = e / d[:, None]
        mask = torch.ones(n, n, dtype=torch.bool)
        mask[torch.arange(n), torch.arange(n)] = False
        mask[torch.arange(n), partner] = False
        return -(torch.log(pos / d) + torch.where(mask, torch.log1p(-neg), 0 * neg).sum(1)).mean()
    x = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(with_keys, (x,), eps=1e-6, atol=1e-6)
    with_keys(x).backward()
    assert torch.allclose(g, x.grad, atol=1e-10)


def test_the_gradient_scales_with_the_upstream_gradient():
    z = random_rows(10, 6, torch.float64, seed=5).requires_grad_(True)
    (3.0 * ist.instance_loss(z)).backward()
    _, g = loss_and_grad(ist.instance_loss, z)
    assert torch.allclose(z.grad, 3.0 * g, rtol=1e-12, atol=0)


def test_versions_agree():
    z = random_rows(12, 7, torch.float64, seed=9)
    ref, gr = loss_and_grad(ist.instance_loss, z, version="reference")
    f64, g64 = loss_and_grad(ist.instance_loss, z, version="fused-f64")
    f32, g32 = loss_and_grad(ist.instance_loss, z.float(), version="fused")
    assert abs(ref.item() - f64.item()) < 1e-12 and abs(ref.item() - f32.item()) < 1e-5
    assert torch.allclose(gr, g64, atol=1e-12) and torch.allclose(gr, g32.double(), atol=1e-5)
    assert invaspread.CPU_VERSIONS == ["reference", "fused", "fused-f64"]


def test_strided_inputs_are_read_as_their_values_and_left_alone():
    base = random_rows(9, 16, torch.float32, seed=11)
    column_major = base.T.contiguous().T[:8]
    every_other = base[:8, ::2]
    for view in [column_major, every_other]:
        assert not view.is_contiguous()
        before = view.clone()
        got, g = loss_and_grad(ist.instance_loss, view)
        want, w = loss_and_grad(ist.instance_loss, view.contiguous())
        assert got.item() == want.item() and torch.equal(g, w)
        assert torch.equal(view, before)
    # The native module itself refuses a strided capsule rather than misread it.
    with pytest.raises(ValueError, match="expected a contiguous row-major matrix"):
        invaspread._native.instance_loss(
            every_other.__dlpack__(), None, tau=0.1, mu=1.0, semantics="query-only",
            negatives="all", fraction=1.0, scale="official", normalized=False,
        )


def test_without_a_gradient_no_gradient_is_computed():
    z = random_rows(8, 3, torch.float32, seed=1)
    with torch.no_grad():
        loss = ist.instance_loss(z)
    assert loss.grad_fn is None
    assert loss.item() == ist.instance_loss(z.clone().requires_grad_(True)).item()


@pytest.mark.parametrize(
    "call,error,needle",
    [
        (lambda: ist.instance_loss(torch.randn(8, 3).half()), TypeError, "expected torch.float32 or torch.float64"),
        (lambda: ist.instance_loss(torch.zeros(8, 3, dtype=torch.int64)), TypeError, "dtype torch.int64"),
        (lambda: ist.instance_loss([[1.0, 2.0]]), TypeError, "must be a torch.Tensor"),
        (lambda: ist.instance_loss(torch.randn(8)), ValueError, "expected an N x d matrix"),
        (lambda: ist.instance_loss(torch.randn(2, 4, 3)), ValueError, "expected an N x d matrix"),
        (lambda: ist.instance_loss(torch.randn(7, 3)), ValueError, "N = 7 rows is invalid: expected an even N >= 4"),
        (lambda: ist.instance_loss(torch.randn(2, 3)), ValueError, "expected an even N >= 4"),
        (lambda: ist.instance_loss(torch.randn(8, 0)), ValueError, "d = 0"),
        (lambda: ist.instance_loss(torch.randn(8, 3), tau=0.0), ValueError, "tau = 0 is invalid"),
        (lambda: ist.instance_loss(torch.randn(8, 3), tau=math.nan), ValueError, "tau = NaN is invalid"),
        (lambda: ist.instance_loss(torch.randn(8, 3), mu=0.5), ValueError, "mu = 0.5 is invalid"),
        (lambda: ist.instance_loss(torch.randn(8, 3), semantics="keys"), ValueError, 'semantics "keys" is not one of query-only, both-sides'),
        (lambda: ist.instance_loss(torch.randn(8, 3), negatives="some"), ValueError, 'negatives "some" is not one of all, hard, easy'),
        (lambda: ist.instance_loss(torch.randn(8, 3), negatives="hard", fraction=1.5), ValueError, "1.5"),
        (lambda: ist.instance_loss(torch.randn(8, 3), negatives="hard", fraction=0.0), ValueError, "fraction"),
        (lambda: ist.instance_loss(torch.randn(8, 3), fraction=0.5), ValueError, 'negatives = "all"'),
        (lambda: ist.instance_loss(torch.randn(8, 3), negatives="hard", fraction=0.5, scale="half"), ValueError, 'scale "half"'),
        (lambda: ist.instance_loss(torch.randn(8, 3), version="fused-v9"), ValueError, 'version "fused-v9" is not one of'),
        (lambda: ist.instance_loss(torch.randn(8, 3), version="fused-v2"), ValueError, "runs on CUDA tensors"),
        (lambda: ist.instance_loss(torch.randn(8, 3).double(), version="fused"), ValueError, "runs in float32"),
        (lambda: ist.instance_loss(torch.full((8, 3), math.inf)), ValueError, "is not finite"),
        (lambda: ist.instance_loss(torch.zeros(8, 3)), ValueError, "row 0 of z is all zeros"),
        (lambda: ist.instance_loss_normalized(torch.randn(8, 3), version="reference"), ValueError, "takes raw embeddings"),
    ],
)
def test_bad_input_raises_the_crates_message(call, error, needle):
    with pytest.raises(error) as info:
        call()
    assert needle in str(info.value), str(info.value)


class Encoder(torch.nn.Module):
    """A small model of the recipe's shape (features, then a linear embedding), no torchvision."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_training_loop_matches_the_pure_pytorch_loop(dtype):
    def train(loss_fn):
        torch.manual_seed(0)
        model = Encoder().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        images = torch.randn(32, 24, dtype=dtype)
        losses = []
        for step in range(25):
            g = torch.Generator().manual_seed(step)
            batch = images[torch.randperm(32, generator=g)[:8]]
            noise = lambda: 0.1 * torch.randn(batch.shape, generator=g, dtype=dtype)
            z = model(torch.cat([batch + noise(), batch + noise()]))
            loss = loss_fn(z)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ours = train(lambda z: ist.instance_loss(z, tau=0.1))
    plain = train(lambda z: ist.instance_loss_torch(z, tau=0.1))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for step, (a, b) in enumerate(zip(ours, plain)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: {a} vs {b}"
    assert ours[-1] < ours[0], "the loss went down"


def test_the_cuda_plan_is_checked_without_a_gpu():
    # The CUDA path's choices and checks before anything is allocated (python/src/lib.rs
    # cuda_plan): they run on any machine; the launches themselves only on a GPU
    # (test_torch_cuda.py).
    from invaspread import _native

    settings = dict(tau=0.1, mu=1.0, semantics="query-only", negatives="all", fraction=1.0, scale="official")
    plan = lambda **kw: _native.cuda_plan(4096, 128, **{**settings, "version": None, "capability": (9, 0), "precision": "highest", **kw})
    assert plan()[0] == "fused-v2" and plan()[1] > 0
    assert plan(precision="high")[0] == "fused-v3-tf32"
    assert plan(precision="medium")[0] == "fused-v3-bf16"
    assert plan(precision="high", capability=(7, 5))[0] == "fused-v2"
    assert plan(negatives="hard", fraction=0.5)[0] == "unfused"
    assert plan(version="fused-v1")[0] == "fused-v1"
    # fused-v2 keeps O(N) scratch; unfused stores N x N.
    assert plan(version="unfused")[1] > 4096 * 4096 * 4 > plan()[1]
    for kw, needle in [
        (dict(version="unfused-cublas"), "own stream"),
        (dict(version="fused"), "runs on CPU tensors"),
        (dict(tau=0.01), "tau"),
        (dict(precision="low"), "highest, high or medium"),
        (dict(negatives="hard", fraction=0.5, version="fused-v2"), "hard"),
    ]:
        with pytest.raises(ValueError, match=needle):
            plan(**kw)
    with pytest.raises(ValueError, match="N = 7"):
        _native.cuda_plan(7, 3, **settings, version=None, capability=(9, 0), precision="highest")


def test_the_cuda_entry_point_refuses_cpu_tensors():
    from invaspread import _native

    z = torch.randn(8, 3)
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        _native.instance_loss_cuda(
            z.__dlpack__(), None, torch.zeros(4096, dtype=torch.uint8).__dlpack__(),
            torch.zeros((), dtype=torch.float64).__dlpack__(), stream=0, tau=0.1, mu=1.0,
            semantics="query-only", negatives="all", fraction=1.0, scale="official", version="fused-v2",
        )
