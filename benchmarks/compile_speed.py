"""torch.compile with the reversible executor: step time of eager, compiled blocks inside the
executor (Sequential.compile_blocks, fullgraph) and torch.compile of the whole model (one graph
break at the executor), per mode.

Workload: the peers benchmark's stack (additive couplings of pre-norm attention and MLP blocks) on a
[batch, seq, 2d] input, fp32; forward + backward per step; medians of interleaved rounds in one
process after the compile warm-up (compile time is printed separately).

    python benchmarks/compile_speed.py               # depth 8, [8, 256, 128]
    python benchmarks/compile_speed.py --quick       # tiny (tests)

Prints the table (time / eager of the same mode); never asserts.
"""
import copy
import sys
import time

import torch

import revengine as rev
from _common import blocks, interleaved_medians, parser, square_mean_step, table_header


def variants(mode, fg):
    eager = rev.Sequential(*[rev.AdditiveCoupling(f, g) for f, g in copy.deepcopy(fg)], mode=mode)
    inner = copy.deepcopy(eager).compile_blocks(fullgraph=True)
    whole = torch.compile(copy.deepcopy(eager))
    return {"eager": eager, "compiled blocks": inner, "torch.compile(model)": whole}


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="*", default=["reversible", "checkpoint", "plain"])
    a = ap.parse_args(argv)
    depth, batch = a.depth or (2 if a.quick else 8), a.batch or (2 if a.quick else 8)
    seq, d, rounds = a.seq or (16 if a.quick else 256), a.d or (16 if a.quick else 64), a.rounds or (3 if a.quick else 10)
    torch.set_num_threads(a.threads)
    fg = blocks(depth, d, 4, 0.0)
    x = torch.randn(batch, seq, 2 * d, generator=torch.Generator().manual_seed(1), requires_grad=True)
    print(f"{depth} couplings (attention + MLP), input [{batch}, {seq}, {2 * d}], fp32, {a.threads} threads, "
          f"inductor (CPU), {rounds} interleaved rounds", flush=True)
    table_header("mode", "variant", "compile + first step s", "step ms", "/ eager")
    for mode in a.modes:
        torch._dynamo.reset()
        models = variants(mode, fg)

        def step(m):
            square_mean_step(m, x)

        first = {}
        for name, m in models.items():
            t0 = time.perf_counter()
            step(m)
            first[name] = time.perf_counter() - t0
        med = interleaved_medians(models, step, rounds)
        for name in models:
            print(f"| {mode} | {name} | {first[name]:.1f} | {1e3 * med[name]:.1f} | {med[name] / med['eager']:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
