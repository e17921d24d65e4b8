"""Two-step integrators of Gal et al. (arXiv 2512.02056) as reversible layers.

Each layer maps the streams (p_prev, p) to (p, p_next) with one evaluation of f (the unchanged
pre-norm block increment, f(p) = A(p) + M(p + A(p)) for a transformer block):

    Midpoint            p_next = p_prev + 2h f(p)                          (eq. 2.4)
    Leapfrog            p_next = 2p - p_prev + h^2 f(p)                    (eq. 2.6)
    StochasticMidpoint  p_next = g p_prev + (1-g) p + (1+g) h f(p)         (one g per layer;
                        g = 1 is the midpoint rule, g = 0 forward Euler, which is not invertible)
    Hamiltonian         q += h A(p); p += h M(q)                           (eqs. 2.8-2.9)

Boundary: a stack starts from two states. `Sequential(..., split="duplicate")` sets
p_-1 = p_0; putting `EulerStart(f0, h)` first instead bootstraps p_1 = p_0 + h f0(p_0) from
(p_0, p_0). The last state is the second stream: use merge="last".

Midpoint, Leapfrog, EulerStart and Hamiltonian only add, subtract and double states, so they
support exact=True (bit-exact reconstruction). The stochastic midpoint divides by g in its
inverse, which amplifies rounding error by 1/|g| per layer; it supports exact=True only at g = +-1.
"""
import torch
from torch import nn

from . import _ext
from .couplings import AdditiveCoupling, Coupling, _module_or_callable, quantize_ste


class _Multistep(Coupling):
    """U' = c_prev*U + c_cur*S + c_f*f(S); with swap (U, S) = (x1, x2) and the outputs are
    (S, U'), without swap (S, U) = (x1, x2) and the outputs are (S, U')."""

    swap = True

    def __init__(self, f, c_prev: float, c_cur: float, c_f: float):
        super().__init__()
        self.f = _module_or_callable(f, "f")
        self.c_prev, self.c_cur, self.c_f = float(c_prev), float(c_cur), float(c_f)
        if self.c_prev == 0.0 or not all(map(lambda c: abs(c) < float("inf"), (c_prev, c_cur, c_f))):
            raise ValueError(
                f"{type(self).__name__}: the coefficient of the previous state must be finite and non-zero "
                f"(the inverse divides by it), got {self.c_prev}"
            )
        self._cpp = None
        self._cpp_key = None

    def _streams(self, x1, x2):
        return (x1, x2) if self.swap else (x2, x1)  # (U, S)

    def _combine(self, u, s, inc):
        out = u if self.c_prev == 1.0 else self.c_prev * u
        if self.c_cur != 0.0:
            out = out + self.c_cur * s
        return out + (inc if self.c_f == 1.0 else self.c_f * inc)

    def forward(self, x1, x2, **ctx):
        u, s = self._streams(x1, x2)
        return s, self._combine(u, s, self.f(s, **ctx))

    def forward_exact(self, x1, x2, bits, **ctx):
        if not self._executor_layer().supports_exact:
            super().forward_exact(x1, x2, bits, **ctx)
        u, s = self._streams(x1, x2)
        out = u if self.c_prev == 1.0 else self.c_prev * u
        if self.c_cur != 0.0:
            out = out + self.c_cur * s
        return s, out + quantize_ste(self.c_f * self.f(s, **ctx), bits)

    def inverse(self, y1, y2, **ctx):
        s, u_next = y1, y2
        u = u_next - self.c_f * self.f(s, **ctx)
        if self.c_cur != 0.0:
            u = u - self.c_cur * s
        if self.c_prev != 1.0:
            u = u / self.c_prev
        return (u, s) if self.swap else (s, u)

    def _executor_layer(self):
        key = (id(self.f), self.c_prev, self.c_cur, self.c_f, self.swap)
        if self._cpp_key != key:
            self._cpp = _ext._C.LinearMultistep(self.f, self.c_prev, self.c_cur, self.c_f, self.swap, type(self).__name__)
            self._cpp_key = key
        return self._cpp


class Midpoint(_Multistep):
    """p_next = p_prev + 2h f(p)   (Gal et al., eq. 2.4)."""

    def __init__(self, f, h: float = 1.0):
        self.h = float(h)
        super().__init__(f, 1.0, 0.0, 2.0 * self.h)

    def extra_repr(self):
        return f"h={self.h}"


class Leapfrog(_Multistep):
    """p_next = 2p - p_prev + h^2 f(p)   (Gal et al., eq. 2.6)."""

    def __init__(self, f, h: float = 1.0):
        self.h = float(h)
        super().__init__(f, -1.0, 2.0, self.h * self.h)

    def extra_repr(self):
        return f"h={self.h}"


class StochasticMidpoint(_Multistep):
    """p_next = gamma*p_prev + (1-gamma)*p + (1+gamma)*h*f(p), one gamma per layer.

    gamma = 1 is the midpoint rule. Its inverse divides by gamma: reconstruction error grows by
    1/|gamma| per layer (measure it with revengine.testing.check_layer). `gamma=None` draws it
    from U(0.5, 1) at construction (seeded by torch's RNG), fixed for the layer's life.
    """

    def __init__(self, f, h: float = 1.0, gamma=None):
        if gamma is None:
            gamma = float(torch.empty(()).uniform_(0.5, 1.0))
        self.h, self.gamma = float(h), float(gamma)
        if self.gamma == 0.0:
            raise ValueError("StochasticMidpoint: gamma = 0 is forward Euler, which is not invertible")
        super().__init__(f, self.gamma, 1.0 - self.gamma, (1.0 + self.gamma) * self.h)

    def extra_repr(self):
        return f"h={self.h}, gamma={self.gamma}"


class EulerStart(_Multistep):
    """The Euler bootstrap for the first layer: (p0, p0) -> (p0, p0 + h f(p0))."""

    swap = False

    def __init__(self, f, h: float = 1.0):
        self.h = float(h)
        super().__init__(f, 1.0, 0.0, self.h)

    def extra_repr(self):
        return f"h={self.h}"


class _Scaled(nn.Module):
    def __init__(self, fn, h: float):
        super().__init__()
        self.fn, self.h = fn, float(h)

    def forward(self, x, **ctx):
        return self.h * self.fn(x, **ctx)


class Hamiltonian(AdditiveCoupling):
    """q += h A(p); p += h M(q)   (Gal et al., eqs. 2.8-2.9), streams (q, p).

    The symplectic (Verlet-type) scheme is an additive coupling with F = h*A, G = h*M.
    """

    def __init__(self, attn, mlp, h: float = 1.0):
        self.h = float(h)
        f = attn if self.h == 1.0 else _Scaled(attn, self.h)
        g = mlp if self.h == 1.0 else _Scaled(mlp, self.h)
        super().__init__(f, g)

    def extra_repr(self):
        return f"h={self.h}"
