"""Is RevFFN's attention branch a contraction in the stream it updates, at conversion and as training goes on?

RevFFN's layer updates x1 by F(x1, x2) = D_a(Attn(q from x1, k/v from x2)); its inverse solves
x1 = y1 - F(x1, x2) by fixed-point iteration, which converges while ||dF/dx1|| < 1. A layer whose
inverse would not converge keeps its input instead (fixed_point_fallback="store"). For each HF MoE
family (Mixtral and Qwen2-MoE: no q/k norm; Qwen3-MoE and OLMoE: q/k RMSNorm) a tiny random-weight
HF model (hidden 64, 2 layers, 8 experts top-2) is converted with scheme="revffn" and trained on the
embedded text (revengine.models.corpus; AdamW, the learning-rate schedule of train_curves.py,
reversible mode). Printed per family and variant:

    Lipschitz       per layer, max over the held-out tokens of the spectral norm of dF/dx1, at step 0
                    and after the last step. Queries are the only way x1 enters F and each token's query
                    sees only its own x1, so dF/dx1 is block diagonal over tokens: each token's d/2 x d/2
                    block is read off exactly by d/2 vector-Jacobian products, and its largest singular
                    value (power iteration's limit) is the local Lipschitz constant of that token's map.
    storing         fraction of layer-steps whose forward found the inverse would not converge and kept
                    the input, over the whole run and over its last 10% (model.fixed_point_report()).

Variants (--variants):
    default     from_hf(hf, scheme="revffn") as the library converts today
    no-qk-norm  diagnostic, not a fix: the same model with the q/k RMSNorms removed (a different function)
    q-gain      diagnostic: the q RMSNorm's weight (the gain after the norm) times 1/4 (a softer attention)
    damped      fixed_point_memory=0: the plain iteration with the step halved when the residual grows
                (the solver before Anderson acceleration)

    python benchmarks/revffn_contraction.py             # 4 families, 200 steps (a few minutes on 2 cores)
    python benchmarks/revffn_contraction.py --quick     # 2 families, 2 layers, 6 steps (seconds)

Prints tables; never asserts.
"""
import math
import sys
import time

import torch

from _common import HF_FAMILIES, hf_benchmark_setup, parser, table_header, tiny_hf
from revengine.convert import from_hf
from revengine.models.corpus import splits
from revengine.models.revffn import RevFFNLayer

VARIANTS = ("default", "no-qk-norm", "q-gain", "damped")


def revffn_layers(model):
    return [m for m in model.modules() if isinstance(m, RevFFNLayer)]


@torch.no_grad()
def lipschitz(model, ids: torch.Tensor):
    """Per RevFFN layer: (max, median) over the tokens of ||dF/dx1||_2 at the layers' inputs for ids."""
    x, ctx = model.model.prepare(ids)
    x1, x2 = x.chunk(2, -1)
    out = []
    for layer in revffn_layers(model):
        with torch.enable_grad():
            a = x1.detach().requires_grad_(True)
            y = layer.attn_increment(a, x2, **ctx)
            rows = []
            for i in range(y.shape[-1]):  # row i of every token's Jacobian block at once
                e = torch.zeros_like(y)
                e[..., i] = 1
                rows.append(torch.autograd.grad(y, a, e, retain_graph=True)[0])
        sigma = torch.linalg.matrix_norm(torch.stack(rows, -2), ord=2)  # [B, S]
        out.append((float(sigma.max()), float(sigma.median())))
        x1, x2 = layer(x1, x2, **ctx)
    return out


def remove_qk_norm(model) -> None:
    for layer in revffn_layers(model):
        layer.attn.self_attn.q_norm = layer.attn.self_attn.k_norm = None
        layer.attn.self_attn.qk_norm_full = False


def scale_q_gain(model, c: float = 0.25) -> None:
    """Multiplies the q RMSNorm's weight (the gain after the normalisation) by c."""
    for layer in revffn_layers(model):
        if layer.attn.self_attn.q_norm is not None:
            layer.attn.self_attn.q_norm.weight.data.mul_(c)


def batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq] for s in starts.tolist()])


def run(family: str, variant: str, args, train_ids, held) -> dict:
    torch.manual_seed(0)
    hf = tiny_hf(family, args.layers).float()
    extra = dict(fixed_point_memory=0) if variant == "damped" else {}
    model = from_hf(hf, scheme="revffn", reversible_mode="reversible", fixed_point_fallback="store", **extra)
    del hf
    if variant == "no-qk-norm":
        remove_qk_norm(model)
    elif variant == "q-gain":
        scale_q_gain(model)
    lip0 = lipschitz(model, held)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / max(1, args.steps))))
    stored, t0 = [], time.perf_counter()
    model.train()
    for x in batches(train_ids, args.steps, args.batch, args.seq, seed=1):
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        stored.append([bool(r.get("stored")) for r in model.fixed_point_report()])
    seconds = time.perf_counter() - t0
    lip1 = lipschitz(model, held) if args.steps else lip0
    tail = stored[-max(1, len(stored) // 10):]
    frac = lambda rows: sum(map(sum, rows)) / max(1, sum(map(len, rows)))  # noqa: E731
    return dict(family=family, variant=variant, lip0=lip0, lip1=lip1, stored_all=frac(stored), stored_tail=frac(tail),
                stored_last=sum(stored[-1]) if stored else 0, loss=float(out.lm_loss) if stored else float("nan"),
                seconds=seconds)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 200; --quick 6)")
    ap.add_argument("--layers", type=int, default=None, help="default 2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--families", nargs="*", default=None, choices=HF_FAMILIES)
    ap.add_argument("--variants", nargs="*", default=["default", "no-qk-norm"], choices=VARIANTS)
    ap.add_argument("--quick", action="store_true", help="Qwen2-MoE and Qwen3-MoE, 2 layers, 6 steps")
    args = ap.parse_args(argv)
    if not hf_benchmark_setup("revffn_contraction"):
        return 0
    args.steps = args.steps if args.steps is not None else (6 if args.quick else 200)
    args.layers = args.layers or 2
    families = args.families or (("qwen2_moe", "qwen3_moe") if args.quick else HF_FAMILIES)
    train_ids, held_ids = splits()
    held = torch.stack([held_ids[s:s + args.seq] for s in range(0, held_ids.numel() - args.seq, args.seq)][:4])
    print(f"revffn from tiny random HF models ({args.layers} layers, hidden 64, 8 experts top-2), trained {args.steps} "
          f"steps on the embedded text (batch {args.batch} x {args.seq}, AdamW lr {args.lr}, warm-up + cosine, "
          f"reversible, fixed_point_fallback='store'); Lipschitz = max over {held.shape[0]} x {held.shape[1]} held-out "
          f"tokens of ||dF/dx1||_2 per layer")
    print()
    fmt = lambda lips, k=0: " ".join(f"{v[k]:.2f}" for v in lips)  # noqa: E731
    table_header("family", "variant", "Lipschitz step 0 (per layer)", f"Lipschitz step {args.steps}",
                 "storing (all steps)", "storing (last 10%)", "storing at the end", "train loss", "seconds")
    results = []
    for f in families:
        for v in args.variants:
            r = run(f, v, args, train_ids, held)
            results.append(r)
            print(f"| {r['family']} | {r['variant']} | {fmt(r['lip0'])} | {fmt(r['lip1'])} | {r['stored_all']:.2f} "
                  f"| {r['stored_tail']:.2f} | {r['stored_last']}/{args.layers} | {r['loss']:.3f} | {r['seconds']:.0f} |",
                  flush=True)
    print()
    print("median over the tokens of ||dF/dx1||_2 per layer, step 0 -> end:")
    for r in results:
        print(f"  {r['family']:<10} {r['variant']:<11} {fmt(r['lip0'], 1)} -> {fmt(r['lip1'], 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
