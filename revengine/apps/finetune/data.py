"""Tokenizers, jsonl data, and the batches the recipe trains and evaluates on."""
from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .args import FinetuneArgs, FinetuneError

IGNORE = -100  # the label of a position that is no target (cross_entropy's ignore_index)


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
    """The model directory's HF tokenizer if it has one, else the byte tokenizer."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(model_dir))
    return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Records and examples


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
    with open(path, "rb") as fb:
        raw = fb.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise FinetuneError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records = []
    # the bytes read once, as open(path, encoding="utf-8") would read them (the same line ends)
    with io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8") as fh:
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
            if "prompt" in rec and "answer" in rec and not rec["prompt"]:
                # nothing for the answer to follow: greedy exact match has no context to continue
                raise FinetuneError(f"{path}:{lineno}: empty 'prompt'")
            records.append(rec)
    if not records:
        raise FinetuneError(f"{path}: no examples (the file is empty)")
    return records


def write_jsonl(records: List[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


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


def encode_records(records: List[dict], tok, max_length: int, vocab_size: int, where: str) -> List[Example]:
    """Token ids and labels: every token of a "text" record, the answer and end token of a prompt/answer one."""
    out = []
    for i, rec in enumerate(records):
        if "text" in rec and not ("prompt" in rec and "answer" in rec):
            ids = tok.encode(rec["text"]) + [tok.eos_token_id]
            labels = list(ids)
            ex = Example(ids[:max_length], labels[:max_length])
        else:
            p, a = tok.encode(rec["prompt"]), tok.encode(rec["answer"]) + [tok.eos_token_id]
            if not p:
                raise FinetuneError(f"{where}: example {i + 1}: the prompt encodes to no tokens")
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


def load_splits(args: FinetuneArgs, tok, vocab_size: int) -> Tuple[List[Example], List[Example]]:
    """(train, eval) examples: --eval-data, or a seeded --eval-fraction held out of --data."""
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
    train = encode_records(train_recs, tok, args.max_length, vocab_size, args.data)
    evals = encode_records(eval_recs, tok, args.max_length, vocab_size, args.eval_data or args.data)
    # without a target the loss is the router's alone (training) or 0/0 (eval): no run to speak of
    for split, exs, where in (("training", train, args.data), ("eval", evals, args.eval_data or args.data)):
        if not any(lab != IGNORE for e in exs for lab in e.labels[1:]):
            raise FinetuneError(f"{where}: the {split} split has no target tokens (every text is empty)")
    return train, evals


# ---------------------------------------------------------------------------------------------
# Batches


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


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
