#!/usr/bin/env python3
"""Checks one whole training step against PyTorch: from the same checkpoint and the same batch,
`invaspread step` and PyTorch (the recipe's network in train mode, F.normalize, the authors'
BatchCriterion with keys detached, SGD lr 0.03 / momentum 0.9 / weight decay 5e-4) must give the
same loss and the same parameters and batchnorm statistics afterwards.

usage: python3 scripts/check-step-in-torch.py INVASPREAD_BINARY CHECKPOINT [IMAGE_SIZE] [STEP FLAGS...]
(for example `32 --cpu-conv im2col` to check the first convolution version)
Needs torch, numpy and safetensors; not run by CI (no PyTorch there).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
from torch_train_reference import ConvnetSmall, ResNet18Cifar, batch_criterion  # noqa: E402


def main():
    exe, ckpt = sys.argv[1:3]
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    step_flags = sys.argv[4:]
    with safe_open(ckpt, "pt") as f:
        kind = f.metadata()["model"]
    torch.manual_seed(0)
    x = torch.randn(16, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        xin, out = os.path.join(tmp, "x.npy"), os.path.join(tmp, "after.safetensors")
        np.save(xin, x.numpy())
        ours_loss = float(subprocess.run([exe, "step", "--checkpoint", ckpt, "--input", xin, "--out", out] + step_flags,
                                         check=True, capture_output=True, text=True).stdout)
        ours = load_file(out)
    before = load_file(ckpt)

    def torch_step(dtype):
        model = ResNet18Cifar() if kind == "resnet18-cifar" else ConvnetSmall()
        model.load_state_dict(before, strict=True)
        model = model.to(dtype).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
        loss = batch_criterion(F.normalize(model(x.to(dtype)), dim=1))
        loss.backward()
        opt.step()
        return loss.item(), model.state_dict()

    # PyTorch in float64 is the truth; PyTorch in float32 shows how far float32 rounding goes.
    (loss64, truth), (loss32, torch32) = torch_step(torch.float64), torch_step(torch.float32)

    def worst_update_error(after):
        """max over tensors of ||update - true update|| / ||true update||."""
        worst, worst_name = 0.0, ""
        for name, value in truth.items():
            if name.endswith("num_batches_tracked"):
                assert int(after[name]) == int(value), name
                continue
            d = after[name].double() - before[name].double()
            d_true = value.double() - before[name].double()
            err = (d - d_true).norm().item() / max(d_true.norm().item(), 1e-300)
            if err > worst:
                worst, worst_name = err, name
        return worst, worst_name

    ours_err, ours_name = worst_update_error(ours)
    t32_err, t32_name = worst_update_error(torch32)
    print("%s, %dx%d: loss ours %.8f, torch f32 %.8f, torch f64 %.8f" % (kind, size, size, ours_loss, loss32, loss64))
    print("  worst relative error of a tensor's update against torch f64: ours %.2e (%s), torch f32 %.2e (%s)"
          % (ours_err, ours_name, t32_err, t32_name))
    # Ours must be as close to the float64 truth as PyTorch's own float32 step (or within 1e-4).
    if abs(ours_loss - loss64) > 1e-5 * abs(loss64) or ours_err > max(2 * t32_err, 1e-4):
        sys.exit("FAIL")
    print("OK")

if __name__ == "__main__":
    main()
