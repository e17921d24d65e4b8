"""Time of the routed-expert MLP with the MoE kernels vs a Python loop over experts.

moe_forward (revengine.moe: permute, gather, grouped_mm, SwiGLU, grouped_mm, scatter_combine) against
moe_forward_reference (a loop over experts: index, two matmuls, index_add, as Hugging Face's eager
experts), at qwen-moe-mini-like shapes: hidden 256, 16 experts top-4, expert width 176, float32.
Each step is forward + backward (grads of x, routing weights, gate_up_proj, down_proj); the two
variants alternate, several rounds after warm-up, and the table gives the medians and their ratio.
Forward-only medians are printed too.

    python benchmarks/moe_kernels.py              # tokens 2048 and 8192 (about a minute on 2 cores)
    python benchmarks/moe_kernels.py --quick      # tiny shapes (seconds), used by the tests
    python benchmarks/moe_kernels.py --device cuda  # on a GPU

Prints a table; never asserts.
"""
import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # a source checkout; an installed revengine or PYTHONPATH takes precedence

import torch  # noqa: E402

from revengine.memory import device_arg, time_alternating  # noqa: E402
from revengine.moe import moe_forward, moe_forward_reference  # noqa: E402

VARIANTS = {"kernels": moe_forward, "loop": moe_forward_reference}


def make_problem(tokens, hidden, experts, top_k, inter, dtype=torch.float32, seed=0, device="cpu"):
    """Inputs of one MoE layer: x, softmax-top-k routing (renormalised, as Mixtral), fused expert weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=dtype)
    router = torch.randn(experts, hidden, generator=g, dtype=dtype) / hidden**0.5
    probs = torch.softmax(x @ router.t(), dim=-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g, dtype=dtype) / inter**0.5
    grad_out = torch.randn(tokens, hidden, generator=g, dtype=dtype)
    x, topk_weights, gate_up, down, topk_ids, grad_out = (
        t.to(device) for t in (x, topk_weights, gate_up, down, topk_ids, grad_out))
    leaves = [t.requires_grad_() for t in (x, topk_weights, gate_up, down)]
    return leaves, topk_ids, grad_out


def make_step(fn, problem, backward=True):
    (x, w, gate_up, down), ids, grad_out = problem

    def step():
        for t in (x, w, gate_up, down):
            t.grad = None
        if not backward:
            with torch.no_grad():
                fn(x, ids, w, gate_up, down)
            return
        out = fn(x, ids, w, gate_up, down)
        out.backward(grad_out)

    return step


def median_times(steps, rounds, device):
    """{name: median seconds} of the steps run in alternation after warm-up (revengine.memory)."""
    return {name: statistics.median(v) for name, v in time_alternating(steps, rounds, device=device).items()}


def max_diff(problem):
    """Largest |kernels - loop| over the output and the four grads (a sanity figure, not a test)."""
    (x, w, gate_up, down), ids, grad_out = problem
    res = []
    for fn in (moe_forward, moe_forward_reference):
        for t in (x, w, gate_up, down):
            t.grad = None
        out = fn(x, ids, w, gate_up, down)
        out.backward(grad_out)
        res.append([out.detach()] + [t.grad.clone() for t in (x, w, gate_up, down)])
    return max(float((a - b).abs().max()) for a, b in zip(*res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts T (default 2048 8192)")
    ap.add_argument("--hidden", type=int, default=None, help="H (default 256)")
    ap.add_argument("--experts", type=int, default=None, help="E (default 16)")
    ap.add_argument("--top-k", type=int, default=None, help="k (default 4)")
    ap.add_argument("--inter", type=int, default=None, help="expert width I (default 176)")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 7; --quick: 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--json", default=None, help="dump the results as JSON")
    args = ap.parse_args(argv)

    q = args.quick
    tokens = args.tokens or ([64, 256] if q else [2048, 8192])
    hidden = args.hidden or (32 if q else 256)
    experts = args.experts or (4 if q else 16)
    top_k = args.top_k or (2 if q else 4)
    inter = args.inter or (16 if q else 176)
    rounds = args.rounds or (3 if q else 7)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if on_gpu else f"{torch.get_num_threads()} threads"

    print(
        f"MoE expert MLP (SwiGLU, HF fused layout), hidden {hidden}, {experts} experts top-{top_k}, "
        f"expert width {inter}, {args.dtype}, {where}"
    )
    print(f"median of {rounds} alternating rounds after warm-up; ratio = loop / kernels (> 1: kernels faster)")
    print()
    hdr = (f"{'tokens':>7} | {'kernels f+b ms':>14} | {'loop f+b ms':>11} | {'ratio':>5} | "
           f"{'kernels fwd ms':>14} | {'loop fwd ms':>11} | {'ratio':>5} | {'max |diff|':>10}")
    print(hdr)
    print("-" * len(hdr))
    results = []
    for T in tokens:
        problem = make_problem(T, hidden, experts, top_k, inter, dtype, device=args.device)
        fb = median_times({n: make_step(f, problem) for n, f in VARIANTS.items()}, rounds, args.device)
        fw = median_times({n: make_step(f, problem, backward=False) for n, f in VARIANTS.items()}, rounds,
                          args.device)
        diff = max_diff(problem)
        row = {
            "tokens": T,
            "fwd_bwd_ms": {n: 1e3 * v for n, v in fb.items()},
            "fwd_ms": {n: 1e3 * v for n, v in fw.items()},
            "ratio_fwd_bwd": fb["loop"] / fb["kernels"],
            "ratio_fwd": fw["loop"] / fw["kernels"],
            "max_abs_diff": diff,
        }
        results.append(row)
        print(
            f"{T:>7} | {row['fwd_bwd_ms']['kernels']:>14.2f} | {row['fwd_bwd_ms']['loop']:>11.2f} | "
            f"{row['ratio_fwd_bwd']:>5.2f} | {row['fwd_ms']['kernels']:>14.2f} | {row['fwd_ms']['loop']:>11.2f} | "
            f"{row['ratio_fwd']:>5.2f} | {diff:>10.2e}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"hidden": hidden, "experts": experts, "top_k": top_k, "inter": inter, "dtype": args.dtype,
                       "device": args.device,
                       "threads": torch.get_num_threads(), "rounds": rounds, "rows": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
