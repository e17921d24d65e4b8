"""Reconstruction drift under bf16 autocast (the default mixed precision: fp32 streams, bf16 compute),
against depth and against training steps, with and without exact=True.

A stack of additive couplings (F, G = LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d)) with
debug=True: backward compares every reconstructed layer input with the true one and records the
relative error (max |x_rec - x| / max |x|) in `last_report`. The table shows the worst layer.

  - by depth: one forward + backward at 8 ... 128 couplings;
  - by training step: 32 couplings trained with AdamW (lr 1e-3) on a regression task; the error at
    steps 0, 10, 50, 100, 200 (weights grow, and so does what rounding can lose).

    python benchmarks/drift.py
    python benchmarks/drift.py --quick
    python benchmarks/drift.py --depths --tokens 256     # only the training table, on fewer tokens

Prints the tables; never asserts. exact=True keeps the streams in fixed point and is bit-exact: its
column should read 0.
"""
import sys

import torch
from torch import nn

import revengine as rev
from _common import parser, table_header


def block(d):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


def stack(depth, d, exact, seed=0):
    torch.manual_seed(seed)
    return rev.Sequential(*[rev.AdditiveCoupling(block(d), block(d)) for _ in range(depth)], mode="reversible",
                          exact=exact, debug=True, debug_tol=1e30)  # record the errors, never raise


def worst_error(model, x, target=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    loss = (y.float() - target).square().mean() if target is not None else y.float().square().mean()
    loss.backward()
    errs = model.last_report.reconstruction_errors
    return max(errs), float(loss.detach())


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", type=int, nargs="*", default=None, help="depths of the first table (none: skip it)")
    ap.add_argument("--train-depth", type=int, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    d, n = a.d or (16 if a.quick else 64), a.tokens or (64 if a.quick else 1024)
    depths = a.depths if a.depths is not None else ([4, 8] if a.quick else [8, 16, 32, 64, 128])
    steps = [0, 2, 5] if a.quick else [0, 10, 50, 100, 200]
    train_depth = a.train_depth or (8 if a.quick else 32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2 * d, generator=g)
    target = torch.randn(n, 2 * d, generator=g)
    print(f"additive couplings, stream width {d}, {n} tokens, fp32 streams, bf16 autocast; worst per-layer relative "
          f"reconstruction error in backward (debug=True)", flush=True)
    if depths:
        print()
        table_header("depth", "exact=False", "exact=True")
    for depth in depths:
        row = [worst_error(stack(depth, d, exact), x.clone().requires_grad_(True))[0] for exact in (False, True)]
        print(f"| {depth} | {row[0]:.2e} | {row[1]:.2e} |", flush=True)
    print()
    print(f"training {train_depth} couplings (AdamW, lr 1e-3):")
    table_header("step", "exact=False error", "loss", "exact=True error", "loss")
    runs = {}
    for exact in (False, True):
        m = stack(train_depth, d, exact)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        rec = {}
        for s in range(max(steps) + 1):
            err, loss = worst_error(m, x, target)
            if s in steps:
                rec[s] = (err, loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[exact] = rec
    for s in steps:
        (e0, l0), (e1, l1) = runs[False][s], runs[True][s]
        print(f"| {s} | {e0:.2e} | {l0:.4f} | {e1:.2e} | {l1:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
