"""A plain PyTorch training loop around a reversible MoE language model (no framework).

Trains revengine.models' "tiny" preset (leapfrog blocks by default) on the embedded text as a
byte-level LM, optionally with AdamW stepped inside backward, and prints the held-out loss.

    python examples/train_loop.py [--steps 200] [--block-type leapfrog] [--in-backward]
"""
import argparse
import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout; an installed revengine wins

import torch  # noqa: E402

import revengine as rev  # noqa: E402
from revengine.models import RevMoEConfig, RevMoEForCausalLM, corpus  # noqa: E402


def batches(ids, batch, seq, generator):
    while True:
        start = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        yield torch.stack([ids[s:s + seq] for s in start.tolist()])


@torch.no_grad()
def heldout_loss(model, ids, seq):
    model.eval()
    chunks = ids[: len(ids) // seq * seq].view(-1, seq)
    loss = float(model(chunks, labels=chunks).lm_loss)
    model.train()
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--block-type", default="leapfrog")
    ap.add_argument("--in-backward", action="store_true", help="AdamW inside backward (rev.optim)")
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = RevMoEConfig.preset("tiny", vocab_size=256, block_type=a.block_type, fixed_point_fallback="store")
    model = RevMoEForCausalLM(cfg)
    train, held = corpus.splits()
    if a.in_backward:
        opt = rev.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=a.lr, max_grad_norm=1.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    data = batches(train, 8, 128, torch.Generator().manual_seed(1))
    start = heldout_loss(model, held, 128)
    for step in range(a.steps):
        ids = next(data)
        loss = model(ids, labels=ids).loss
        loss.backward()                   # reversible: each layer's input is recomputed from its output
        if not a.in_backward:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step} loss {float(loss):.3f}", flush=True)
    end = heldout_loss(model, held, 128)
    print(f"held-out loss {start:.3f} -> {end:.3f}")
    return start, end


if __name__ == "__main__":
    main()
