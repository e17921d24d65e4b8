"""The training objective: the model's own loss (with a RevMoE's router losses) and the KL to a teacher."""
from __future__ import annotations

import contextlib

import torch

from .model import is_revmoe


def model_losses(model, batch, want_logits: bool):
    """(output, training objective, token cross-entropy). A RevMoE objective includes its router losses;
    given labels it returns logits only when asked (return_logits), which distillation needs."""
    rev = is_revmoe(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False, **({"return_logits": True} if want_logits and rev else {}))
    return out, out.loss, (out.lm_loss if rev else out.loss)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || p_student), in float32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def autocast(enabled: bool, device: torch.device):
    """bf16 autocast on `device` (--bf16), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
