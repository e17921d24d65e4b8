"""`revengine breakdown`: the peak memory of one training step of a (converted) causal LM, broken
down into weights, grads, optimizer state, activations and logits, measured in a fresh process."""
import sys
from typing import Optional

import torch

from revengine import MODES, convert, memory
from revengine.memory import device_arg, measure_in_subprocess
from revengine.models import BLOCK_TYPES, RevMoEForCausalLM, chunked_cross_entropy
from revengine.optim import OPTIMIZER_NAMES, TORCHAO_HINT, WEIGHT_DTYPES, InBackwardOptimizer, needs_torchao, \
    create, optimizer_class, torchao_available


def _head_fn(model, batch: int, seq: int):
    """The LM head + cross-entropy alone, on a stand-in hidden state (a detached copy of the head)."""
    w = model.lm_head.weight.detach().clone().requires_grad_(True)
    hidden = torch.randn(batch, seq, w.shape[1]).to(w.device, w.dtype).requires_grad_(True)
    labels = torch.randint(0, w.shape[0], (batch * (seq - 1),), generator=torch.Generator().manual_seed(2))
    labels = labels.to(w.device)
    if isinstance(model, RevMoEForCausalLM):
        return lambda: chunked_cross_entropy(hidden[:, :-1].reshape(-1, w.shape[1]), w, labels,
                                             model.config.working_set(labels.numel())["loss_chunk_size"])
    # HF: full logits, upcast to float32 by the loss
    return lambda: torch.nn.functional.cross_entropy((hidden[:, :-1] @ w.t()).float().reshape(-1, w.shape[0]), labels)


def breakdown_child(model: str, scheme: str, batch: int, seq: int, optimizer: str, gradient_checkpointing: bool,
                    reversible_mode: str, moe_chunk_size: Optional[int], device: str = "cpu", weights: str = "fp32",
                    in_backward: bool = False) -> dict:
    """Runs in a fresh process (revengine.memory.measure_in_subprocess): one training step's breakdown."""
    cfg = convert.read_model_config(model)
    if cfg.get("model_type") == "revmoe":
        net = RevMoEForCausalLM.from_pretrained(model, reversible_mode=reversible_mode, moe_chunk_size=moe_chunk_size)
    else:
        net = convert.load_hf(model, dtype=torch.float32)
        if scheme != "none":
            net = convert.from_hf(net, scheme=scheme, reversible_mode=reversible_mode, moe_chunk_size=moe_chunk_size)
        elif gradient_checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.to(device).train()
    net.to(WEIGHT_DTYPES[weights])
    vocab = net.lm_head.weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    cls, kw = optimizer_class(optimizer, weights=weights)
    opt = (InBackwardOptimizer(net.parameters(), cls, lr=1e-6, **kw) if in_backward
           else create(cls, net.parameters(), lr=1e-6, **kw))
    r = memory.training_step_figures(net, opt, lambda: net(input_ids=ids, labels=ids, use_cache=False).loss,
                                     head_fn=_head_fn(net, batch, seq), device=device)
    return {k: v for k, v in r.items() if not k.startswith("figure")} | {"model_class": type(net).__name__}


def cmd_breakdown(args) -> int:
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    in_backward = args.in_backward or args.optimizer == "adamw-in-backward"  # its earlier spelling
    name = "adamw" if args.optimizer == "adamw-in-backward" else args.optimizer
    if needs_torchao(name, args.weights) and not torchao_available():
        what = f"--optimizer {args.optimizer}" if args.weights == "fp32" else "--weights bf16"
        print(f"revengine breakdown: error: {what} needs torchao, which is not installed: {TORCHAO_HINT}",
              file=sys.stderr)
        return 2
    try:
        r = measure_in_subprocess("revengine.apps.breakdown:breakdown_child", dict(
            model=args.model, scheme=args.scheme, batch=args.batch, seq=args.seq, optimizer=name,
            gradient_checkpointing=args.gradient_checkpointing, reversible_mode=args.reversible_mode,
            moe_chunk_size=args.moe_chunk_size, device=args.device, weights=args.weights, in_backward=in_backward),
            env=env, timeout=7200)
    except (RuntimeError, ValueError) as e:
        print(f"revengine breakdown: error: {e}", file=sys.stderr)
        return 2
    rows = [("weights", r["weights_mb"]), ("optimizer state", r["optimizer_state_mb"]),
            ("grads", r["grads_mb"] if not in_backward else 0.0),
            ("activations (layers)", r["activations_body_mb"]), ("logits (LM head + loss)", r["logits_mb"])]
    print(f"{r['model_class']}, {r['params'] / 1e6:.1f}M parameters, batch {args.batch} x seq {args.seq}, "
          f"{args.optimizer}{' in backward' if in_backward else ''}, {args.weights} weights, one training step on "
          f"{args.device} in a fresh process (MiB at the peak):")
    for name, v in rows:
        print(f"  {name:<26} {v:10.2f}")
    print(f"  {'steady-state peak':<26} {r['steady_peak_mb']:10.2f}")
    n = max(r["params"], 1)
    print(f"  bytes per parameter: weights {r['weights_bytes'] / n:.2f} + optimizer state "
          f"{r['optimizer_state_bytes'] / n:.2f} = {(r['weights_bytes'] + r['optimizer_state_bytes']) / n:.2f}")
    if in_backward:
        print("  (optimizer step inside backward: each grad is freed once its parameter is stepped)")
    return 0


def add_arguments(bd) -> None:
    bd.add_argument("--model", required=True, help="HF causal-LM checkpoint folder or a revengine model folder")
    bd.add_argument("--scheme", default="none", choices=BLOCK_TYPES + ("none",),
                    help="convert an HF MoE checkpoint first (default none: the model as it is)")
    bd.add_argument("--batch", type=int, default=8)
    bd.add_argument("--seq", type=int, default=1024)
    bd.add_argument("--optimizer", default="adamw", choices=OPTIMIZER_NAMES + ("adamw-in-backward",),
                    help="adamw (fp32 state), adamw8bit / adamw4bit (torchao); adamw-in-backward is "
                    "--optimizer adamw --in-backward")
    bd.add_argument("--weights", default="fp32", choices=tuple(WEIGHT_DTYPES),
                    help="fp32 or bf16 (updated with stochastic rounding, no fp32 copy)")
    bd.add_argument("--in-backward", action="store_true", help="the optimizer step inside backward")
    bd.add_argument("--gradient-checkpointing", action="store_true", help="HF gradient checkpointing (scheme none)")
    bd.add_argument("--reversible-mode", default="reversible", choices=MODES)
    bd.add_argument("--moe-chunk-size", type=int, default=None,
                    help="experts run in token chunks of this size (0: whole batch; default: chosen from the tokens)")
    bd.add_argument("--threads", type=int, default=None)
    bd.add_argument("--device", type=device_arg, default="cpu",
                    help="cpu (peak RSS) or cuda[:i] (peak allocated GPU memory); default cpu")
