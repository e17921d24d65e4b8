"""Two-stage fine-tuning of a converted MoE checkpoint (the RevFFN recipe), behind `revengine finetune`.

    revengine finetune --model DIR --data FILE.jsonl --scheme revffn --stage1-steps N --steps M --out DIR

--model is a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; a dense Llama with
--upcycle-experts), converted with `revengine.convert.from_hf(scheme=...)`, or a revengine model
directory (save_pretrained). `--scheme none` fine-tunes the HF model itself (the baseline, with
`--gradient-checkpointing` for HF's checkpointing).

Stage 1 (N optimizer steps) trains only the parameters the conversion added (RevFFN's adapters);
for schemes that reuse every weight it trains all of them, which with distillation is Gal et al.'s
KL recipe. The original model's logits are the teacher (`--distill stage1|all|none`). Stage 2 (M
steps) trains every parameter.

Data: one JSON object per line, {"text": ...} (every token is a target) or {"prompt": ...,
"answer": ...} (only the answer and the end token are targets; the eval split also reports greedy
exact-match accuracy). Tokenizer: the model directory's HF tokenizer if it has one, else UTF-8 bytes
(ids 0..255, 256 = end), which needs a vocabulary of at least 257.

--out receives checkpoints (checkpoints/step-NNNNNN: weights as safetensors, optimizer state, RNG
state, data position), log.jsonl (losses and evals) and, only when the run finishes, the model
(config.json last). `--resume` continues from the newest checkpoint and ends bit-identical to an
uninterrupted run. Ctrl-C finishes the current step, saves a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import memory as _memory
from . import convert
from .sequential import MODES
from revengine.models import BLOCK_TYPES as SCHEMES, FIXED_POINT_FALLBACKS, RevMoEForCausalLM, eval_mode
DISTILL = ("none", "stage1", "all")
IGNORE = -100
STATE_FILE = "trainer_state.json"


class FinetuneError(ValueError):
    """Bad input to `revengine finetune` (the message names the problem)."""


# ---------------------------------------------------------------------------------------------
# Arguments


@dataclass
class FinetuneArgs:
    model: str
    data: str
    out: str
    scheme: str = "revffn"
    stage1_steps: int = 0
    steps: int = 100
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    stage1_lr: Optional[float] = None
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    bf16: bool = False
    distill: str = "stage1"
    kl_weight: float = 1.0
    upcycle_experts: int = 0
    upcycle_top_k: int = 2
    reversible_mode: str = "reversible"
    gradient_checkpointing: bool = False
    moe_chunk_size: int = 0
    fixed_point_fallback: str = "store"
    bdia_gamma: Optional[float] = None  # None: RevMoEConfig's default
    seed: int = 0
    # bookkeeping (may change between a run and its --resume)
    resume: bool = False
    save_every: int = 50
    eval_every: int = 0
    eval_batch_size: int = 16
    eval_max_examples: int = 256
    keep_checkpoints: int = 2
    progress: bool = True
    threads: Optional[int] = None
    device: str = "cpu"
    stop_after: Optional[int] = None  # behave as if interrupted after this many steps of this run (tests)

    # Fields a --resume may change; every other field must match the checkpoint's.
    MUTABLE = ("resume", "save_every", "eval_every", "eval_batch_size", "eval_max_examples", "keep_checkpoints",
               "progress", "threads", "device", "stop_after")

    def validate(self) -> None:
        if self.scheme not in SCHEMES + ("none",):
            raise FinetuneError(f"--scheme must be one of {SCHEMES + ('none',)}, got {self.scheme!r}")
        if self.fixed_point_fallback not in FIXED_POINT_FALLBACKS:
            raise FinetuneError(f"--fixed-point-fallback must be one of {FIXED_POINT_FALLBACKS}, "
                                f"got {self.fixed_point_fallback!r}")
        if self.distill not in DISTILL:
            raise FinetuneError(f"--distill must be one of {DISTILL}, got {self.distill!r}")
        for name in ("stage1_steps", "steps", "warmup", "save_every", "eval_every", "upcycle_experts"):
            if getattr(self, name) < 0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stage1_steps + self.steps < 1:
            raise FinetuneError("nothing to do: --stage1-steps + --steps is 0")
        if not 0.0 < self.eval_fraction < 1.0 and self.eval_data is None:
            raise FinetuneError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if self.lr <= 0 or (self.stage1_lr is not None and self.stage1_lr <= 0):
            raise FinetuneError("learning rates must be > 0")
        if self.scheme == "none" and self.stage1_steps:
            raise FinetuneError("--scheme none fine-tunes the original model, which has no new parameters: "
                                "use --stage1-steps 0")
        if self.gradient_checkpointing and self.scheme != "none":
            raise FinetuneError("--gradient-checkpointing applies to --scheme none (HF's checkpointing); "
                                "converted models use --reversible-mode")
        try:
            _memory.check_device(self.device)
        except ValueError as e:
            raise FinetuneError(f"--device: {e}") from None
        if self.upcycle_experts and not 1 <= self.upcycle_top_k <= self.upcycle_experts:
            raise FinetuneError(f"--upcycle-top-k must be in [1, {self.upcycle_experts}], got {self.upcycle_top_k}")

    def identity(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.MUTABLE}


# ---------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a sequence (and pads)."""

    kind = "bytes"
    eos_token_id = 256
    pad_token_id = 256

    def __len__(self) -> int:
        return 257

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "revengine_tokenizer.json"), "w") as fh:
            json.dump({"type": "bytes", "eos_token_id": 256}, fh)


