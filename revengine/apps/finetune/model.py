"""The models of a run: the student (converted, or the HF model itself) and its source (the teacher)."""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import nn

from revengine import convert
from revengine.models import RevMoEForCausalLM
from revengine.optim import WEIGHT_DTYPES

from .args import FinetuneArgs, FinetuneError


def store_dir(args: FinetuneArgs) -> str:
    """The folder of --offload disk's layer store."""
    return args.offload_dir or os.path.join(args.out, "offload")


def why_not_streamed(args: FinetuneArgs) -> Optional[str]:
    """None when the run converts the HF checkpoint straight into the layer store, one decoder layer at
    a time, and never holds the whole model (--offload disk on the CPU from an HF MoE folder); else what
    needs the whole model in memory."""
    if args.offload != "disk":
        return "no --offload disk"
    reasons = [(args.upcycle_experts, "--upcycle-experts builds the MoE from the whole dense model"),
               (args.stage1_steps, "stage 1 (--stage1-steps) trains in memory"),
               (args.distill == "all", "--distill all keeps the original model as the teacher"),
               (args.scheme == "revffn", "--scheme revffn initialises its adapters from the whole model"),
               (not args.device.startswith("cpu"), "the disk tier keeps the layers of a CPU run")]
    for cond, why in reasons:
        if cond:
            return why
    try:
        mtype = convert.read_model_config(args.model).get("model_type")
    except ValueError:
        return "no config.json"
    return None if mtype in convert.FAMILIES else f"{args.model} is not an HF MoE checkpoint ({mtype})"


def streams(args: FinetuneArgs) -> bool:
    return why_not_streamed(args) is None


def load_source(args: FinetuneArgs, resuming: bool = False):
    """(source HF model or None, student model, kind) where kind is 'revmoe' or 'hf'. When `streams(args)`,
    the student's decoder layers live in the store (built now, or on a resume opened later) and there is
    no source."""
    try:
        cfg = convert.read_model_config(args.model)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    if streams(args):
        return None, _stream(args, build=not resuming), "revmoe"
    mtype = cfg.get("model_type")
    if mtype == "revmoe":
        return None, _load_revmoe(args, cfg), "revmoe"
    supported = tuple(convert.FAMILIES) + (("llama",) if args.upcycle_experts else ())
    if mtype not in supported:
        hint = " (a dense Llama needs --upcycle-experts E)" if mtype == "llama" else ""
        raise FinetuneError(f"{args.model}: unsupported architecture model_type={mtype!r}{hint}; supported: "
                            f"{', '.join(convert.FAMILIES)}, llama with --upcycle-experts, or a revengine model")
    if args.upcycle_experts and mtype != "llama":
        raise FinetuneError(f"--upcycle-experts turns a dense Llama into an MoE; {args.model} is already {mtype!r}")
    try:
        source = convert.load_hf(args.model, dtype=torch.float32)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    if args.upcycle_experts:
        source = convert.upcycle(source, args.upcycle_experts, args.upcycle_top_k,
                                 generator=torch.Generator().manual_seed(args.seed))
    source.eval()
    if args.scheme == "none":
        student = source
        if args.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return None, student, "hf"
    try:
        extra = {} if args.bdia_gamma is None or args.scheme != "bdia" else {"bdia_gamma": args.bdia_gamma}
        student = convert.from_hf(source, scheme=args.scheme, reversible_mode=args.reversible_mode,
                                  moe_chunk_size=args.moe_chunk_size, fixed_point_fallback=args.fixed_point_fallback,
                                  **extra)
    except ValueError as e:
        raise FinetuneError(f"{args.model}: cannot convert: {e}") from None
    for p in source.parameters():
        p.requires_grad_(False)
    return source, student, "revmoe"


def _stream(args: FinetuneArgs, build: bool) -> RevMoEForCausalLM:
    from revengine.offload import LayerStore, OffloadError

    directory = store_dir(args)
    if build:
        LayerStore.remove(directory)  # an earlier run's store: this one starts from the checkpoint
    try:
        extra = {} if args.bdia_gamma is None or args.scheme != "bdia" else {"bdia_gamma": args.bdia_gamma}
        return convert.stream_from_hf(args.model, directory, scheme=args.scheme, reversible_mode=args.reversible_mode,
                                      dtype=WEIGHT_DTYPES[args.weights], build=build, moe_chunk_size=args.moe_chunk_size,
                                      fixed_point_fallback=args.fixed_point_fallback, **extra)
    except OffloadError as e:
        raise FinetuneError(str(e)) from None
    except ValueError as e:
        raise FinetuneError(f"{args.model}: cannot convert: {e}") from None


def _load_revmoe(args: FinetuneArgs, cfg: dict) -> RevMoEForCausalLM:
    """A revengine model directory: fine-tuned as it is (there is no original to distill from)."""
    if args.scheme not in ("none", cfg.get("block_type")):
        raise FinetuneError(f"{args.model} is a revengine model with block_type {cfg.get('block_type')!r}; "
                            f"--scheme {args.scheme} would need the original HF checkpoint")
    if args.stage1_steps:
        raise FinetuneError(f"{args.model} is already converted: stage 1 needs the original HF model; "
                            "use --stage1-steps 0")
    try:
        return RevMoEForCausalLM.from_pretrained(args.model, reversible_mode=args.reversible_mode,
                                                 moe_chunk_size=args.moe_chunk_size,
                                                 fixed_point_fallback=args.fixed_point_fallback)
    except ValueError as e:
        raise FinetuneError(str(e)) from None


def vocab_size_of(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0]) if hasattr(model, "get_input_embeddings") \
        else int(model.config.vocab_size)


def new_parameters(student, source) -> List[nn.Parameter]:
    """Parameters the conversion added (no pretrained counterpart), in module order."""
    return convert.new_parameters(student) if source is not None else []


def is_revmoe(model) -> bool:
    return isinstance(model, RevMoEForCausalLM)


def device_of(model) -> torch.device:
    """Where the model's tensors are (the CPU for a model without any)."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")
