"""The step-0 gap of revengine.convert.from_hf: loss and KL of the converted reversible model
against the original HF model on held-out text, for every scheme and HF MoE family.

A tiny HF MoE model of each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; byte vocabulary, hidden 64,
4 layers, 8 experts top-2) is first trained briefly on the embedded corpus (revengine.models.corpus,
90%), so that its layers carry structure; a random-weight model's logits are near uniform and
every gap would look small. Then each scheme is converted and compared on the held-out 10%:

    loss_hf / loss_rev : next-token cross-entropy (nats/byte) of the original / converted model
    KL                 : mean per-token KL(p_hf || p_rev)
    skip-layers        : the same numbers for embed -> final norm -> LM head (every layer removed),
                         the gap a conversion that threw the layers away would have.

Only a one-layer midpoint/leapfrog stack is the HF function (tests/test_convert.py); everything
else needs fine-tuning / distillation. RevFFN is shown with both adapter inits.

    python benchmarks/convert_gap.py            # 4 families, 300 training steps each
    python benchmarks/convert_gap.py --quick    # 1 family, 20 steps (seconds)

Prints a table; never asserts.
"""
import argparse
import sys
import time

import torch

from _common import HF_FAMILIES as FAMILIES, hf_benchmark_setup, table_header, tiny_hf

def batches(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + seq] for s in starts.tolist()])


def train(model, data, steps: int, batch: int, seq: int, lr: float = 3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    it = batches(data, batch, seq, gen)
    model.train()
    loss = None
    for step in range(steps):
        x = next(it)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach()) if loss is not None else float("nan")


@torch.no_grad()
def skip_layers_gap(hf, ids):
    """Loss / KL of embed -> final norm -> LM head (no layers) against the full model."""
    h = hf.model.norm(hf.model.embed_tokens(ids))
    lp0 = hf.lm_head(h).double().log_softmax(-1)
    lp = hf(input_ids=ids, use_cache=False).logits.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lp0)).sum(-1).mean()
    nll = float(-lp0[:, :-1].gather(-1, ids[:, 1:, None]).mean())
    return nll, float(kl)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one family, a few training steps")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the original (default 300)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--families", nargs="*", default=None, choices=FAMILIES)
    args = ap.parse_args(argv)
    if not hf_benchmark_setup("convert_gap"):
        return 0
    from revengine.models import BLOCK_TYPES as SCHEMES
    from revengine.convert import conversion_gap, from_hf
    from revengine.models.corpus import splits

    steps = args.steps if args.steps is not None else (20 if args.quick else 300)
    families = args.families or (("qwen2_moe",) if args.quick else FAMILIES)
    train_ids, held = splits()
    seq = 64 if args.quick else 128
    held_ids = torch.stack([held[s:s + seq] for s in range(0, held.numel() - seq, seq)][:8])
    variants = [("revffn", dict(adapter_init="coordinate")), ("revffn", dict(adapter_init="zero"))]
    variants += [(s, {}) for s in SCHEMES if s != "revffn"]
    print(f"held-out: {held_ids.shape[0]} x {held_ids.shape[1]} bytes; originals trained {steps} steps "
          f"(AdamW 3e-3, batch 16 x {seq}) on the other 90%; {args.layers} layers, hidden 64, 8 experts top-2")
    table_header("family", "scheme", "loss_hf", "loss_rev", "gap (nats)", "KL")
    for fam in families:
        torch.manual_seed(0)
        hf = tiny_hf(fam, args.layers)
        t0 = time.time()
        final = train(hf, train_ids, steps, 16, seq)
        for scheme, kw in variants:
            model = from_hf(hf, scheme=scheme, reversible_mode="plain", **kw).eval()
            g = conversion_gap(hf, model, held_ids)
            name = scheme + (f" ({kw['adapter_init']})" if kw else "")
            print(f"| {fam} | {name} | {g['loss_hf']:.4f} | {g['loss_rev']:.4f} | {g['loss_rev'] - g['loss_hf']:+.4f} "
                  f"| {g['kl']:.4g} |")
        nll0, kl0 = skip_layers_gap(hf, held_ids)
        print(f"| {fam} | skip-layers | {g['loss_hf']:.4f} | {nll0:.4f} | {nll0 - g['loss_hf']:+.4f} | {kl0:.4f} |")
        print(f"<!-- {fam}: train loss at the end {final:.3f}, {time.time() - t0:.1f} s -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
