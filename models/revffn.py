"""RevFFN's reversible layer and the fixed-point solver of its inverse.

The attention branch reads the stream it updates (queries from x1), so x1 = y1 - F(x1, x2) has no
closed form: the inverse iterates it to a fixed point, which exists while F is a contraction in x1.
A layer that stops being one can keep its input instead (fixed_point_fallback="store").
"""
import math
import warnings

import torch
from torch import nn

from revengine import side
from revengine.couplings import Coupling
from revengine.errors import ReconstructionError

from .blocks import AttnBranch, MoEBranch, attention_call
from .config import RevMoEConfig

Tensor = torch.Tensor


class RevFFNLayer(Coupling):
    """RevFFN's layer on two d/2 streams:

        y1 = x1 + D_a(Attn(norm(U_q x1), kv = norm(U_kv x2)))   queries from x1, keys/values from x2
        y2 = x2 + D_m(MoE(norm(U_m y1)))

    U_* (d/2 -> d) and D_* (d -> d/2) are the projection adapters that let full-width (pretrained)
    attention and MoE weights run on half-width streams. The attention branch reads the stream
    it updates, so its inverse solves x1 = y1 - F(x1, x2) by fixed-point iteration; it converges
    when F is a contraction in x1 (small adapters). Each inverse records its iteration count and
    relative residual in `fixed_point_stats`. With fixed_point_fallback="store" (the default) the
    forward checks the inverse right away and a layer whose inverse would not converge keeps its
    left input x1 (half a checkpoint for that layer; `fixed_point_stats["stored"]`, and a warning the
    first time), so training goes on exact. With "error" such an inverse raises a
    ReconstructionError in backward; with "warn" it warns and goes on with the inexact input.
    """

    def __init__(self, config: RevMoEConfig, layer_idx: int):
        super().__init__()
        d, half = config.hidden_size, config.hidden_size // 2
        self.layer_idx = layer_idx
        self.attn = AttnBranch(config, layer_idx)
        self.moe = MoEBranch(config)
        self.up_q = nn.Linear(half, d, bias=False)
        self.up_kv = nn.Linear(half, d, bias=False)
        self.down_attn = nn.Linear(d, half, bias=False)
        self.up_moe = nn.Linear(half, d, bias=False)
        self.down_moe = nn.Linear(d, half, bias=False)
        self.iters, self.tol, self.fallback = config.fixed_point_iters, config.fixed_point_tol, config.fixed_point_fallback
        self.memory = config.fixed_point_memory
        self.fixed_point_stats = {"iterations": 0, "residual": 0.0, "calls": 0}
        self._said_stored = False
        self.config = config

    def attn_increment(self, x1: Tensor, x2: Tensor, **ctx) -> Tensor:
        norm = self.attn.input_layernorm
        return self.down_attn(self.attn.self_attn(norm(self.up_q(x1)), kv=norm(self.up_kv(x2)), **ctx))

    def moe_increment(self, y1: Tensor, **ctx) -> Tensor:
        return self.down_moe(self.moe(self.up_moe(y1), **ctx))

    def _tolerance(self, x: Tensor) -> float:
        if self.tol is not None:
            return float(self.tol)
        # A few hundred ulps of the precision F is computed in (the autocast dtype under autocast):
        # below that the iteration only stirs rounding noise.
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)

    def solve_x1(self, y1, x2, tol=None, **ctx):
        """x1 with x1 + F(x1, x2) = y1 to relative residual `tol` (default: _tolerance):
        (x1, relative residual, iterations)."""
        tol = self._tolerance(y1) if tol is None else tol
        if self.memory > 0:
            return self._solve_anderson(y1, x2, tol, **ctx)
        scale = y1.abs().max().clamp_min(1.0)
        # Damped fixed-point iteration x <- x + w (y1 - F(x, x2) - x). w = 1 is the plain iteration;
        # w halves whenever the residual grows, which turns an oscillating divergence (dF/dx1 with
        # eigenvalues beyond 1) into a convergent one.
        x1, residual, prev, w, n = y1, float("inf"), float("inf"), 1.0, 0
        for n in range(1, self.iters + 1):
            step = y1 - self.attn_increment(x1, x2, **ctx) - x1
            residual = float(step.abs().max() / scale)
            if not math.isfinite(residual):
                break
            if residual > prev:
                w = max(w * 0.5, 1.0 / 64)
            prev = residual
            x1 = x1 + step if w == 1.0 else x1 + w * step
            if residual <= tol:
                break
        return x1, residual, n

    def _solve_anderson(self, y1, x2, tol, **ctx):
        """Anderson acceleration of x <- G(x) = y1 - F(x, x2), one least-squares problem per token.

        A token's x1 enters F only through its own query (keys and values come from x2), so dF/dx1 is
        block diagonal over tokens and the equation splits into one d/2-dimensional equation per
        token. Each token mixes its last `memory` iterates with its own coefficients: for the
        linearised map this is GMRES on (I + dF/dx1) per token, which converges where the plain
        iteration does not (||dF/dx1|| > 1; q/k-normed attention, benchmarks/revffn_contraction.py).
        """
        scale = y1.abs().max().clamp_min(1.0)
        shape, h = y1.shape, y1.shape[-1]
        x = y1
        dgs, dfs = [], []  # differences of G(x) and of the residual G(x) - x between iterates: [T, h] each
        g_prev = f_prev = None
        best = (float("inf"), y1)
        residual, n = float("inf"), 0
        for n in range(1, self.iters + 1):
            g = y1 - self.attn_increment(x, x2, **ctx)
            f = g - x
            residual = float(f.abs().max() / scale)
            if not math.isfinite(residual):
                break
            if residual < best[0]:
                best = (residual, g)
            if residual <= tol:
                return g, residual, n
            g2, f2 = g.reshape(-1, h), f.reshape(-1, h)
            if g_prev is not None:
                dgs.append(g2 - g_prev)
                dfs.append(f2 - f_prev)
                if len(dfs) > self.memory:
                    dgs.pop(0)
                    dfs.pop(0)
            g_prev, f_prev = g2, f2
            if not dfs:
                x = g
                continue
            # gamma = argmin |f - dF gamma| per token (normal equations, a little Tikhonov for rank loss)
            dF, dG = torch.stack(dfs, -1), torch.stack(dgs, -1)  # [T, h, m]
            work = torch.float64  # [T, m, m] systems: cheap in any precision, and the normal equations square
            A = dF.to(work)       # the condition number
            AtA = A.transpose(1, 2) @ A
            reg = 1e-12 * AtA.diagonal(dim1=1, dim2=2).sum(-1) + 1e-200  # a converged token (dF = 0): gamma = 0
            AtA = AtA + reg[:, None, None] * torch.eye(AtA.shape[-1], dtype=work, device=A.device)
            gamma = torch.linalg.solve(AtA, A.transpose(1, 2) @ f2.to(work)[..., None])
            x = (g2 - (dG.to(work) @ gamma)[..., 0].to(g2.dtype)).reshape(shape)
        # not converged: the best plain step seen (the caller checks the residual)
        return best[1] if math.isfinite(best[0]) else x, min(residual, best[0]), n

    def forward(self, x1, x2, **ctx):
        y1 = x1 + attention_call(self.config, self.attn_increment, x1, x2, **ctx)
        # (not with a KV cache: solving would append to it again; decoding never inverts)
        if self.fallback == "store" and side.is_recording() and ctx.get("cache") is None:
            # Recording for a reversible backward: check now that the inverse will converge; a
            # layer whose branch is not a contraction keeps its left input instead.
            tol = self._tolerance(y1)
            with torch.no_grad():  # solved to the margin it is checked against
                x1_solved, residual, _ = self.solve_x1(y1, x2, tol=tol / 4, **ctx)
                error = float((x1_solved - x1).abs().max() / y1.abs().max().clamp_min(1.0))
            # A margin: backward solves from a reconstructed y1, a few ulps off this one.
            self.fixed_point_stats["stored"] = not (residual <= tol / 4 and error <= tol)
            if self.fixed_point_stats["stored"]:
                side.save(self, x1, "x1")
                if not self._said_stored:  # once per layer: how many layers store is in fixed_point_report()
                    self._said_stored = True
                    warnings.warn(f"revengine: RevFFN layer {self.layer_idx}: the attention branch is no longer a "
                                  f"contraction (fixed-point residual {residual:.3g}); the layer keeps its input "
                                  "while that lasts (exact grads, half a checkpoint's memory)", RuntimeWarning,
                                  stacklevel=2)
        return y1, x2 + self.moe_increment(y1, **ctx)

    def inverse(self, y1, y2, **ctx):
        x2 = y2 - self.moe_increment(y1, **ctx)
        if self.fallback == "store" and side.is_replaying():
            stored = side.load(self, "x1")
            if stored is not None:
                return stored.clone(), x2
        tol = self._tolerance(y1)
        x1, residual, n = self.solve_x1(y1, x2, **ctx)
        st = self.fixed_point_stats
        st["iterations"], st["residual"], st["calls"] = n, residual, st["calls"] + 1
        if not residual <= tol:
            msg = (f"revengine: RevFFN layer {self.layer_idx}: the fixed-point inverse of the attention branch did not "
                   f"converge: relative residual {residual:.3g} after {n} iterations (tolerance {tol:.3g}). The "
                   "branch is too far from a contraction in the stream it updates: keep the adapters small, raise "
                   "fixed_point_iters, use fixed_point_fallback='store', block_type='additive' or "
                   "reversible_mode='checkpoint'")
            if self.fallback == "error":
                raise ReconstructionError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return x1, x2
