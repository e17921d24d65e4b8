"""Building blocks of the reversible MoE transformer: RMSNorm, RoPE attention (GQA, causal and
padding masks, KV cache), SwiGLU experts with a top-k router, a shared expert, and the aux losses.

Every module takes (x, **ctx) where ctx carries `position_embeddings=(cos, sin)`,
`attention_mask` (None: causal over real tokens only; a key mask [B, S_k], True = a real token; or
an explicit boolean [B, 1, S_q, S_k], True = attend: see causal_attention), `token_mask` ([B, S]
float, 1 for real tokens; used by the aux losses) and, during generation, `cache` (a KVCache). The same modules run
inside revengine.Sequential in every mode.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from revengine import moe, optim, side

from .config import RevMoEConfig

Tensor = torch.Tensor


class _StreamedLookup(torch.autograd.Function):
    """An embedding lookup whose weight an offload store keeps (`optim.streamed`): forward reads the
    weight a row slice at a time and gathers the rows of the ids in it; backward takes each slice's
    gradient with nn.Embedding's own backward op over the ids in it (each row sums the same tokens in
    the same order: the whole gradient's rows bit for bit, in bf16 too, which torch accumulates in
    fp32) and hands it to the optimizer, which steps that slice at once. The
    weight and its gradient never exist whole. The ids are the caller's to check (RevMoEModel.prepare
    does): one outside every slice would leave its row unset."""

    @staticmethod
    def _tokens(flat: Tensor, stream) -> list:
        """(rows, positions of the ids in them) for each of the weight's slices."""
        return [(r, ((flat >= r.start) & (flat < r.stop)).nonzero()[:, 0]) for r in stream.slices]

    @staticmethod
    def forward(ctx, ids, stream, anchor):
        flat = ids.reshape(-1)
        out = torch.empty((flat.numel(), *stream.p.shape[1:]), dtype=stream.p.dtype, device=ids.device)
        for r, at in _StreamedLookup._tokens(flat, stream):
            if at.numel():
                out[at] = stream.read(r).index_select(0, flat[at] - r.start)
        ctx.save_for_backward(flat)
        ctx.stream = stream
        return out.view(*ids.shape, *stream.p.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        stream = ctx.stream
        g = grad.reshape(flat.numel(), -1)
        tokens = _StreamedLookup._tokens(flat, stream)  # once for every sweep
        try:
            for sweep in stream.sweeps():
                for r, at in tokens:
                    gw = torch.ops.aten.embedding_dense_backward(g.index_select(0, at).to(stream.p.dtype),
                                                                 flat[at] - r.start, r.stop - r.start, -1, False)
                    stream.consume(sweep, r, stream.read(r) if stream.steps(sweep) else None, gw)
        except BaseException:
            stream.finish(failed=True)
            raise
        stream.finish()
        return None, None, None


def embed(module: nn.Embedding, ids: Tensor) -> Tensor:
    """module(ids); for an embedding whose weight an offload store streams (and that has no padding
    row, norm limit or sparse gradient), the same rows and gradient a row slice at a time."""
    stream = optim.streamed(module.weight)
    if stream is None:
        return module(ids)
    # the weight is not an input of the graph (autograd would give it a gradient of zeros); an empty
    # leaf that asks for a gradient is, so that backward reaches the lookup in training
    anchor = torch.empty(0, device=ids.device, requires_grad=torch.is_grad_enabled())
    return _StreamedLookup.apply(ids, stream, anchor)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(config: RevMoEConfig, position_ids: Tensor, dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """(cos, sin), each [B, S, head_dim], for integer positions [B, S] (HF's rotate_half layout)."""
    d = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=position_ids.device) / d))
    freqs = position_ids.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention_mask_4d(token_mask: Optional[Tensor], batch: int, q_len: int, past_len: int, device) -> Tensor:
    """Boolean [B, 1, q_len, past_len + q_len]: causal, padded keys masked. A query always sees
    itself, so rows of padding never become all -inf (no NaN)."""
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, k_len)
    if token_mask is not None:
        if token_mask.shape != (batch, k_len):
            raise ValueError(f"attention_mask must have shape {(batch, k_len)} (batch, past + new tokens), "
                             f"got {tuple(token_mask.shape)}")
        mask = mask & token_mask.bool()[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


# Elements of one query block's mask: causal attention with padding (or past keys) runs in blocks
# of queries whose mask is at most this big, so no [tokens, tokens] tensor is ever built.
MASK_BLOCK_ELEMENTS = 1 << 20


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, enable_gqa: bool = False) -> Tensor:
    """Causal scaled-dot-product attention of q [B, H, S, D] over k, v [B, H_kv, K, D] (the last S
    of the K keys are the queries' own positions; K - S past keys come from a KV cache).

    `mask`: None (every key is a real token), a key mask [B, K] (True / 1 = a real token; a query
    always sees itself, so a row of padding never becomes all -inf) or an explicit boolean
    [B, 1, S, K] mask (used as given). torch's SDPA kernels never build the [S, K] score matrix
    (on CPU the flash kernel runs for every mask form), but a mask they are handed is a [S, K]
    tensor (a boolean one is converted to a float one), so: with no mask and no past keys,
    `is_causal=True` (no mask at all; the kernel also skips the blocks above the diagonal); else the
    queries run in blocks of rows, each over the keys it can see, with a [B, 1, rows, keys] mask of
    at most MASK_BLOCK_ELEMENTS per sample.
    """
    S, K = q.shape[2], k.shape[2]
    if mask is not None and mask.dim() == 4:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    past = K - S
    if mask is None and past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if mask is not None and tuple(mask.shape) != (q.shape[0], K):
        raise ValueError(f"a key mask must have shape {(q.shape[0], K)} (batch, past + new tokens), got {tuple(mask.shape)}")
    keys = mask.bool()[:, None, None, :] if mask is not None else None
    rows = max(1, min(S, MASK_BLOCK_ELEMENTS // max(K, 1)))
    k_pos = torch.arange(K, device=q.device)
    outs = []
    for s in range(0, S, rows):
        e = min(S, s + rows)
        end = past + e  # keys beyond the block's last query are never seen
        q_pos = torch.arange(past + s, end, device=q.device)[:, None]
        m = k_pos[None, :end] <= q_pos  # [rows, end]
        if keys is not None:
            m = (m & keys[..., :end]) | (k_pos[None, :end] == q_pos)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :end], v[:, :, :end], attn_mask=m,
                                                   enable_gqa=enable_gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class KVCache:
    """Keys and values per layer, appended as generation goes (inference needs no reconstruction)."""

    def __init__(self):
        self.layers: Dict[int, Tuple[Tensor, Tensor]] = {}

    def length(self) -> int:
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        if layer in self.layers:
            pk, pv = self.layers[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class Attention(nn.Module):
    """RoPE multi-head attention with GQA. Queries from `x`, keys and values from `kv` (the same
    tensor except in RevFFN's cross-branch attention)."""

    def __init__(self, config: RevMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_size
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        # qk_norm: per head over head_dim (True / "head", Qwen3-MoE) or over the whole projection
        # width before the head split ("full", OLMoE).
        self.qk_norm_full = config.qk_norm == "full"
        if self.qk_norm_full:
            self.q_norm = RMSNorm(self.n_heads * self.hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, config.rms_norm_eps)
        elif config.qk_norm:
            self.q_norm = RMSNorm(self.hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, kv: Optional[Tensor] = None, position_embeddings=None, attention_mask=None,
                cache: Optional[KVCache] = None, **_) -> Tensor:
        kv = x if kv is None else kv
        B, S, _d = x.shape
        q, k = self.q_proj(x), self.k_proj(kv)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.hd)
        k = k.view(B, S, self.n_kv, self.hd)
        v = self.v_proj(kv).view(B, S, self.n_kv, self.hd)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = causal_attention(q, k, v, attention_mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.hd))


class SwiGLU(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts in HF's fused layout: gate_up_proj [E, 2I, d] (gate rows first), down_proj [E, d, I]."""

    def __init__(self, config: RevMoEConfig):
        super().__init__()
        E, d, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inner, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, inner))

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        # permute -> gather -> grouped matmul -> SwiGLU -> grouped matmul -> weighted scatter-combine
        return moe.moe_forward(x, topk_ids, topk_weights, self.gate_up_proj, self.down_proj)


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts (softmax router, optional renormalisation) plus an optional
    shared expert behind a sigmoid gate. Emits [load-balancing loss, z-loss] as a side output.

    Routing replay: the top-k indices are recorded in forward and replayed when backward re-runs
    the block from a reconstructed input (config.replay_routing)."""

    def __init__(self, config: RevMoEConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, flat: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Router logits (fp32, or fp64 for a float64 model), top-k ids and top-k weights for flat tokens [T, d]."""
        cfg = self.config
        logits = self.gate(flat)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        probs = logits.softmax(-1)
        # Recorded in the narrowest integer type that holds an expert id (uint8 up to 256 experts):
        # the records live from a layer's forward to its backward, so their bytes count per token and layer.
        small = torch.uint8 if cfg.num_experts <= 256 else torch.int16 if cfg.num_experts <= 32768 else torch.int32
        pick = lambda: self.choose(probs.detach()).to(small)  # noqa: E731
        ids = (side.replay(self, pick) if cfg.replay_routing else pick()).long()
        weights = probs.gather(-1, ids)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, ids, weights

    def choose(self, probs: Tensor) -> Tensor:
        """The discrete routing decision: top-k expert ids per token."""
        return probs.topk(self.config.num_experts_per_tok, dim=-1).indices

    def aux_losses(self, logits: Tensor, ids: Tensor, token_mask: Optional[Tensor]) -> Tensor:
        """[load-balancing loss (Switch / HF: E * sum_e f_e P_e), z-loss (mean logsumexp^2)] over real tokens."""
        E = self.config.num_experts
        probs = logits.softmax(-1)
        counts = torch.zeros(ids.shape[0], E, dtype=probs.dtype, device=probs.device)
        counts.scatter_(1, ids, 1.0)  # tokens routed to each expert (summed over the k slots)
        z = logits.logsumexp(-1) ** 2
        if token_mask is None:
            f, p, zl = counts.mean(0), probs.mean(0), z.mean()
        else:
            m = token_mask.reshape(-1, 1).to(probs.dtype)
            n = m.sum().clamp_min(1.0)
            f, p, zl = (counts * m).sum(0) / n, (probs * m).sum(0) / n, (z * m[:, 0]).sum() / n
        return torch.stack([E * (f * p).sum(), zl])

    def expert_outputs(self, flat: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        out = self.experts(flat, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None, **_) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, ids, weights = self.route(flat)
        weights = weights.to(flat.dtype)
        chunk = self.config.working_set(flat.shape[0])["moe_chunk_size"]
        if chunk and flat.shape[0] > chunk and torch.is_grad_enabled():
            # Each chunk keeps only its inputs; backward recomputes it (see RevMoEConfig.moe_chunk_size).
            out = torch.cat([
                checkpoint(self.expert_outputs, flat[s:s + chunk], ids[s:s + chunk], weights[s:s + chunk],
                           use_reentrant=False, preserve_rng_state=False)
                for s in range(0, flat.shape[0], chunk)])
        elif chunk and flat.shape[0] > chunk:
            # Without grad (a reversible forward, inference) in chunks too: the experts' intermediates
            # (k routed copies of every token and their hidden units) never exist for the whole batch.
            out = None
            for s in range(0, flat.shape[0], chunk):
                part = self.expert_outputs(flat[s:s + chunk], ids[s:s + chunk], weights[s:s + chunk])
                if out is None:  # the dtype the experts return (autocast's)
                    out = part.new_empty((flat.shape[0],) + part.shape[1:])
                out[s:s + chunk] = part
        else:
            out = self.expert_outputs(flat, ids, weights)
        return side.attach_aux(out.reshape(shape), self.aux_losses(logits, ids, token_mask), self)


def init_weights(module: nn.Module, config: RevMoEConfig) -> None:
    """Normal(0, initializer_range) everywhere; output projections scaled by 1/sqrt(2L) so the
    residual streams stay O(1) at depth; norms at 1."""
    std = config.initializer_range
    out_std = std / math.sqrt(2 * config.num_hidden_layers)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1] if "." in name else name
        if p.dim() == 1:
            if "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        elif leaf == "weight" and any(s in name for s in ("o_proj", "down_proj", "down")) or leaf == "down_proj":
            nn.init.normal_(p, 0.0, out_std)
        else:
            nn.init.normal_(p, 0.0, std)
