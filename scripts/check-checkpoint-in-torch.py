#!/usr/bin/env python3
"""Checks that an invaspread checkpoint is the PyTorch state_dict of the recipe's network:
loads it with load_state_dict(strict=True) into benches/torch_train_reference.py's model and
compares PyTorch's embeddings (eval mode, F.normalize) of the digits test split with
`invaspread embed`'s.

usage: python3 scripts/check-checkpoint-in-torch.py CHECKPOINT DIGITS_DIR EMBEDDINGS.npy
  (EMBEDDINGS.npy from: invaspread embed --checkpoint CHECKPOINT --dataset digits
   --data-dir DIGITS_DIR --split test --out EMBEDDINGS.npy)
Needs torch, numpy and safetensors; not run by CI (no PyTorch there).
"""
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benches"))
from torch_train_reference import ConvnetSmall, ResNet18Cifar  # noqa: E402

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)


def digits_test(path):
    rows = [list(map(int, line.split(","))) for line in gzip.open(os.path.join(path, "digits.csv.gz"), "rt")]
    test = [r for i, r in enumerate(rows) if i % 5 == 4]  # the crate's split
    pix = np.array([r[:64] for r in test], dtype=np.int64) * 255 // 16  # the crate's u8 conversion
    x = pix.astype(np.float32).reshape(-1, 8, 8) / 255.0
    x = np.repeat(x[:, None, :, :], 3, axis=1)
    return torch.from_numpy((x - MEAN[None, :, None, None]) / STD[None, :, None, None])


def main():
    ckpt, digits, emb_path = sys.argv[1:4]
    with safe_open(ckpt, "pt") as f:
        kind = f.metadata()["model"]
    model = ResNet18Cifar() if kind == "resnet18-cifar" else ConvnetSmall()
    state = load_file(ckpt)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        ours = torch.from_numpy(np.load(emb_path))
        theirs = F.normalize(model(digits_test(digits)), dim=1)
    diff = (ours - theirs).abs().max().item()
    print("%s: %d tensors loaded with strict=True; max |embedding difference| = %.2e over %s" % (kind, len(state), diff, tuple(ours.shape)))
    if diff > 1e-4:
        sys.exit("FAIL: embeddings differ")
    print("OK")


if __name__ == "__main__":
    main()
