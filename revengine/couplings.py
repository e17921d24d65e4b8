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
    r"""Base class of reversible two-stream layers: the protocol for your own couplings.

    Subclass it and implement ``forward(x1, x2, **ctx) -> (y1, y2)`` and
    ``inverse(y1, y2, **ctx) -> (x1, x2)`` with ordinary torch ops; both keep the streams'
    shape, dtype and device. In ``mode="reversible"`` backward calls ``inverse`` (without grad)
    on the layer's output to get its input back, then re-runs ``forward`` with grad, with the
    RNG state the forward saw (``preserve_rng_state``); ``inverse`` gets no RNG replay, so it
    must not draw random numbers (dropout) that the forward did not. ``ctx`` holds the keyword
    arguments given to the stack's forward. Implement ``forward_exact(x1, x2, bits, **ctx)``
    too to allow ``exact=True``. Check a coupling with :func:`revengine.testing.check_layer`,
    or run the stack with ``debug=True``.

    Raises:
        NotImplementedError: ``inverse`` was not implemented.
        ValueError: ``forward_exact`` (exact=True) was not implemented.
        RuntimeError: (from the stack) ``forward`` changed the streams' shape, dtype or device.
        ReconstructionError: (from the stack, in backward) ``inverse`` returned NaN or Inf, or,
            with ``debug=True``, did not give back the layer's input.

    Example::

        >>> import torch, revengine as rev
        >>> class Shift(rev.Coupling):
        ...     def __init__(self, width):
        ...         super().__init__()
        ...         self.f = torch.nn.Linear(width, width)
        ...     def forward(self, x1, x2):
        ...         return x1 + self.f(x2), x2
        ...     def inverse(self, y1, y2):
        ...         return y1 - self.f(y2), y2
        >>> stack = rev.Sequential(Shift(4), Shift(4))
        >>> stack(torch.randn(2, 8, requires_grad=True)).sum().backward()
        >>> rev.testing.check_layer(Shift(4).double(), torch.randn(2, 8, dtype=torch.float64)).ok()
        True
    """

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

    def _built_layer(self, cpp_class, *args):
        """cpp_class(*args), built once and rebuilt only when an argument changes: a module or
        function replaced by another (compared by identity), or a number set to a new value."""
        key = tuple(id(a) if callable(a) else a for a in args)
        if self.__dict__.get("_cpp_key") != key:
            self._cpp, self._cpp_key = cpp_class(*args), key
        return self._cpp


def _module_or_callable(fn, name: str):
    if not callable(fn):
        raise TypeError(f"{name} must be an nn.Module or a callable, got {type(fn).__name__}")
    return fn


class AdditiveCoupling(Coupling):
    r"""y1 = lam*x1 + f(x2); y2 = beta*x2 + g(y1)   (RevNet / Reformer; lam, beta from MEFT).

    Its backward is fused in C++: reconstructing each stream and recomputing its increment are
    one evaluation of f or g, so a layer costs one extra forward in backward, as with
    checkpointing. A scale below 1 amplifies reconstruction error by 1/scale per layer: measure
    it with :func:`revengine.testing.check_layer` before training deep stacks with MEFT's
    lam=0.1. ``exact=True`` needs lam = beta = 1.

    Args:
        f: a module or callable taking (x2, **ctx) and returning an increment shaped like x1.
        g: the same for the second stream, called on y1.
        lam: the scale of x1 (finite, non-zero).
        beta: the scale of x2 (finite, non-zero).

    Returns:
        Called as ``layer(x1, x2, **ctx)``: the tuple (y1, y2).

    Raises:
        TypeError: f or g is not callable.
        ValueError: lam or beta is zero or not finite.

    Example::

        >>> import torch, revengine as rev
        >>> layer = rev.AdditiveCoupling(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
        >>> y1, y2 = layer(x1, x2)
        >>> a, b = layer.inverse(y1, y2)
        >>> torch.allclose(a, x1, atol=1e-6) and torch.allclose(b, x2, atol=1e-6)
        True
    """

    def __init__(self, f: Callable, g: Callable, lam: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.f = _module_or_callable(f, "f")
        self.g = _module_or_callable(g, "g")
        lam, beta = float(lam), float(beta)
        if lam == 0.0 or beta == 0.0 or not (torch.isfinite(torch.tensor([lam, beta])).all()):
            raise ValueError(f"AdditiveCoupling: lam and beta must be finite and non-zero, got lam={lam}, beta={beta}")
        self.lam, self.beta = lam, beta

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
        return self._built_layer(_ext._C.AdditiveCoupling, self.f, self.g, self.lam, self.beta)


class AffineCoupling(Coupling):
    r"""y1 = x1*exp(s(f_scale(x2))) + f_shift(x2); y2 = x2*exp(s(g_scale(y1))) + g_shift(y1).

    s(r) = c*tanh(r/c) bounds the log-scale to (-c, c) (c = ``clamp``), so the inverse never
    divides by a vanishing scale (RealNVP / Glow style, with a soft clamp). Its backward is
    fused in C++ like :class:`AdditiveCoupling`'s. It multiplies, so it does not support
    ``exact=True``.

    Args:
        f_scale, f_shift: modules or callables taking (x2, **ctx) and returning a tensor shaped
            like x1: the raw log-scale and the shift of the first stream.
        g_scale, g_shift: the same for the second stream, called on y1.
        clamp: c, the bound of the log-scale (positive).

    Returns:
        Called as ``layer(x1, x2, **ctx)``: the tuple (y1, y2).

    Raises:
        TypeError: one of the four functions is not callable.
        ValueError: clamp is not positive.

    Example::

        >>> import torch, revengine as rev
        >>> lin = lambda: torch.nn.Linear(4, 4)
        >>> layer = rev.AffineCoupling(lin(), lin(), lin(), lin(), clamp=1.0)
        >>> stack = rev.Sequential(layer, layer)  # the same layer twice: shared parameters
        >>> x = torch.randn(2, 8)
        >>> with torch.no_grad():
        ...     print(torch.allclose(stack.inverse(stack(x)), x, atol=1e-5))
        True
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
        return self._built_layer(_ext._C.AffineCoupling, self.f_scale, self.f_shift, self.g_scale, self.g_shift,
                                 self.clamp)