class HFTokenizer:
    """A transformers tokenizer, used without special tokens around the text (the end token is added)."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok
        if tok.eos_token_id is None:
            raise FinetuneError("the model's tokenizer has no end-of-sequence token")
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_token_id

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


def load_tokenizer(model_dir: str):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(model_dir))
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    ids: List[int]
    labels: List[int]
    prompt: Optional[List[int]] = None  # prompt/answer examples: the prompt ids and the answer text
    answer: Optional[str] = None


def read_jsonl(path: str) -> List[dict]:
    """The records of a jsonl file; malformed lines are errors naming the file and line number."""
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            ok = isinstance(rec, dict) and (
                isinstance(rec.get("text"), str) or (isinstance(rec.get("prompt"), str) and isinstance(rec.get("answer"), str)))
            if not ok:
                raise FinetuneError(f"{path}:{lineno}: expected an object with a string 'text', or string 'prompt' "
                                    f"and 'answer' fields, got {line.strip()[:80]!r}")
            records.append(rec)
    if not records:
        raise FinetuneError(f"{path}: no examples (the file is empty)")
    return records


def encode_records(records: List[dict], tok, max_length: int, vocab_size: int, where: str) -> List[Example]:
    out = []
    for i, rec in enumerate(records):
        if "text" in rec and not ("prompt" in rec and "answer" in rec):
            ids = tok.encode(rec["text"]) + [tok.eos_token_id]
            labels = list(ids)
            ex = Example(ids[:max_length], labels[:max_length])
        else:
            p, a = tok.encode(rec["prompt"]), tok.encode(rec["answer"]) + [tok.eos_token_id]
            if len(p) + 1 > max_length:
                raise FinetuneError(f"{where}: example {i + 1}: the prompt is {len(p)} tokens, more than "
                                    f"--max-length {max_length} allows")
            ids = (p + a)[:max_length]
            labels = ([IGNORE] * len(p) + a)[:max_length]
            ex = Example(ids, labels, prompt=p, answer=rec["answer"])
        if max(ex.ids) >= vocab_size:
            raise FinetuneError(f"vocabulary mismatch: {where} example {i + 1} has token id {max(ex.ids)}, but the "
                                f"model's vocabulary has {vocab_size} entries")
        out.append(ex)
    return out


def collate(examples: Sequence[Example], pad: int) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (padding is never a target)."""
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DataStream:
    """Batches in a seeded order, reshuffled each epoch; (epoch, position) is the whole state."""

    def __init__(self, examples: List[Example], batch_size: int, seed: int, pad: int):
        if len(examples) < batch_size:
            raise FinetuneError(f"the training split has {len(examples)} examples, fewer than --batch-size {batch_size}")
        self.examples, self.batch_size, self.seed, self.pad = examples, batch_size, seed, pad
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> Dict[str, torch.Tensor]:
        if self.pos + self.batch_size > len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return collate([self.examples[i] for i in idx], self.pad)

    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: Dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


