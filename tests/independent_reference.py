#!/usr/bin/env python3
"""An independent float64 implementation of the instance loss, for tests/cli/loss.rs.

It follows the operations of the authors' PyTorch code (mangye16/Unsupervised_Embedding_Learning,
BatchAverage.py, class BatchCriterion) one by one, in plain Python floats (IEEE float64, no
numpy), and back-propagates through those same operations by hand, as autograd would: keys
detached (`.data`) for query-only, nothing detached for both-sides. It shares no code and no
formula for the gradient with the Rust crate, which implements loss.md's closed form.

usage: independent_reference.py Z.npy TAU MU query-only|both-sides [GRAD_OUT.npy]
prints the loss; writes dL/dz as float64 .npy when GRAD_OUT is given.
"""
import ast
import math
import struct
import sys


def read_npy(path):
    with open(path, "rb") as fh:
        raw = fh.read()
    assert raw[:6] == b"\x93NUMPY", "not a .npy file"
    major = raw[6]
    if major == 1:
        hlen, start = struct.unpack("<H", raw[8:10])[0], 10
    else:
        hlen, start = struct.unpack("<I", raw[8:12])[0], 12
    header = ast.literal_eval(raw[start:start + hlen].decode("latin1"))
    assert not header["fortran_order"]
    n, d = header["shape"]
    code = {"<f4": "f", "<f8": "d"}[header["descr"]]
    vals = struct.unpack("<%d%s" % (n * d, code), raw[start + hlen:])
    return [list(vals[i * d:(i + 1) * d]) for i in range(n)]


def write_npy(path, rows):
    n, d = len(rows), len(rows[0])
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (%d, %d), }" % (n, d)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as fh:
        fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        fh.write(struct.pack("<%dd" % (n * d), *[v for row in rows for v in row]))


def dot(u, v):
    return math.fsum(a * b for a, b in zip(u, v))


def main():
    path, T, negM, semantics = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    grad_out = sys.argv[5] if len(sys.argv) > 5 else None
    both = semantics == "both-sides"
    z = read_npy(path)
    N, d = len(z), len(z[0])
    half = N // 2

    # The network's l2norm layer: x = z / ||z|| (F.normalize clamps at 1e-12).
    norms = [max(math.sqrt(dot(r, r)), 1e-12) for r in z]
    x = [[v / nr for v in r] for r, nr in zip(z, norms)]

    # reordered_x = cat(x[half:], x[:half]); pos = exp((x * reordered_x).sum(1) / T)
    xr = x[half:] + x[:half]
    pos = [math.exp(dot(x[a], xr[a]) / T) for a in range(N)]
    # all_prob = exp(x @ x.T / T) * (1 - eye)
    allp = [[0.0 if a == b else math.exp(dot(x[a], x[b]) / T) for b in range(N)] for a in range(N)]
    # all_div = (all_prob.sum(1) - pos) * negM + pos
    rowsum = [math.fsum(r) for r in allp]
    div = [(rowsum[a] - pos[a]) * negM + pos[a] for a in range(N)]
    Pmt = [pos[a] / div[a] for a in range(N)]
    Pon = [[allp[a][b] / div[a] for b in range(N)] for a in range(N)]
    # lnPon = log(1 - Pon).sum(1) - log(1 - Pmt); loss = -(sum log Pmt + negM sum lnPon) / N
    lnPon = [math.fsum(math.log(1.0 - q) for q in Pon[a]) - math.log(1.0 - Pmt[a]) for a in range(N)]
    loss = -(math.fsum(math.log(p) for p in Pmt) + negM * math.fsum(lnPon)) / N
    print(repr(loss))
    if grad_out is None:
        return

    # Backward through the same operations, last to first.
    gPmt = [-1.0 / (N * Pmt[a]) - negM / (N * (1.0 - Pmt[a])) for a in range(N)]
    gPon = [[negM / (N * (1.0 - Pon[a][b])) for b in range(N)] for a in range(N)]
    gpos = [gPmt[a] / div[a] for a in range(N)]
    gdiv = [-gPmt[a] * pos[a] / div[a] ** 2 - math.fsum(gPon[a][b] * allp[a][b] for b in range(N)) / div[a] ** 2
            for a in range(N)]
    gA = [[gPon[a][b] / div[a] + negM * gdiv[a] for b in range(N)] for a in range(N)]
    gpos = [gpos[a] + (1.0 - negM) * gdiv[a] for a in range(N)]
    gS = [[gA[a][b] * allp[a][b] for b in range(N)] for a in range(N)]  # masked entries are 0
    gsp = [gpos[a] * pos[a] for a in range(N)]

    gx = [[0.0] * d for _ in range(N)]
    for a in range(N):
        acc = gx[a]
        for b in range(N):
            c = gS[a][b] / T
            if c != 0.0:
                xb = x[b]
                for k in range(d):
                    acc[k] += c * xb[k]
                if both:  # the key side of x @ x.T
                    gb, xa = gx[b], x[a]
                    for k in range(d):
                        gb[k] += c * xa[k]
        c = gsp[a] / T
        for k in range(d):
            acc[k] += c * xr[a][k]
        if both:  # the reordered (key) side of the positive product
            pa = (a + half) % N
            for k in range(d):
                gx[pa][k] += c * x[a][k]

    # Through the l2norm: dz = (dx - x (x . dx)) / ||z||
    gz = []
    for a in range(N):
        s = dot(x[a], gx[a])
        gz.append([(gx[a][k] - x[a][k] * s) / norms[a] for k in range(d)])
    write_npy(grad_out, gz)


if __name__ == "__main__":
    main()
