"""Training curves of the reversible MoE LM, every block type beside plain, on an embedded text.

Byte-level language modelling of revengine.models.corpus (public-domain text, ~4.5 KB, last 10%
held out). Every contender starts from the same seed and sees the same batches:
  plain            block_type "additive" with reversible_mode "plain" (autograd stores everything)
  rev-<type>       each block type with reversible_mode "reversible"
rev-additive is the same function as plain: its curve must match plain's to float noise.

    python benchmarks/train_curves.py                # 300 steps per contender (a few minutes)
    python benchmarks/train_curves.py --quick        # 20 steps (seconds), used by the tests

Prints the loss curves side by side and the held-out loss; never asserts.
"""
import math
import sys
import time

import torch

from _common import parser, pyplot, table_header, verdict
from revengine.models import BLOCK_TYPES, RevMoEConfig, RevMoEForCausalLM
from revengine.models.corpus import splits


def model_config(block_type: str, mode: str, layers: int) -> RevMoEConfig:
    return RevMoEConfig(vocab_size=256, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                        shared_expert_intermediate_size=128, norm_topk_prob=True, router_aux_loss_coef=0.01,
                        router_z_loss_coef=1e-3, max_position_embeddings=512, block_type=block_type,
                        reversible_mode=mode, fixed_point_fallback="store")


def batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, seq: int) -> float:
    chunks = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    x = torch.stack(chunks)
    return float(model(x, labels=x).lm_loss)


def train(name: str, block_type: str, mode: str, args, train_ids, test_ids) -> dict:
    torch.manual_seed(0)
    model = RevMoEForCausalLM(model_config(block_type, mode, args.layers))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    curve, t0 = [], time.perf_counter()
    start = held_out_loss(model, test_ids, args.seq)
    failed = None
    for step, x in enumerate(batches(train_ids, args.steps, args.batch, args.seq, seed=1)):
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        try:
            out.loss.backward()
        except RuntimeError as exc:  # RevFFN: the fixed-point inverse stopped converging
            if "did not converge" not in str(exc):
                raise
            failed = (step, str(exc).split("revengine: ")[-1].split(". The branch")[0])
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(out.lm_loss.item())
    return {"name": name, "curve": curve, "failed": failed, "held_out_start": start, "held_out": held_out_loss(model, test_ids, args.seq),
            "seconds": time.perf_counter() - t0, "fixed_point": model.fixed_point_report()}


def smooth(curve, at, width):
    lo = max(0, at - width + 1)
    return sum(curve[lo:at + 1]) / (at + 1 - lo)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="default 300")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--quick", action="store_true", help="20 steps, 2 layers")
    ap.add_argument("--only", nargs="*", default=None, help="run only these contenders (plain is always run)")
    ap.add_argument("--png", default=None, help="write a plot (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 300
    if args.quick:
        args.layers, args.batch = 2, 8
    train_ids, test_ids = splits()
    print(f"byte-level LM on the embedded text ({len(train_ids)} train / {len(test_ids)} held-out bytes), "
          f"{args.layers} layers, hidden 64, 8 experts top-2, batch {args.batch} x {args.seq}, AdamW lr {args.lr}, "
          f"{args.steps} steps")
    contenders = [("plain", "additive", "plain")] + [(f"rev-{b}", b, "reversible") for b in BLOCK_TYPES]
    if args.only:
        contenders = [c for c in contenders if c[0] == "plain" or c[0] in args.only or c[1] in args.only]
    results = [train(n, b, m, args, train_ids, test_ids) for n, b, m in contenders]
    width = max(1, args.steps // 20)
    marks = sorted(set([0] + [max(0, int(args.steps * f) - 1) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]))
    print()
    print(f"train loss (mean of the last {width} steps) by step:")
    table_header("step", *(r["name"] for r in results))
    for s in marks:
        print(f"| {s + 1} | " + " | ".join(f"{smooth(r['curve'], s, width):.3f}" if s < len(r["curve"]) else "stopped"
                                          for r in results) + " |")
    print("| held-out (start) | " + " | ".join(f"{r['held_out_start']:.3f}" for r in results) + " |")
    print("| held-out (end) | " + " | ".join(f"{r['held_out']:.3f}" for r in results) + " |")
    print("| seconds | " + " | ".join(f"{r['seconds']:.1f}" for r in results) + " |")
    plain = results[0]["curve"]
    add = next((r for r in results if r["name"] == "rev-additive"), None)
    if add is not None:
        print(f"max |rev-additive - plain| over the curve: {max(abs(a - b) for a, b in zip(add['curve'], plain)):.2e}")
    for r in results:
        if r["failed"]:
            print(f"FAIL: {r['name']} stopped at step {r['failed'][0] + 1}: {r['failed'][1]}")
            continue
        verdict(r["held_out"] < r["held_out_start"] - 0.5,
                f"{r['name']} held-out loss {r['held_out_start']:.3f} -> {r['held_out']:.3f}")
    fp = [x for r in results for x in r["fixed_point"]]
    if fp:
        print(f"revffn fixed point: max iterations {max(x['iterations'] for x in fp)}, "
              f"max residual {max(x['residual'] for x in fp):.1e}; layers keeping their input at the last step "
              f"(fixed_point_fallback='store'): {sum(bool(x.get('stored')) for x in fp)} of {len(fp)}")
    if args.png:
        plt = pyplot()
        if plt is None:
            print(f"note: matplotlib is not installed; no plot written to {args.png}")
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            for r in results:
                ax.plot([smooth(r["curve"], s, width) for s in range(len(r["curve"]))], label=r["name"])
            ax.set_xlabel("step")
            ax.set_ylabel("train loss (nats/byte)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.png, dpi=120)
            print(f"plot written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
