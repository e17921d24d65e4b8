"""Low-memory training state: bytes per parameter, step time and loss for every optimizer x weights x
in-backward combination of `revengine finetune`, on one converted model in one process (CPU).

Model: qwen-moe-mini (76M parameters) converted with scheme bdia, random init; data: one fixed batch of
byte-level 3-digit arithmetic records (ids < 257), trained on for --steps steps at lr 1e-3 (the loss falls
on any working optimizer). Step time: median of the steps after the first (whose time includes allocating
the optimizer state, and with --compile torchao's torch.compile of each parameter shape, reported apart).
Bytes per parameter: weights + optimizer state (computed from the tensors, quantized state counted as its
codes and scales). Timings on a shared 2-core machine are noisy: compare rows, not absolute seconds.

    python benchmarks/lowbit.py [--batch 2 --seq 128 --steps 6] [--compile]
"""
import argparse
import statistics
import time

import torch

from revengine.memory import breakdown
from revengine.models import RevMoEConfig, RevMoEForCausalLM
from revengine.optim import WEIGHT_DTYPES, InBackwardOptimizer, optimizer_class

CONFIGS = [("adamw", "fp32", False), ("adamw", "fp32", True), ("adamw8bit", "fp32", False),
           ("adamw8bit", "fp32", True), ("adamw4bit", "fp32", True), ("adamw", "bf16", True),
           ("adamw8bit", "bf16", False), ("adamw8bit", "bf16", True), ("adamw4bit", "bf16", True)]


def batch_ids(batch: int, seq: int) -> torch.Tensor:
    import random
    rnd = random.Random(0)
    text = "".join(f"{a}+{b}={a + b}\n" for a, b in ((rnd.randrange(1000), rnd.randrange(1000))
                                                      for _ in range(batch * seq // 8 + 8)))
    ids = torch.tensor(list(text.encode())[: batch * seq]).view(batch, seq)
    return ids


def run(name, weights, in_backward, a, ids):
    torch.manual_seed(0)
    cfg = RevMoEConfig.preset("qwen-moe-mini", block_type="bdia", num_hidden_layers=a.layers)
    model = RevMoEForCausalLM(cfg).to(WEIGHT_DTYPES[weights]).train()
    cls, kw = optimizer_class(name, weights=weights, compile=a.compile)
    opt = (InBackwardOptimizer(model.parameters(), cls, lr=1e-3, weight_decay=0.0, **kw) if in_backward
           else cls(model.parameters(), lr=1e-3, weight_decay=0.0, **kw))
    times, loss = [], None
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if not in_backward:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    b = breakdown(model, opt)
    n = b["params"]
    return {"optimizer": name, "weights": weights, "in_backward": in_backward, "params": n,
            "w_bpp": b["weights_bytes"] / n, "s_bpp": b["optimizer_state_bytes"] / n,
            "first_s": times[0], "step_s": statistics.median(times[1:]), "loss": float(loss)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torchao's torch.compile'd update (default: revengine's fused CPU kernel)")
    ap.add_argument("--only", nargs="*", default=None, help="optimizer:weights:ib names, e.g. adamw8bit:bf16:1")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ids = batch_ids(a.batch, a.seq)
    configs = CONFIGS if not a.only else [(o, w, ib == "1") for o, w, ib in (s.split(":") for s in a.only)]
    print(f"qwen-moe-mini bdia ({a.layers} layers), batch {a.batch} x {a.seq}, {a.steps} steps at lr 1e-3, "
          f"{'torchao compiled' if a.compile else 'fused CPU'} update, {a.threads} threads")
    print("| optimizer | weights | in backward | weights B/param | state B/param | total B/param | first step s "
          "| median step s | loss after |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for name, weights, ib in configs:
        r = run(name, weights, ib, a, ids)
        base = base or r["step_s"]
        print(f"| {name} | {weights} | {'yes' if ib else 'no'} | {r['w_bpp']:.2f} | {r['s_bpp']:.2f} | "
              f"{r['w_bpp'] + r['s_bpp']:.2f} | {r['first_s']:.1f} | {r['step_s']:.2f} ({r['step_s'] / base:.2f}x) "
              f"| {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
