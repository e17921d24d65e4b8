"""revengine beside its peers on one reversible architecture: plain autograd, torch.utils.checkpoint
per layer (non-reentrant), revlib 1.7.2, memcnn 1.5.2 and revengine.

Architecture: a stack of additive couplings y1 = x1 + F(x2), y2 = x2 + G(y1) on a [batch, seq,
2d] input split in two d-wide streams, F a pre-norm self-attention block (LayerNorm ->
MultiheadAttention), G a pre-norm MLP block (LayerNorm -> Linear(d, 4d) -> GELU -> Dropout ->
Linear(4d, d)). Every contender runs the same F/G weights on the same input:

    plain        the couplings as ordinary modules
    checkpoint   each coupling under torch.utils.checkpoint(use_reentrant=False)
    revlib       revlib.ReversibleSequential(F1, G1, F2, G2, ..., split_dim=-1)
    memcnn       memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(F, G, split_dim=-1),
                 keep_input=False, keep_input_inverse=False, preserve_rng_state=True) per layer
    revengine    revengine.Sequential(*[AdditiveCoupling(F, G)], mode="reversible")

Figures:
  - peak-memory delta of one forward + backward (fresh subprocess per figure,
    MALLOC_MMAP_THRESHOLD_=65536), at depths 8, 16, 32, 64;
  - step time (forward + backward) relative to plain: medians of interleaved rounds in one process;
  - gradient agreement with plain (max relative error over the input grad and every parameter
    grad): float64; float64 with dropout 0.1 (same seed before each contender's step); and CPU
    bf16 autocast on fp32 weights.

revlib and memcnn are not revengine dependencies: install them where the benchmark runs
(`pip install --no-deps revlib==1.7.2 memcnn==1.5.2`); a missing one is skipped with a note.

    python benchmarks/peers.py                   # depths 8 16 32 64, table + peers.png
    python benchmarks/peers.py --quick           # tiny sizes (tests)

Prints tables and PASS/FAIL lines; never asserts.
"""
import copy
import os
import sys

import torch
from torch import nn

import revengine as rev
from _common import (
    HERE, blocks, child_env, interleaved_medians, parser, pyplot, square_mean_step, table_header, verdict,
)
from revengine.memory import measure_in_subprocess, measure_step

CONTENDERS = ("plain", "checkpoint", "revlib", "memcnn", "revengine")


