"""Time of BDIA's fused exact step (revengine::bdia_step_ / bdia_unstep_) vs the same arithmetic as
separate torch ops.

One exact BDIA layer updates the int64 stream u = p_prev in place: keep the k bits that g*u drops
(packed 8/k to a byte), u <- s (u >> k) + src - s (src >> k) + round((1 + g) inc 2^frac_bits), g = s 2^-k
per sample. The fused kernels do it in one pass over u, src and inc (CPU: csrc/ops.cpp; CUDA:
csrc/cuda/coupling_kernels.cu); "ops" is what the BDIA layer ran before them: shift, multiply, add,
pack and fixed_update_ as separate ATen ops, each a full pass with int64 temporaries. Both variants
alternate, several rounds after warm-up; the table gives medians and the ratio ops / fused
(> 1: fused faster) for the step (forward) and the unstep (inverse in backward), and whether the two
variants agree bit for bit (they must: same arithmetic).

    python benchmarks/bdia_kernels.py                   # CPU, a [B, T, H] stream per row of the table
    python benchmarks/bdia_kernels.py --device cuda     # on a GPU
    python benchmarks/bdia_kernels.py --quick           # tiny shapes (seconds), used by the tests

Prints a table; never asserts.
"""
import json
import sys

import torch

import revengine  # noqa: F401  (registers torch.ops.revengine)
from _common import add_device, median_times, parser, ruled_header

R = torch.ops.revengine


def per_sample(sign, like):
    return sign.view((-1,) + (1,) * (like.dim() - 1))


def pack_low_ops(u, k):
    low = (u & ((1 << k) - 1)).to(torch.uint8).reshape(-1)
    per = 8 // k if (k < 8 and 8 % k == 0) else 1
    if per == 1:
        return low
    low = torch.cat([low, low.new_zeros((-low.numel()) % per)]).view(-1, per)
    packed = low[:, 0].clone()
    for j in range(1, per):
        packed |= low[:, j] << (j * k)
    return packed


def unpack_low_ops(packed, k, like):
    per = 8 // k if (k < 8 and 8 % k == 0) else 1
    if per == 1:
        return packed.long().view(like.shape)
    parts = [(packed >> (j * k)) & ((1 << k) - 1) for j in range(per)]
    return torch.stack(parts, 1).reshape(-1)[: like.numel()].long().view(like.shape)


def step_ops(u, src, inc, sign, frac, k):
    """The step as separate torch ops (what the BDIA layer ran before the fused kernel)."""
    sg = per_sample(sign, u)
    low = pack_low_ops(u, k)
    u.bitwise_right_shift_(k).mul_(sg)
    u.add_(src).sub_((src >> k).mul_(sg))
    R.fixed_update_(u, inc.double() * (1 + per_sample(sign, inc).double() * 2.0**-k), frac, 1)
    return low


def unstep_ops(u, src, inc, sign, low, frac, k):
    sg = per_sample(sign, u)
    R.fixed_update_(u, inc.double() * (1 + per_sample(sign, inc).double() * 2.0**-k), frac, -1)
    u.sub_(src).add_((src >> k).mul_(sg))
    u.mul_(sg).bitwise_left_shift_(k).bitwise_or_(unpack_low_ops(low, k, u))


def make_problem(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64)
    src = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64)
    inc = torch.randn(shape, generator=g).to(dtype)
    sign = torch.randint(0, 2, (shape[0],), generator=g, dtype=torch.int64) * 2 - 1
    return [t.to(device) for t in (u, src, inc, sign)]


def agree(problem, frac, k):
    """True when fused and ops give the same u and low bits, and both unsteps restore u."""
    u, src, inc, sign = problem
    a, b = u.clone(), u.clone()
    low_a = R.bdia_step_(a, src, inc, sign, frac, k)
    low_b = step_ops(b, src, inc, sign, frac, k)
    same = torch.equal(a, b) and torch.equal(low_a, low_b)
    R.bdia_unstep_(a, src, inc, sign, low_a, frac, k)
    unstep_ops(b, src, inc, sign, low_b, frac, k)
    return same and torch.equal(a, u) and torch.equal(b, u)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--shapes", default=None,
                    help="B,T,H stream shapes separated by spaces (default '16,128,576 8,512,576 8,2048,1024')")
    ap.add_argument("--gamma-bits", type=int, default=4, help="k: gamma = 2^-k (default 4, the models' 1/16)")
    ap.add_argument("--frac-bits", type=int, default=24, help="fixed-point fraction bits (default 24, bdia's)")
    ap.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32", help="dtype of f(p)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 9; --quick: 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_device(ap)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--json", default=None, help="dump the results as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    default = "2,16,32 4,64,64" if args.quick else "16,128,576 8,512,576 8,2048,1024"
    shapes = [tuple(int(v) for v in s.split(",")) for s in (args.shapes or default).split()]
    rounds = args.rounds or (3 if args.quick else 9)
    k, frac, dtype, dev = args.gamma_bits, args.frac_bits, getattr(torch, args.dtype), args.device

    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"BDIA exact step, gamma 2^-{k}, {frac} fraction bits, f(p) in {args.dtype}, {where}")
    print(f"median of {rounds} alternating rounds after warm-up; ratio = ops / fused (> 1: fused faster)")
    print()
    hdr = (f"{'stream B,T,H':>15} | {'fused step ms':>13} | {'ops step ms':>11} | {'ratio':>5} | "
           f"{'fused unstep ms':>15} | {'ops unstep ms':>13} | {'ratio':>5} | identical")
    ruled_header(hdr)
    results = []
    for shape in shapes:
        problem = make_problem(shape, dtype, dev)
        u0, src, inc, sign = problem
        work = u0.clone()
        low = R.bdia_step_(u0.clone(), src, inc, sign, frac, k)

        def restore():
            work.copy_(u0)

        def fused_step():
            restore()
            R.bdia_step_(work, src, inc, sign, frac, k)

        def ops_step():
            restore()
            step_ops(work, src, inc, sign, frac, k)

        def fused_unstep():
            restore()
            R.bdia_unstep_(work, src, inc, sign, low, frac, k)

        def ops_unstep():
            restore()
            unstep_ops(work, src, inc, sign, low, frac, k)

        fwd = median_times({"fused": fused_step, "ops": ops_step}, rounds, dev)
        inv = median_times({"fused": fused_unstep, "ops": ops_unstep}, rounds, dev)
        same = agree(problem, frac, k)
        row = {"shape": list(shape), "step_ms": {n: 1e3 * v for n, v in fwd.items()},
               "unstep_ms": {n: 1e3 * v for n, v in inv.items()}, "ratio_step": fwd["ops"] / fwd["fused"],
               "ratio_unstep": inv["ops"] / inv["fused"], "identical": same}
        results.append(row)
        print(f"{','.join(map(str, shape)):>15} | {1e3 * fwd['fused']:13.2f} | {1e3 * fwd['ops']:11.2f} | "
              f"{row['ratio_step']:5.2f} | {1e3 * inv['fused']:15.2f} | {1e3 * inv['ops']:13.2f} | "
              f"{row['ratio_unstep']:5.2f} | {'yes' if same else 'NO'}")
    print()
    print("(each timing includes one copy of u to restore it, the same for both variants)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "gamma_bits": k, "frac_bits": frac, "dtype": args.dtype, "results": results},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