def arithmetic_records(n: int, digits: int = 2, seed: int = 0, ops: str = "+-") -> List[dict]:
    """Generated prompt/answer arithmetic, e.g. {"prompt": "Q: 37+58=", "answer": "95"}."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    out, seen = [], set()
    while len(out) < n:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        if (a, b, op) in seen and len(seen) < (hi - lo + 1) ** 2 * len(ops):
            continue
        seen.add((a, b, op))
        out.append({"prompt": f"Q: {a}{op}{b}=", "answer": str(a + b if op == "+" else a - b)})
    return out


def write_jsonl(records: List[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------------
# Models


def _safetensors_shapes(model_dir: str) -> Dict[str, Tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


def load_source(args: FinetuneArgs):
    """(source HF model or None, student model, kind) where kind is 'revmoe' or 'hf'."""
    try:
        cfg = convert.read_model_config(args.model)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    mtype = cfg.get("model_type")
    if mtype == "revmoe":
        if args.scheme not in ("none", cfg.get("block_type")):
            raise FinetuneError(f"{args.model} is a revengine model with block_type {cfg.get('block_type')!r}; "
                                f"--scheme {args.scheme} would need the original HF checkpoint")
        if args.stage1_steps:
            raise FinetuneError(f"{args.model} is already converted: stage 1 needs the original HF model; "
                                "use --stage1-steps 0")
        try:
            student = RevMoEForCausalLM.from_pretrained(args.model, reversible_mode=args.reversible_mode,
                                                        moe_chunk_size=args.moe_chunk_size,
                                                        fixed_point_fallback=args.fixed_point_fallback)
        except ValueError as e:
            raise FinetuneError(str(e)) from None
        return None, student, "revmoe"
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


def vocab_size_of(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0]) if hasattr(model, "get_input_embeddings") \
        else int(model.config.vocab_size)


def new_parameters(student, source) -> List[nn.Parameter]:
    """Parameters the conversion added (no pretrained counterpart), in module order."""
    return convert.new_parameters(student) if source is not None else []


def _forward(model, batch, want_logits: bool):
    """(output, training objective, token cross-entropy). A RevMoE objective includes its router losses."""
    rev = _is_revmoe(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False, **({"return_logits": True} if want_logits and rev else {}))
    return out, out.loss, (out.lm_loss if rev else out.loss)


def _is_revmoe(model) -> bool:
    return isinstance(model, RevMoEForCausalLM)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || p_student), in float32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _device_of(model) -> torch.device:
    """Where the model's tensors are (the CPU for a model without any)."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def _on(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def greedy_continue(model, prompts: List[List[int]], max_new: int, pad: int, eos: int, batch: int = 16,
                    bf16: bool = False) -> List[List[int]]:
    """Greedy continuations of left-padded prompts (no cache, explicit positions: any causal LM)."""
    outs: List[List[int]] = []
    dev = _device_of(model)
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        n = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk], device=dev)
        new = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            with _autocast(bf16, dev):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                               logits_to_keep=1).logits[:, -1]
            nxt = logits.float().argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        new[i].append(t)
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        outs.extend(new)
    return outs


@torch.no_grad()
def evaluate(model, examples: List[Example], tok, batch_size: int = 16, max_examples: int = 256,
             bf16: bool = False) -> Dict[str, Any]:
    """Held-out token loss (answer tokens for prompt/answer data) and greedy exact-match accuracy."""
    dev = _device_of(model)
    with eval_mode(model):
        total, count = 0.0, 0
        for s in range(0, len(examples), batch_size):
            batch = _on(collate(examples[s:s + batch_size], tok.pad_token_id), dev)
            with _autocast(bf16, dev):
                _, _, loss = _forward(model, batch, want_logits=False)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(loss) * n
            count += n
        res: Dict[str, Any] = {"loss": total / max(count, 1), "tokens": count}
        qa = [e for e in examples if e.prompt is not None][:max_examples]
        if qa:
            max_new = max(len(tok.encode(e.answer)) for e in qa) + 1
            gen = greedy_continue(model, [e.prompt for e in qa], max_new, tok.pad_token_id, tok.eos_token_id,
                                  batch_size, bf16)
            hits = sum(tok.decode(g).strip() == e.answer.strip() for g, e in zip(gen, qa))
            res.update(exact_match=hits / len(qa), exact_match_n=len(qa))
        return res


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_dir(final: str):
    """A temporary sibling directory that replaces `final` on success (and vanishes on failure)."""
    parent = os.path.dirname(os.path.abspath(final))
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide checkpoints from the rest of a team

    @contextlib.contextmanager
    def ctx():
        try:
            yield tmp
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return ctx()