class Coupling(nn.Module):
    """The reference: y1 = x1 + F(x2), y2 = x2 + G(y1)."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x):
        x1, x2 = x.chunk(2, -1)
        y1 = x1 + self.f(x2)
        return torch.cat([y1, x2 + self.g(y1)], -1)


class Checkpointed(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        return x


def available(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def build(name, fg, share=False):
    """The contender `name` around deep copies of the (F, G) pairs (or the pairs themselves)."""
    fg = fg if share else copy.deepcopy(fg)
    if name == "plain":
        return nn.Sequential(*[Coupling(f, g) for f, g in fg])
    if name == "checkpoint":
        return Checkpointed([Coupling(f, g) for f, g in fg])
    if name == "revlib":
        import revlib
        return revlib.ReversibleSequential(*[m for pair in fg for m in pair], split_dim=-1)
    if name == "memcnn":
        import memcnn
        return nn.Sequential(*[memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(f, g, split_dim=-1), keep_input=False,
                                                               keep_input_inverse=False, preserve_rng_state=True)
                               for f, g in fg])
    if name == "revengine":
        return rev.Sequential(*[rev.AdditiveCoupling(f, g) for f, g in fg], mode="reversible")
    raise ValueError(name)


def memory_child(name, depth, batch, seq, d, heads, threads):
    """Runs in a fresh subprocess: the peak delta of one forward + backward (after a warm-up)."""
    torch.set_num_threads(threads)
    model = build(name, blocks(depth, d, heads, 0.0))
    x = torch.randn(batch, seq, 2 * d, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def step():
        square_mean_step(model, x)

    step()
    return {"figure": measure_step(step)}


def time_contenders(names, depth, batch, seq, d, heads, rounds):
    fg = blocks(depth, d, heads, 0.0)
    models = {n: build(n, fg) for n in names}
    x = torch.randn(batch, seq, 2 * d, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def step(m):
        square_mean_step(m, x)

    for m in models.values():
        step(m)
    return interleaved_medians(models, step, rounds)


def grads_of(name, fg, x, seed, autocast):
    """Input grad + the grads of the shared F/G parameters, in one order for every contender."""
    params = [p for pair in fg for m in pair for p in m.parameters()]
    for p in params:
        p.grad = None
    model = build(name, fg, share=True).train()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().mean().backward()
    return [x.grad] + [p.grad.clone() for p in params]


def agreement(names, d, heads):
    """Max relative grad error against plain: float64, float64 + dropout 0.1, bf16 autocast."""
    out = {}
    for case, dtype, p, ac in (("float64", torch.float64, 0.0, False), ("float64 + dropout 0.1", torch.float64, 0.1, False),
                               ("bf16 autocast", torch.float32, 0.0, True)):
        fg = blocks(4, d, heads, p, dtype=dtype)
        x = torch.randn(2, 16, 2 * d, generator=torch.Generator().manual_seed(2), dtype=dtype)
        ref = grads_of("plain", fg, x, 7, ac)
        for n in names:
            if n == "plain":
                continue
            try:
                g = grads_of(n, fg, x, 7, ac)
                rel = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(g, ref)]
                err = (rel[0], max(rel[1:]))  # (input grad, worst parameter grad)
            except Exception as e:  # a peer that cannot run the case: say so in the table
                err = f"error: {type(e).__name__}"
            out.setdefault(n, {})[case] = err
    return out


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depths", type=int, nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--d", type=int, default=None, help="stream width (the hidden state is 2d)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default=None, help="PNG path (default benchmarks/peers.png; 'none' to skip)")
    a = ap.parse_args(argv)
    depths = a.depths or ([2, 4] if a.quick else [8, 16, 32, 64])
    batch, seq, d = a.batch or (2 if a.quick else 16), a.seq or (16 if a.quick else 256), a.d or (16 if a.quick else 64)
    rounds = a.rounds or (2 if a.quick else 7)
    names = [n for n in CONTENDERS if n not in ("revlib", "memcnn") or available(n)]
    missing = sorted(set(CONTENDERS) - set(names))
    torch.set_num_threads(a.threads)
    print(f"additive couplings of attention (heads {a.heads}) and MLP blocks; input [{batch}, {seq}, {2 * d}]; fp32; "
          f"{a.threads} threads; glibc malloc (MALLOC_MMAP_THRESHOLD_=65536 in the memory subprocesses)"
          + (f"; not installed, skipped: {missing}" if missing else ""), flush=True)
    mem = {n: {} for n in names}
    env = child_env(a.threads)
    for depth in depths:
        for n in names:
            r = measure_in_subprocess(os.path.abspath(__file__) + ":memory_child",
                                      dict(name=n, depth=depth, batch=batch, seq=seq, d=d, heads=a.heads,
                                           threads=a.threads), env=env, timeout=1800)
            mem[n][depth] = r["figure"]["peak_delta_mb"]
        print(f"  memory at depth {depth} measured", flush=True)
    times = {}
    for depth in depths:
        times[depth] = time_contenders(names, depth, batch, seq, d, a.heads, rounds)
        print(f"  time at depth {depth} measured", flush=True)
    print()
    print("peak-memory delta of forward + backward, MiB (time / plain):")
    table_header("depth", *names)
    for depth in depths:
        cells = [f"{mem[n][depth]:.0f} ({times[depth][n] / times[depth]['plain']:.2f}x)" for n in names]
        print(f"| {depth} | " + " | ".join(cells) + " |")
    ok = []
    for peer in ("revlib", "memcnn"):
        if peer in names:
            worse = [dp for dp in depths if mem["revengine"][dp] > mem[peer][dp] + 1.0]
            ok.append(verdict(not worse, f"revengine peak <= {peer} at every depth"
                              + (f" (worse at {worse})" if worse else "")))
    if "revlib" in names:
        ratios = [times[dp]["revengine"] / times[dp]["revlib"] for dp in depths]
        ok.append(verdict(max(ratios) <= 1.0, "step time revengine / revlib <= 1.0 at every depth: "
                          + ", ".join(f"{r:.2f}" for r in ratios)))
    agree = agreement(names, 16 if not a.quick else 8, 2)
    print()
    print("gradient agreement with plain, max relative error: input grad / worst parameter grad:")
    cases = ["float64", "float64 + dropout 0.1", "bf16 autocast"]
    table_header("contender", *cases)
    for n, row in agree.items():
        print(f"| {n} | " + " | ".join(v if isinstance(v, str) else f"{v[0]:.1e} / {v[1]:.1e}"
                                       for v in (row[c] for c in cases)) + " |")
    plot = a.plot or os.path.join(HERE, "peers.png")
    plt = pyplot() if plot != "none" else None
    if plot != "none" and plt is None:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    elif plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for n in names:
            axes[0].plot(depths, [mem[n][dp] for dp in depths], marker="o", label=n)
            axes[1].plot(depths, [times[dp][n] / times[dp]["plain"] for dp in depths], marker="o", label=n)
        axes[0].set(xlabel="depth (couplings)", ylabel="peak memory delta (MiB)", xscale="log", yscale="log",
                    title="memory of forward + backward")
        axes[1].set(xlabel="depth (couplings)", ylabel="step time / plain", xscale="log", title="step time")
        for ax in axes:
            ax.minorticks_off()
            ax.set_xticks(depths, [str(dp) for dp in depths])
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")
    print(f"{sum(ok)}/{len(ok)} PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
