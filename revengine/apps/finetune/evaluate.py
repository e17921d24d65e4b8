"""Held-out evaluation: token loss and greedy exact match."""
from __future__ import annotations

import inspect
from typing import Any, Dict, List

import torch

from revengine.models import eval_mode

from .data import IGNORE, Example, collate, to_device
from .loss import autocast, model_losses
from .model import device_of


@torch.no_grad()
def greedy_continue(model, prompts: List[List[int]], max_new: int, pad: int, eos: int, batch: int = 16,
                    bf16: bool = False) -> List[List[int]]:
    """Greedy continuations of left-padded prompts, with explicit positions and the model's key/value
    cache (HF models and revengine's alike), so each new token costs one position, not the prefix."""
    outs: List[List[int]] = []
    dev = device_of(model)
    # transformers 5 renames the cache argument (and output) from past_key_values to cache
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        n = max(len(p) for p in chunk)
        step_in = torch.tensor([[pad] * (n - len(p)) + p for p in chunk], device=dev)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk], device=dev)
        cache = None
        new = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_in.shape[1]:]
            with autocast(bf16, dev):
                out = model(input_ids=step_in, attention_mask=mask, position_ids=pos, use_cache=True,
                            logits_to_keep=1, **{cache_name: cache})
            cache = getattr(out, cache_name)
            nxt = out.logits[:, -1].float().argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        new[i].append(t)
            if all(done):
                break
            step_in = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        outs.extend(new)
    return outs


@torch.no_grad()
def evaluate(model, examples: List[Example], tok, batch_size: int = 16, max_examples: int = 256,
             bf16: bool = False) -> Dict[str, Any]:
    """Held-out token loss (answer tokens for prompt/answer data) and greedy exact-match accuracy."""
    dev = device_of(model)
    with eval_mode(model):
        total, count = 0.0, 0
        for s in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[s:s + batch_size], tok.pad_token_id), dev)
            with autocast(bf16, dev):
                _, _, loss = model_losses(model, batch, want_logits=False)
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