def checkpoint_dirs(out: str) -> List[str]:
    return sorted(d for d in glob.glob(os.path.join(out, "checkpoints", "step-*")) if os.path.isfile(os.path.join(d, STATE_FILE)))


def save_checkpoint(out: str, step: int, student, optimizer, state: Dict[str, Any], keep: int) -> str:
    from safetensors.torch import save_model

    final = os.path.join(out, "checkpoints", f"step-{step:06d}")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with _atomic_dir(final) as tmp:
        save_model(student, os.path.join(tmp, "model.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        rng = {"torch": torch.get_rng_state()}
        dev = _device_of(student)
        if dev.type == "cuda":  # dropout and bdia's signs draw from the GPU's generator
            rng["cuda"] = torch.cuda.get_rng_state(dev)
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w") as fh:
            json.dump(state, fh, indent=1)  # written last: its presence marks a complete checkpoint
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_weights(student, path: str) -> None:
    from safetensors.torch import load_model

    weights = os.path.join(path, "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    found = _safetensors_shapes(path)
    bad = [f"{k}: checkpoint {found[k]} vs model {expected.get(k)}" for k in found if expected.get(k) != found[k]]
    if bad:
        raise FinetuneError(f"{path}: checkpoint of another shape ({len(bad)} tensors): " + "; ".join(bad[:4]))
    load_model(student, weights, strict=False)


def _reset_peaks(device: torch.device) -> None:
    """Stage 2's peak memory starts here: RSS (and on a GPU, its peak allocated memory)."""
    _memory.malloc_trim()
    _memory.reset_peak_rss()
    if device.type == "cuda":
        _memory.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# The run


class _Interrupt:
    """First Ctrl-C: finish the step, save, exit. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.requested = True
            print("\nrevengine finetune: interrupted; finishing this step and saving a checkpoint "
                  "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._prev = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


def _prepare_out(args: FinetuneArgs) -> Optional[str]:
    """Checks --out against --resume; returns the checkpoint to resume from (or None)."""
    out = args.out
    if os.path.isfile(out):
        raise FinetuneError(f"--out {out} is a file")
    if args.resume:
        ckpts = checkpoint_dirs(out) if os.path.isdir(out) else []
        if not ckpts:
            raise FinetuneError(f"--resume: no checkpoint in {out}/checkpoints")
        return ckpts[-1]
    if os.path.isdir(out) and os.listdir(out):
        what = "a finished model" if os.path.isfile(os.path.join(out, "config.json")) else "files"
        raise FinetuneError(f"--out {out} already holds {what}; choose an empty directory "
                            "(or pass --resume to continue its checkpoints)")
    return None


def run(args: FinetuneArgs) -> Dict[str, Any]:
    """Runs (or resumes) a fine-tuning; returns a summary dict (status 'finished' or 'interrupted')."""
    args.validate()
    resume_from = _prepare_out(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(args.seed)
    # --- everything that can be wrong with the input is checked before --out is written ---
    tok = load_tokenizer(args.model)
    source, student, kind = load_source(args)
    vocab = vocab_size_of(student)
    if len(tok) > vocab:
        raise FinetuneError(f"vocabulary mismatch: the tokenizer has {len(tok)} tokens but the model's embedding "
                            f"has {vocab} rows" + (" (byte-level data needs >= 257)" if tok.kind == "bytes" else ""))
    records = read_jsonl(args.data)
    if args.eval_data is not None:
        train_recs, eval_recs = records, read_jsonl(args.eval_data)
    else:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, int(round(len(records) * args.eval_fraction)))
        if len(records) - n_eval < 1:
            raise FinetuneError(f"{args.data}: {len(records)} examples are too few to hold out an eval split")
        eval_recs = [records[i] for i in order[:n_eval]]
        train_recs = [records[i] for i in order[n_eval:]]
    train = encode_records(train_recs, tok, args.max_length, vocab, args.data)
    evals = encode_records(eval_recs, tok, args.max_length, vocab, args.eval_data or args.data)
    stream = DataStream(train, args.batch_size, args.seed, tok.pad_token_id)

    new = new_parameters(student, source)
    stage1_params = new if new else [p for p in student.parameters()]
    stage1_what = f"{sum(p.numel() for p in new)} new parameters" if new else "all parameters (no new ones)"
    teacher = source if (source is not None and args.distill != "none") else None
    source = None  # the teacher keeps it alive when distilling
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    total = args.stage1_steps + args.steps

    state: Dict[str, Any] = {"step": 0, "args": args.identity(), "evals": {}, "data": stream.state(), "timings": {}}
    if resume_from is not None:
        with open(os.path.join(resume_from, STATE_FILE)) as fh:
            state = json.load(fh)
        diff = {k: (state["args"].get(k), v) for k, v in args.identity().items() if state["args"].get(k) != v}
        if diff:
            raise FinetuneError(f"--resume: these settings differ from the checkpoint's (was, now): {diff}")
        load_checkpoint_weights(student, resume_from)
        stream.load(state["data"])
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    _truncate_log(log_path, state["step"])

    def log(rec):
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def stage_of(step):  # the stage the step with this 1-based index belongs to
        return 1 if step <= args.stage1_steps else 2

    def make_optimizer(stage):
        params = stage1_params if stage == 1 else list(student.parameters())
        for p in student.parameters():
            p.requires_grad_(stage == 2)
        for p in params:
            p.requires_grad_(True)
        lr = (args.stage1_lr or args.lr) if stage == 1 else args.lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay), lr

    def run_eval(name, model=None):
        if name in state["evals"]:
            return
        res = evaluate(model if model is not None else student, evals, tok, args.eval_batch_size, args.eval_max_examples, args.bf16)
        state["evals"][name] = res
        log({"step": state["step"], "eval": name, **res})
        msg = f"eval [{name}] step {state['step']}: loss {res['loss']:.4f}"
        if "exact_match" in res:
            msg += f", exact match {res['exact_match']:.3f} ({res['exact_match_n']} examples)"
        print(msg, flush=True)

    step = state["step"]
    if step == 0:
        if teacher is not None:
            run_eval("original", teacher)
        run_eval("start")

    stage = stage_of(step + 1) if step < total else 2
    optimizer, base_lr = make_optimizer(stage)
    if resume_from is not None and step < total and stage_of(step) == stage and step > 0:
        # loaded to the CPU first: Optimizer.load_state_dict moves the state to its parameters' device
        optimizer.load_state_dict(torch.load(os.path.join(resume_from, "optimizer.pt"), map_location="cpu",
                                             weights_only=True))
    if resume_from is not None:
        rng = torch.load(os.path.join(resume_from, "rng.pt"), map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if on_gpu and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    if stage == 2 and teacher is not None and args.distill != "all":
        teacher = None
    print(f"revengine finetune: {type(student).__name__} ({kind}, scheme {args.scheme}) on {device}, "
          f"{sum(p.numel() for p in student.parameters())} parameters; stage 1 trains {stage1_what}; "
          f"{len(train)} train / {len(evals)} eval examples; steps {step}/{total}", flush=True)

    try:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, disable=not args.progress, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    status, ran, step_times = "finished", 0, []
    if stage == 2:
        _reset_peaks(device)
    student.train()
    with _Interrupt() as intr:
        while step < total:
            if stage_of(step + 1) != stage:  # stage 1 -> 2
                stage = 2
                if args.distill != "all":
                    teacher = None
                del optimizer
                optimizer, base_lr = make_optimizer(2)
                _reset_peaks(device)
            t0 = time.perf_counter()
            in_stage = step - (0 if stage == 1 else args.stage1_steps)
            lr = base_lr * min(1.0, (in_stage + 1) / args.warmup) if args.warmup else base_lr
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = kl_sum = 0.0
            for _ in range(args.grad_accum):
                batch = _on(stream.next(), device)
                with _autocast(args.bf16, device):
                    out, objective, ce = _forward(student, batch, want_logits=teacher is not None)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                               use_cache=False).logits
                        kl = token_kl(t_logits, out.logits, batch["attention_mask"])
                        objective = objective + args.kl_weight * kl
                        kl_sum += float(kl.detach())
                if not torch.isfinite(objective):
                    raise FloatingPointError(f"step {step + 1}: the loss is {float(objective)}; stopping "
                                             "(nothing finished is written; the last checkpoint stays)")
                (objective / args.grad_accum).backward()
                loss_sum += float(ce.detach())
            if args.max_grad_norm > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], args.max_grad_norm))
            else:
                gnorm = float("nan")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _memory.synchronize(device)  # the step's queued GPU work belongs to its time
            step += 1
            ran += 1
            dt = time.perf_counter() - t0
            if stage == 2:
                step_times.append(dt)
            rec = {"step": step, "stage": stage, "loss": loss_sum / args.grad_accum, "lr": lr, "grad_norm": gnorm,
                   "time_s": dt}
            if teacher is not None:
                rec["kl"] = kl_sum / args.grad_accum
            log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{rec['loss']:.4f}")
            state["step"], state["data"] = step, stream.state()
            if step == args.stage1_steps:
                run_eval("stage1")
            elif args.eval_every and step % args.eval_every == 0 and step < total:
                run_eval(f"step{step}")
            stop = intr.requested or (args.stop_after is not None and ran >= args.stop_after and step < total)
            if stop or (args.save_every and step % args.save_every == 0) or step == args.stage1_steps or step == total:
                save_checkpoint(args.out, step, student, optimizer, state, args.keep_checkpoints)
            if stop:
                status = "interrupted"
                break
    if bar is not None:
        bar.close()
    summary: Dict[str, Any] = {"status": status, "step": step, "total_steps": total, "out": args.out}
    if status == "interrupted":
        print(f"revengine finetune: stopped at step {step}/{total}; checkpoint saved in "
              f"{checkpoint_dirs(args.out)[-1]}; continue with --resume", flush=True)
        return summary
    if stage == 2 and step_times:
        hwm = _memory.proc_status_kb("VmHWM")
        state["timings"] = {"stage2_peak_rss_mb": hwm["VmHWM"] / 1024.0 if hwm else None,
                            "stage2_median_step_s": sorted(step_times)[len(step_times) // 2]}
        if on_gpu:
            state["timings"]["stage2_peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    run_eval("final")
    if _is_revmoe(student) and student.fixed_point_report():
        rep = student.fixed_point_report()
        state["fixed_point"] = {"layers": len(rep), "stored": sum(bool(r.get("stored")) for r in rep),
                                "max_iterations": max(int(r.get("iterations") or 0) for r in rep)}
        print(f"revffn fixed point: {state['fixed_point']['stored']}/{len(rep)} layers stored their input in the "
              f"last step (the rest inverted in <= {state['fixed_point']['max_iterations']} iterations)", flush=True)
    _save_final(args, student, tok, state, kind)
    summary.update(evals=state["evals"], timings=state["timings"])
    return summary


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines past the checkpoint (they will be written again)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
    with open(path, "w") as fh:
        fh.writelines(keep)


def _save_final(args: FinetuneArgs, student, tok, state, kind: str) -> None:
    """The finished model, written to a temporary folder and moved into --out; config.json last."""
    tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=args.out)
    os.chmod(tmp, 0o755)
    try:
        student.save_pretrained(tmp)
        tok.save(tmp)
        with open(os.path.join(tmp, "eval.json"), "w") as fh:
            json.dump({k: state.get(k) for k in ("evals", "timings", "fixed_point", "args")}, fh, indent=1)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for n in names:
            dst = os.path.join(args.out, n)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, n), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# CLI


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
    a("--max-grad-norm", type=float, default=1.0, help="global grad-norm clipping (0: off)")
    a("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    a("--bf16", action="store_true", help="bf16 autocast (weights, grads and optimizer state stay fp32)")
    a("--distill", default="stage1", choices=DISTILL, help="add KL(original || model) to the loss (default stage1)")
    a("--kl-weight", type=float, default=1.0)
    a("--upcycle-experts", type=int, default=0, help="turn a dense Llama into an MoE with E experts first")
    a("--upcycle-top-k", type=int, default=2)
    a("--reversible-mode", default="reversible", choices=MODES)
    a("--gradient-checkpointing", action="store_true", help="HF gradient checkpointing (with --scheme none)")
    a("--moe-chunk-size", type=int, default=0, help="experts run in token chunks of this size (0: whole batch)")
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
