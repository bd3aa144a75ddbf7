#!/usr/bin/env python3
"""The reference instance loss in PyTorch (the authors' BatchCriterion operations, with the
l2norm layer in front), eager and torch.compile, timed like `invaspread bench-loss` and printed
in the same table format, so that both run on the same machine and card in one script.

usage: python3 benches/torch_reference.py [--device cpu|cuda] [--n 256 1024 4096 ...] [--d 128]
           [--grad-semantics query-only|both-sides] [--min-seconds 1] [--modes eager compile]
           [--check-max-n 16384] [--deadline-s S]
Each mode's output is checked against the same loss in float64 before it is timed, with the
measure `invaspread bench-loss` uses (the loss relative; dL/dz scaled by row norms), printed in
the last column.
Not a dependency of the crate: PyTorch is on the GPU machines; on a CPU machine install it by hand.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def reference_loss(z, tau, neg_m, both_sides):
    """BatchCriterion.forward (mangye16/Unsupervised_Embedding_Learning, BatchAverage.py) on
    F.normalize(z); `.data` on the keys unless both_sides."""
    x = F.normalize(z, dim=1)
    n = x.size(0)
    keys = x if both_sides else x.detach()
    reordered = torch.cat((keys.narrow(0, n // 2, n // 2), keys.narrow(0, 0, n // 2)), 0)
    pos = (x * reordered).sum(1).div(tau).exp()
    diag = 1 - torch.eye(n, device=z.device, dtype=z.dtype)
    all_prob = torch.mm(x, keys.t()).div(tau).exp() * diag
    all_div = (all_prob.sum(1) - pos) * neg_m + pos
    ln_pmt = torch.div(pos, all_div)
    ln_pon = torch.div(all_prob, all_div.unsqueeze(1))
    ln_pon = (-ln_pon).add(1).log()
    ln_pon = ln_pon.sum(1) - (-ln_pmt).add(1).log()
    ln_pmt = ln_pmt.log()
    return -(ln_pmt.sum(0) + neg_m * ln_pon.sum(0)) / n


def float64_truth(z0, tau, both, with_grad):
    """The loss (and dL/dz) of the same input in float64: what every mode is checked against."""
    z = z0.double().clone().requires_grad_(with_grad)
    loss = reference_loss(z, tau, 1.0, both)
    if with_grad:
        loss.backward()
        return loss.item(), z.grad
    return loss.item(), None


def error_vs_truth(loss, grad, truth, z0):
    """bench-loss's measure: the loss's relative error, and dL/dz with each row scaled by
    ||z_a||, relative to the largest scaled truth entry; the worse of the two."""
    t_loss, t_grad = truth
    err = abs(loss - t_loss) / abs(t_loss)
    if grad is not None:
        norms = z0.double().norm(dim=1, keepdim=True)
        got, want = grad.double() * norms, t_grad * norms
        err = max(err, ((got - want).abs().max() / want.abs().max()).item())
    return err if err == err else float("inf")


def human_time(s):
    if s >= 1.0:
        return "%.3f s" % s
    if s >= 1e-3:
        return "%.3f ms" % (s * 1e3)
    return "%.1f us" % (s * 1e6)


def human_bytes(b):
    if b is None:
        return "-"
    if b >= 1e9:
        return "%.2f GB" % (b / 1e9)
    if b >= 1e6:
        return "%.1f MB" % (b / 1e6)
    return "%.1f kB" % (b / 1e3)


def measure(fn, device, min_seconds, min_runs=3, max_runs=200):
    fn()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--grad-semantics", default="query-only", choices=["query-only", "both-sides"])
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--check-max-n", type=int, default=16384,
                    help="check against float64 up to this N (its N x N float64 matrices)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no measurement after this many seconds (a short GPU lease): "
                         "each mode runs every size before the next mode starts, so eager comes whole")
    args = ap.parse_args()
    start = time.perf_counter()
    sizes = args.n or ([256, 1024, 4096, 16384, 65536] if args.device == "cuda" else [256, 1024, 4096])
    both = args.grad_semantics == "both-sides"
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (%d threads)" % torch.get_num_threads()
    compiled = torch.compile(reference_loss)
    # Every row is printed and flushed as soon as it is measured: a run cut short keeps them all.
    print("| device | version | N | d | pass | median | runs | useful TFLOP/s | extra memory | vs torch-eager | error vs f64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    eager = {}
    truths = {}
    for mode in args.modes:
        for n in sizes:
            gen = torch.Generator().manual_seed(n * 31 + args.d)
            z0 = torch.randn(n, args.d, generator=gen).to(args.device)
            for with_grad in (False, True):
                pas = "fwd+bwd" if with_grad else "fwd"
                version = "torch-" + mode
                if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
                    print("| %s | %s | %d | %d | %s | not run: past --deadline-s %g | 0 | - | - | - | - |"
                          % (dev_name, version, n, args.d, pas, args.deadline_s), flush=True)
                    continue
                if (n, with_grad) not in truths:
                    truths[(n, with_grad)] = float64_truth(z0, args.tau, both, with_grad) if n <= args.check_max_n else None
                truth = truths[(n, with_grad)]
                fn_loss = reference_loss if mode == "eager" else compiled
                z = z0.clone().requires_grad_(with_grad)

                def step():
                    loss = fn_loss(z, args.tau, 1.0, both)
                    if with_grad:
                        z.grad = None
                        loss.backward()
                    return loss

                try:
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    checked = None
                    if truth is not None:
                        loss = step()
                        checked = error_vs_truth(loss.item(), z.grad if with_grad else None, truth, z0)
                    median, runs = measure(step, args.device, args.min_seconds)
                    extra = torch.cuda.max_memory_allocated() - base if args.device == "cuda" else None
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    msg = "OOM" if "out of memory" in str(e).lower() else type(e).__name__
                    print("| %s | %s | %d | %d | %s | %s | 0 | - | - | - | - |" % (dev_name, version, n, args.d, pas, msg),
                          flush=True)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if mode == "eager":
                    eager[(n, pas)] = median
                passes = 1 if not with_grad else (3 if both else 2)
                tflops = passes * 2.0 * n * n * args.d / median / 1e12
                sp = eager.get((n, pas))
                print("| %s | %s | %d | %d | %s | %s | %d | %.3f | %s | %s | %s |" % (
                    dev_name, version, n, args.d, pas, human_time(median), runs, tflops, human_bytes(extra),
                    "%.2fx" % (sp / median) if sp else "-", "unchecked" if checked is None else "%.1e" % checked),
                    flush=True)
    print("\ntorch %s; semantics %s, tau %s" % (torch.__version__, args.grad_semantics, args.tau))


if __name__ == "__main__":
    main()
