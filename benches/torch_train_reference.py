#!/usr/bin/env python3
"""One training step of the reference in PyTorch: the authors' CIFAR ResNet18 (or the crate's
convnet-small), F.normalize, BatchCriterion, SGD(lr 0.03, momentum 0.9, wd 5e-4), on 128 images
x 2 views of 32 x 32 (256 rows). Prints images/s in a markdown table, for comparison with
`cargo bench --bench train_step` (CPU) or `invaspread bench-train --device cuda` on the same
machine.

On the CPU: float32, median of --steps single steps. On CUDA: PyTorch's defaults (cuDNN
convolutions may use TF32, matmuls do not), or with --amp bf16 torch.autocast to bfloat16; the
mean step over --steps queued steps (one synchronisation), median of 3 repetitions, the same
protocol as bench-train.

usage: python3 benches/torch_train_reference.py [--device cpu|cuda] [--amp none|bf16]
           [--threads T] [--steps 5] [--models resnet18-cifar convnet-small]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """The recipe's network; its state_dict names are the crate's checkpoint names."""

    def __init__(self, dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, dim)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ConvnetSmall(nn.Module):
    def __init__(self, dim=128):
        super().__init__()
        c_in = 3
        for i, (c_out, stride) in enumerate([(32, 1), (64, 2), (128, 2), (256, 2)]):
            setattr(self, "conv%d" % (i + 1), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False))
            setattr(self, "bn%d" % (i + 1), nn.BatchNorm2d(c_out))
            c_in = c_out
        self.linear = nn.Linear(256, dim)

    def forward(self, x):
        for i in range(1, 5):
            x = F.relu(getattr(self, "bn%d" % i)(getattr(self, "conv%d" % i)(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def batch_criterion(x, tau=0.1, neg_m=1.0):
    n = x.size(0)
    reordered = torch.cat((x.narrow(0, n // 2, n // 2), x.narrow(0, 0, n // 2)), 0)
    pos = (x * reordered.data).sum(1).div(tau).exp()
    all_prob = torch.mm(x, x.t().data).div(tau).exp() * (1 - torch.eye(n, device=x.device))
    all_div = (all_prob.sum(1) - pos) * neg_m + pos
    ln_pmt = torch.div(pos, all_div)
    ln_pon = (-torch.div(all_prob, all_div.unsqueeze(1))).add(1).log()
    ln_pon = ln_pon.sum(1) - (-ln_pmt).add(1).log()
    return -(ln_pmt.log().sum(0) + neg_m * ln_pon.sum(0)) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["convnet-small", "resnet18-cifar"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = torch.randn(256, 3, 32, 32, device=dev)
    cuda = args.device == "cuda"
    where = torch.cuda.get_device_name(0) if cuda else "%d threads" % args.threads
    if cuda:
        print("| model | framework | device | mean step | images/s |")
    else:
        print("| model | framework | threads | median step | images/s |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = (ResNet18Cifar() if name == "resnet18-cifar" else ConvnetSmall()).to(dev)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                z = model(x)
            loss = batch_criterion(F.normalize(z.float(), dim=1))
            loss.backward()
            opt.step()

        label = "torch %s eager%s" % (torch.__version__, " bf16 autocast" if args.amp == "bf16" else (" f32 (cuDNN TF32 default)" if cuda else ""))
        if not cuda:
            step()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            print("| %s | %s | %s | %.3f s | %.1f |" % (name, label, where, med, 128 / med), flush=True)
            continue
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        means = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            means.append((time.perf_counter() - t) / args.steps)
        mean = statistics.median(means)
        print("| %s | %s | %s | %.4f s | %.1f |" % (name, label, where, mean, 128 / mean), flush=True)


if __name__ == "__main__":
    main()
