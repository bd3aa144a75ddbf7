#!/usr/bin/env python3
"""The crate's loss as a PyTorch op (`invaspread.torch.instance_loss`, issue 34) timed inside
PyTorch, forward and backward, against the same loss in plain PyTorch eager and torch.compile
(the authors' BatchCriterion operations, benches/torch_reference.py), alternated within the
same minute, each pair on the same input.

usage: python3 benches/torch_op.py [--device cpu|cuda] [--n 4096 16384] [--d 128]
           [--dtype float32] [--repeats 3] [--min-seconds 1] [--modes op eager compile]
A mode `op-<version>` runs the op with that version (`op-fused-v3-tf32` on CUDA); `op` is its
default (on CUDA the best for the card within torch's float32 matmul precision). Each call ends
with the loss read back (`.item()`), so a CUDA time includes the wait for the GPU.
Needs the package (`pip install .`) and torch. Prints a markdown table: the median of each
mode's per-call times over the repeats, the ratio to the op, and the op's loss error against
float64.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from torch_reference import reference_loss  # noqa: E402

import invaspread.torch as ist  # noqa: E402


def timed(step, min_seconds):
    """Seconds per call of step() (forward + backward), after one warm-up call."""
    step()
    calls, start = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 2:
            return elapsed / calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--modes", nargs="+", default=["op", "eager", "compile"])
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    compiled = torch.compile(reference_loss) if "compile" in a.modes else None
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, d = {a.d}, {a.dtype}, "
          f"forward + backward (query-only), median of {a.repeats} alternated repeats")
    print()
    print("| N | mode | ms per call | x the op | loss error vs float64 |")
    print("|---|---|---|---|---|")
    for n in a.n:
        z0 = torch.randn(n, a.d, generator=torch.Generator().manual_seed(n), dtype=dtype).to(a.device)
        with torch.no_grad():
            truth = reference_loss(z0.double(), 0.1, 1.0, False).item()
        funcs = {
            "op": lambda z: ist.instance_loss(z, tau=0.1),
            "eager": lambda z: reference_loss(z, 0.1, 1.0, False),
            "compile": lambda z: compiled(z, 0.1, 1.0, False),
        }
        for mode in a.modes:
            if mode.startswith("op-"):
                funcs[mode] = lambda z, v=mode[3:]: ist.instance_loss(z, tau=0.1, version=v)
        times = {m: [] for m in a.modes}
        errors = {}
        for _ in range(a.repeats):
            for mode in a.modes:
                z = z0.clone().requires_grad_(True)

                def step():
                    z.grad = None
                    loss = funcs[mode](z)
                    loss.backward()
                    errors[mode] = abs(loss.item() - truth) / abs(truth)

                times[mode].append(timed(step, a.min_seconds))
        base = statistics.median(times["op"]) if "op" in times else None
        for mode in a.modes:
            t = statistics.median(times[mode])
            ratio = f"{t / base:.2f}" if base else "-"
            print(f"| {n} | {mode} | {1e3 * t:.1f} ({', '.join(f'{1e3 * x:.1f}' for x in times[mode])}) "
                  f"| {ratio} | {errors[mode]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
