"""MoE routing kernels (CPU; C++ ops in csrc/moe_ops.cpp) and a SwiGLU expert MLP built on them.

Layout: T tokens, each routed to k experts. The T*k (token, choice) pairs are "slots",
slot s = t*k + j. `permute` sorts the slots by expert (stable counting sort); rows of the
expert-sorted activations are then contiguous per expert, so every expert is one matmul on a
slice (`grouped_mm`), and `scatter_combine` sums the k expert outputs of each token weighted by
its routing weights.

    sorted_slots, offsets = moe.permute(topk_ids, num_experts)   # [T*k], [E+1]
    xs = moe.gather(x, sorted_slots, k)                           # [T*k, H]
    ys = moe.grouped_mm(xs, weight, offsets)                      # [T*k, M], weight [E, M, K=H]
    out = moe.scatter_combine(ys, topk_weights, sorted_slots)     # [T, M]

Every op is a torch op (torch.ops.revengine.moe_*) with CPU and Meta kernels and autograd
(differentiable twice): x, weight, ys and topk_weights get gradients; indices do not.
`moe_forward` is the Hugging Face fused-experts MLP (gate_up_proj [E, 2I, H], down_proj [E, H, I],
h = act(gate) * up) with these kernels; `moe_forward_reference` is the same computation as a
plain Python loop over experts (the reference for tests and benchmarks).
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _ext  # noqa: F401  (loads the C++ extension, which registers the ops)

__all__ = [
    "permute",
    "gather",
    "grouped_mm",
    "scatter_combine",
    "moe_forward",
    "moe_forward_reference",
]

_ops = torch.ops.revengine


def permute(topk_ids: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] (int64/int32/int16, values in [0, num_experts)) -> (sorted_slots int64 [T*k],
    expert_offsets int64 [E+1]): the slots t*k+j ordered by expert, ascending within an expert;
    expert e owns sorted rows [offsets[e], offsets[e+1])."""
    return _ops.moe_permute(topk_ids, int(num_experts))


def gather(x: torch.Tensor, sorted_slots: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, H] -> [T*k, H] with row i = x[sorted_slots[i] // k]."""
    return _ops.moe_gather(x, sorted_slots, int(k))


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """x [N, K] (rows grouped by expert), weight [E, M, K] -> [N, M]; rows of expert e are
    x[rows] @ weight[e].T (the nn.Linear / HF layout)."""
    return _ops.moe_grouped_mm(x, weight, expert_offsets)


def scatter_combine(
    y: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor, num_tokens: Optional[int] = None
) -> torch.Tensor:
    """y [T*k, H] in expert-sorted order, weights [T, k] -> [T, H],
    out[t] = sum_j weights[t, j] * y[position of slot t*k+j] (sums in float for bfloat16/float16)."""
    if num_tokens is None:
        num_tokens = weights.shape[0]
    return _ops.moe_scatter_combine(y, weights, sorted_slots, int(num_tokens))


def _flatten(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
    if x.dim() < 1 or topk_ids.dim() < 1:
        raise ValueError(f"moe_forward: x must be [..., H] and topk_ids [..., k], got {tuple(x.shape)} and {tuple(topk_ids.shape)}")
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"moe_forward: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must have the same shape"
        )
    if topk_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"moe_forward: x {tuple(x.shape)} and topk_ids {tuple(topk_ids.shape)} must have the same leading (token) dims"
        )
    H, k = x.shape[-1], topk_ids.shape[-1]
    return x.reshape(-1, H), topk_ids.reshape(-1, k), topk_weights.reshape(-1, k)


def _check_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> Tuple[int, int]:
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            f"moe_forward: gate_up_proj must be [E, 2I, H] and down_proj [E, H, I], got "
            f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    E, two_i, H = gate_up_proj.shape
    if two_i % 2 or down_proj.shape != (E, H, two_i // 2) or x.shape[-1] != H:
        raise ValueError(
            f"moe_forward: shapes do not agree: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)} "
            f"(expected [E, 2I, H]), down_proj {tuple(down_proj.shape)} (expected [E, H, I])"
        )
    return E, two_i // 2


def moe_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Routed SwiGLU experts with the kernels: x [..., H], topk_ids / topk_weights [..., k],
    gate_up_proj [E, 2I, H] (rows [0, I) gate, [I, 2I) up), down_proj [E, H, I] -> [..., H]:
    out[t] = sum_j topk_weights[t, j] * down[e] @ (act(gate[e] @ x[t]) * (up[e] @ x[t])), e = topk_ids[t, j]."""
    E, _ = _check_experts(x, gate_up_proj, down_proj)
    shape = x.shape
    x2, ids, w = _flatten(x, topk_ids, topk_weights)
    T, k = ids.shape
    sorted_slots, offsets = permute(ids, E)
    xs = gather(x2, sorted_slots, k)
    gate, up = grouped_mm(xs, gate_up_proj, offsets).chunk(2, dim=-1)  # chunk: its backward is one cat
    h = act(gate) * up
    ys = grouped_mm(h, down_proj, offsets)
    return scatter_combine(ys, w, sorted_slots, T).reshape(shape)


def moe_forward_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """moe_forward as a plain Python loop over the experts that received tokens (as the Hugging Face
    eager experts do): index, two matmuls, index_add of the weighted outputs."""
    E, _ = _check_experts(x, gate_up_proj, down_proj)
    shape = x.shape
    x2, ids, w = _flatten(x, topk_ids, topk_weights)
    out = torch.zeros_like(x2)
    for e in range(E):
        tok, j = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gate, up = (x2[tok] @ gate_up_proj[e].t()).chunk(2, dim=-1)
        h = act(gate) * up
        y = (h @ down_proj[e].t()) * w[tok, j, None].to(x2.dtype)
        out = out.index_add(0, tok, y)
    return out.reshape(shape)
