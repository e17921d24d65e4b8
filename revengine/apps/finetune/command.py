"""`revengine finetune`: its arguments and the command (the recipe's summary printed, exit statuses)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from revengine import MODES
from revengine.models import BLOCK_TYPES as SCHEMES, FIXED_POINT_FALLBACKS

from revengine.optim import OPTIMIZER_NAMES, WEIGHT_DTYPES

from .args import CLIP_CHOICES, DISTILL, FinetuneArgs, FinetuneError
from .recipe import run


def add_arguments(p) -> None:
    a = p.add_argument
    a("--model", required=True, help="HF MoE checkpoint directory (Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE, or a dense "
      "Llama with --upcycle-experts), or a revengine model directory")
    a("--data", required=True, help="jsonl: {\"text\": ...} or {\"prompt\": ..., \"answer\": ...} per line")
    a("--out", required=True, help="output directory: checkpoints/, log.jsonl, and the finished model")
    a("--scheme", default="revffn", choices=SCHEMES + ("none",),
      help="reversible conversion (default revffn); 'none' fine-tunes the HF model itself (baseline)")
    a("--stage1-steps", type=int, default=0, help="stage 1: optimizer steps on the new parameters only")
    a("--steps", type=int, default=100, help="stage 2: optimizer steps on all parameters (default 100)")
    a("--eval-data", default=None, help="jsonl eval split (default: hold out --eval-fraction of --data)")
    a("--eval-fraction", type=float, default=0.1)
    a("--batch-size", type=int, default=8, help="examples per micro-batch")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate of stage 2")
    a("--stage1-lr", type=float, default=None, help="learning rate of stage 1 (default --lr)")
    a("--warmup", type=int, default=0, help="linear warm-up steps at the start of each stage")
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=1.0,
      help="global grad-norm clipping (0: off; with --in-backward per parameter unless --clip global)")
    a("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    a("--bf16", action="store_true", help="bf16 autocast (weights, grads and optimizer state stay fp32)")
    a("--optimizer", default="adamw", choices=OPTIMIZER_NAMES,
      help="adamw (default: torch AdamW, fp32 state, 8 bytes per parameter), adamw8bit or adamw4bit (torchao's "
      "block-quantized state, ~2 or ~1 bytes per parameter; pip install torchao)")
    a("--weights", default="fp32", choices=tuple(WEIGHT_DTYPES),
      help="fp32 (default) or bf16: the model's weights in bf16, updated with stochastic rounding (no fp32 master "
      "copy; needs torchao)")
    a("--in-backward", action="store_true",
      help="step each parameter inside backward as soon as its gradient is complete (the whole model's gradients "
      "never exist at once); --max-grad-norm then clips each parameter's gradient on its own (see --clip); needs "
      "--grad-accum 1")
    a("--clip", default=None, choices=CLIP_CHOICES,
      help="with --in-backward: per-tensor (default: each gradient clipped to --max-grad-norm on its own, inside the "
      "one backward) or global (torch's clip_grad_norm_ over the whole model: a first forward + backward only "
      "measures the norm, a second one steps; about twice the step time)")
    a("--state-device", default=None, choices=("cpu",),
      help="with --in-backward: keep the optimizer state in host memory (pinned with CUDA), copied to the device "
      "per parameter for its step; a --resume may change it")
    a("--offload", default="none", choices=("none", "host", "disk"),
      help="stage 2 with --in-backward: keep each layer's weights and optimizer state off the device between uses "
      "(disk: a file per layer in --offload-dir; host: pinned host memory, for --device cuda), read just before "
      "the layer runs and written back after its step; the run is bit-identical. disk from an HF MoE folder with "
      "a scheme without new parameters (bdia), --stage1-steps 0 and no --distill all: the checkpoint is streamed into "
      "the store a layer at a time, and the store is the run's checkpoint (a model larger than memory trains)")
    a("--offload-dir", default=None, help="--offload disk: the folder of the layer files (default <out>/offload)")
    a("--distill", default="stage1", choices=DISTILL, help="add KL(original || model) to the loss (default stage1)")
    a("--kl-weight", type=float, default=1.0)
    a("--upcycle-experts", type=int, default=0, help="turn a dense Llama into an MoE with E experts first")
    a("--upcycle-top-k", type=int, default=2)
    a("--reversible-mode", default="reversible", choices=MODES)
    a("--gradient-checkpointing", action="store_true", help="HF gradient checkpointing (with --scheme none)")
    a("--moe-chunk-size", type=int, default=None,
      help="experts run in token chunks of this size (0: whole batch; default: chosen from the batch's tokens)")
    a("--fixed-point-fallback", default="store", choices=FIXED_POINT_FALLBACKS,
      help="revffn: a layer whose attention branch stops being a contraction keeps its input (store, exact grads, "
      "the default), warns, or raises")
    a("--bdia-gamma", type=float, default=None,
      help="bdia: |g| of the random signs in training, 2^-k (default 1/16: k = 4 bits kept per element and layer)")
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--save-every", type=int, default=50, help="checkpoint every N steps (also at the end of each stage)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (always at the start and stage ends)")
    a("--eval-batch-size", type=int, default=16)
    a("--eval-max-examples", type=int, default=256, help="examples scored by greedy exact match")
    a("--keep-checkpoints", type=int, default=2)
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--threads", type=int, default=None, help="torch threads")
    a("--device", default="cpu", help="where to train: cpu (default) or cuda[:i]; a --resume may change it")
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def cmd_finetune(ns) -> int:
    names = {f.name for f in fields(FinetuneArgs)}
    args = FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in names})
    try:
        summary = run(args)
    except (FinetuneError, FloatingPointError) as e:
        print(f"revengine finetune: error: {e}", file=sys.stderr)
        return 2
    if summary["status"] == "interrupted":
        return 130
    ev, tm = summary["evals"], summary["timings"]
    print("\nrevengine finetune: finished; model in", args.out)
    for name in ("original", "start", "stage1", "final"):
        if name in ev:
            r = ev[name]
            print(f"  {name:>9}: held-out loss {r['loss']:.4f}" +
                  (f", exact match {r['exact_match']:.3f}" if "exact_match" in r else ""))
    if tm.get("stage2_peak_rss_mb"):
        gpu = f", peak GPU memory {tm['stage2_peak_cuda_mb']:.0f} MB" if tm.get("stage2_peak_cuda_mb") else ""
        print(f"  stage 2: peak RSS {tm['stage2_peak_rss_mb']:.0f} MB{gpu}, median step "
              f"{tm['stage2_median_step_s']:.3f} s")
    return 0
