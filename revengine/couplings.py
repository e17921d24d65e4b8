"""Reversible couplings: two streams (x1, x2) -> (y1, y2) with an exact inverse.

The protocol for a user-defined coupling is small: subclass `Coupling` and implement
`forward(x1, x2, **ctx) -> (y1, y2)` and `inverse(y1, y2, **ctx) -> (x1, x2)`, both written with
ordinary torch ops. Both streams keep their shape, dtype and device. The executor calls
`inverse` (no grad) in backward, then re-runs `forward` with grad; check it with
`revengine.testing.check_layer`. The built-in couplings run a fused C++ backward instead, where
reconstruction and recompute are one evaluation of each stream function.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from . import _ext

Tensor = torch.Tensor


def quantize_ste(inc: Tensor, bits: int, factor: Optional[Tensor] = None) -> Tensor:
    """The increment (times `factor`, a float64 tensor broadcasting against it) as the fixed-point
    executor adds it: round(inc * factor * 2^bits) / 2^bits, one rounding; straight-through grads."""
    scale = float(2**bits)
    exact = inc.detach().double()
    if factor is not None:
        exact = exact * factor
        inc = factor.to(inc.dtype) * inc
    q = torch.round(exact * scale) / scale  # exact in float64
    return inc + (q - exact).to(inc.dtype)


class Coupling(nn.Module):
    """Base class of reversible two-stream layers (see the module docstring for the protocol)."""

    def forward(self, x1: Tensor, x2: Tensor, **ctx) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y1: Tensor, y2: Tensor, **ctx) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse(y1, y2, **ctx)")

    def forward_exact(self, x1: Tensor, x2: Tensor, bits: int, **ctx) -> Tuple[Tensor, Tensor]:
        """Forward as exact=True computes it (increments rounded to the fixed-point grid)."""
        raise ValueError(
            f"{type(self).__name__} does not support exact=True: only couplings that add and "
            "subtract increments can be made bit-exact"
        )

    def __getstate__(self):
        # The cached C++ layer is rebuilt on demand; it cannot be pickled or deep-copied.
        state = self.__dict__.copy()
        state["_cpp"] = None
        state["_cpp_key"] = None
        return state

    def _executor_layer(self):
        """The C++ layer the executor runs. User couplings run through their forward/inverse."""
        return _ext._C.PyCoupling(self, type(self).__name__)


def _module_or_callable(fn, name: str):
    if not callable(fn):
        raise TypeError(f"{name} must be an nn.Module or a callable, got {type(fn).__name__}")
    return fn


class AdditiveCoupling(Coupling):
    """y1 = lam*x1 + f(x2); y2 = beta*x2 + g(y1)   (RevNet / Reformer; lam, beta from MEFT).

    f and g are any modules taking (tensor, **ctx) and returning a tensor of the same shape.
    A scale below 1 amplifies reconstruction error by 1/scale per layer: measure it with
    `check_layer` before training deep stacks with MEFT's lam=0.1.
    """

    def __init__(self, f: Callable, g: Callable, lam: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.f = _module_or_callable(f, "f")
        self.g = _module_or_callable(g, "g")
        lam, beta = float(lam), float(beta)
        if lam == 0.0 or beta == 0.0 or not (torch.isfinite(torch.tensor([lam, beta])).all()):
            raise ValueError(f"AdditiveCoupling: lam and beta must be finite and non-zero, got lam={lam}, beta={beta}")
        self.lam, self.beta = lam, beta
        self._cpp = None
        self._cpp_key = None

    def extra_repr(self) -> str:
        return f"lam={self.lam}, beta={self.beta}"

    def forward(self, x1, x2, **ctx):
        # Unit scales skip the multiply: the plain/checkpoint baselines do no extra work.
        y1 = (x1 if self.lam == 1.0 else self.lam * x1) + self.f(x2, **ctx)
        y2 = (x2 if self.beta == 1.0 else self.beta * x2) + self.g(y1, **ctx)
        return y1, y2

    def forward_exact(self, x1, x2, bits, **ctx):
        if self.lam != 1.0 or self.beta != 1.0:
            super().forward_exact(x1, x2, bits, **ctx)
        y1 = x1 + quantize_ste(self.f(x2, **ctx), bits)
        y2 = x2 + quantize_ste(self.g(y1, **ctx), bits)
        return y1, y2

    def inverse(self, y1, y2, **ctx):
        x2 = (y2 - self.g(y1, **ctx)) / self.beta
        x1 = (y1 - self.f(x2, **ctx)) / self.lam
        return x1, x2

    def _executor_layer(self):
        key = (id(self.f), id(self.g), self.lam, self.beta)
        if self._cpp_key != key:
            self._cpp = _ext._C.AdditiveCoupling(self.f, self.g, self.lam, self.beta)
            self._cpp_key = key
        return self._cpp


class AffineCoupling(Coupling):
    """y1 = x1*exp(s(f_scale(x2))) + f_shift(x2); y2 = x2*exp(s(g_scale(y1))) + g_shift(y1).

    s(r) = c*tanh(r/c) bounds the log-scale to (-c, c) (c = `clamp`), so the inverse never
    divides by a vanishing scale (RealNVP / Glow style, with a soft clamp).
    """

    def __init__(self, f_scale, f_shift, g_scale, g_shift, clamp: float = 2.0):
        super().__init__()
        self.f_scale = _module_or_callable(f_scale, "f_scale")
        self.f_shift = _module_or_callable(f_shift, "f_shift")
        self.g_scale = _module_or_callable(g_scale, "g_scale")
        self.g_shift = _module_or_callable(g_shift, "g_shift")
        if not clamp > 0:
            raise ValueError(f"AffineCoupling: clamp must be positive, got {clamp}")
        self.clamp = float(clamp)
        self._cpp = None
        self._cpp_key = None

    def extra_repr(self) -> str:
        return f"clamp={self.clamp}"

    def _scale(self, raw):
        return torch.exp(torch.tanh(raw / self.clamp) * self.clamp)

    def forward(self, x1, x2, **ctx):
        y1 = x1 * self._scale(self.f_scale(x2, **ctx)) + self.f_shift(x2, **ctx)
        y2 = x2 * self._scale(self.g_scale(y1, **ctx)) + self.g_shift(y1, **ctx)
        return y1, y2

    def inverse(self, y1, y2, **ctx):
        x2 = (y2 - self.g_shift(y1, **ctx)) / self._scale(self.g_scale(y1, **ctx))
        x1 = (y1 - self.f_shift(x2, **ctx)) / self._scale(self.f_scale(x2, **ctx))
        return x1, x2

    def _executor_layer(self):
        key = (id(self.f_scale), id(self.f_shift), id(self.g_scale), id(self.g_shift), self.clamp)
        if self._cpp_key != key:
            self._cpp = _ext._C.AffineCoupling(self.f_scale, self.f_shift, self.g_scale, self.g_shift, self.clamp)
            self._cpp_key = key
        return self._cpp
