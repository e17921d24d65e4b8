"""The pretrained sub-blocks as increments of a reversible layer.

A(x) = attention(RMSNorm(x)) and M(x) = MoE(RMSNorm(x)) hold the Hugging Face decoder layer's
tensors under the same names (input_layernorm, self_attn / post_attention_layernorm, mlp), so a
converted checkpoint's keys map one to one; f(p) = A(p) + M(p + A(p)) is the whole pre-norm block.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import RevMoEConfig
from .layers import Attention, RMSNorm, SparseMoE

Tensor = torch.Tensor


def attention_call(config: RevMoEConfig, fn, x: Tensor, *args, **ctx) -> Tensor:
    """fn(x, *args, **ctx); with attention recompute (RevMoEConfig.working_set of x's batch x sequence
    tokens) and grad on (no KV cache), checkpointed so only its inputs are kept. No randomness inside
    (no attention dropout): no RNG replay needed."""
    recompute = config.working_set(x.numel() // max(x.shape[-1], 1))["attention_recompute"]
    args = (x,) + args
    if recompute and torch.is_grad_enabled() and ctx.get("cache") is None:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **ctx)
    return fn(*args, **ctx)


class AttnBranch(nn.Module):
    """A(x) = attention(RMSNorm(x)): the pre-norm attention increment."""

    def __init__(self, config: RevMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.config = config

    def attend(self, x: Tensor, **ctx) -> Tensor:
        return self.self_attn(self.input_layernorm(x), **ctx)

    def forward(self, x: Tensor, **ctx) -> Tensor:
        return attention_call(self.config, self.attend, x, **ctx)


class MoEBranch(nn.Module):
    """M(x) = MoE(RMSNorm(x)): the pre-norm MoE increment."""

    def __init__(self, config: RevMoEConfig):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config)

    def forward(self, x: Tensor, **ctx) -> Tensor:
        return self.mlp(self.post_attention_layernorm(x), **ctx)


class BlockIncrement(nn.Module):
    """f(p) = A(p) + M(p + A(p)): the unchanged pre-norm block, as an increment (Gal et al.)."""

    def __init__(self, config: RevMoEConfig, layer_idx: int):
        super().__init__()
        self.attn = AttnBranch(config, layer_idx)
        self.moe = MoEBranch(config)

    def forward(self, p: Tensor, **ctx) -> Tensor:
        a = self.attn(p, **ctx)
        return a + self.moe(p + a, **ctx)
