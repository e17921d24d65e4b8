"""Two-step integrators of Gal et al. (arXiv 2512.02056) as reversible layers.

Each layer maps the streams (p_prev, p) to (p, p_next) with one evaluation of f (the unchanged
pre-norm block increment, f(p) = A(p) + M(p + A(p)) for a transformer block):

    Midpoint            p_next = p_prev + 2h f(p)                          (eq. 2.4)
    Leapfrog            p_next = 2p - p_prev + h^2 f(p)                    (eq. 2.6)
    StochasticMidpoint  p_next = g p_prev + (1-g) p + (1+g) h f(p)         (one g per layer;
                        g = 1 is the midpoint rule, g = 0 forward Euler, which is not invertible)
    Hamiltonian         q += h A(p); p += h M(q)                           (eqs. 2.8-2.9)
    BDIA                p_next = g p_prev + (1-g) p + (1+g) f(p), g = +-gamma drawn per sample
                        and forward in training, g = 0 in eval: the residual p + f(p) itself
                        (Zhang et al.'s BDIA-transformer; exact=True records the k bits >> k drops)

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
from .recompute import replayed_rng, rng_state


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
        return self._built_layer(_ext._C.LinearMultistep, self.f, self.c_prev, self.c_cur, self.c_f, self.swap,
                                 type(self).__name__)


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


def _floor_grid_ste(x, gamma: float, bits: int):
    """gamma*x rounded down to the 2^-bits grid (x on the grid, gamma = 2^-k: the fixed-point
    executor's arithmetic shift), straight-through grads."""
    scale = float(2**bits)
    q = torch.floor(x.detach().double() * scale * gamma) / scale
    return gamma * x + (q - gamma * x.detach().double()).to(x.dtype)


class BDIA(Coupling):
    """p_next = g p_prev + (1-g) p + (1+g) f(p), g = +-gamma per sample   (BDIA-transformer,
    Zhang, Lewis & Kleijn 2024: the average of the midpoint step p_prev + 2f(p) and the Euler step
    p + f(p), weighted by g).

    In training g is drawn per sample (dim 0) at every forward from torch's RNG; E[g] = 0, and in
    eval mode g = 0: p_next = p + f(p), exactly the residual network the block came from, so a
    converted pretrained transformer is unchanged at inference. Training with the random signs
    regularises (an ensemble of integrators).

    The inverse divides by g. In floating point that amplifies rounding error by 1/gamma per
    layer (2^depth for gamma = 1/2): use exact=True (gamma = 2^-k, k = 1..8), where g*p_prev is
    rounded down on the fixed-point grid and the k dropped bits are recorded (k bits per element
    per layer, packed 8/k to a byte), so reconstruction is bit-exact at any depth. In eval mode the
    layer is not invertible and keeps its input when grad is on. Sequential.inverse cannot undo a
    BDIA layer (the signs are drawn per forward); backward reconstructs from what forward recorded.
    Streams: (p_prev, p) -> (p, p_next); build the stack with split="duplicate", merge="last".
    """

    inverse_needs_its_forward = True  # Sequential.inverse cannot undo it; inverse() uses last_signs

    def __init__(self, f, gamma: float = 0.5):
        super().__init__()
        self.f = _module_or_callable(f, "f")
        gamma = float(gamma)
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"BDIA: gamma must be in (0, 1] (g = +-gamma; the inverse divides by it), got {gamma}")
        self.gamma = gamma
        self.last_signs = None  # the signs of the last training forward (for inverse())
        self._last_rng = None

    def extra_repr(self):
        return f"gamma={self.gamma}"

    @staticmethod
    def exact_shift(gamma: float) -> int:
        """k when gamma = 2^-k with k in 1..8 (the gammas exact=True can run), else 0. This is the
        executor's own rule, so a config can check a gamma before any layer is built."""
        return int(_ext._C.BDIA.exact_shift(float(gamma)))

    def _draw(self, s):
        if s.dim() < 1 or s.shape[0] == 0:
            raise ValueError(f"BDIA draws one sign per sample along dim 0; got a stream of shape {tuple(s.shape)}")
        # the same draw as the C++ layer: int64 {0, 1} -> {-1, +1}, before f runs
        sign = torch.randint(0, 2, (s.shape[0],), device=s.device).mul_(2).sub_(1)
        self.last_signs = sign
        # f's randomness (dropout) as this forward sees it, for inverse() to replay
        self._last_rng = rng_state(s.device)
        return sign

    @staticmethod
    def _per_sample(sign, like):
        return sign.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    def forward(self, u, s, **ctx):
        if not self.training:
            return s, s + self.f(s, **ctx)
        sign = self._draw(s)
        inc = self.f(s, **ctx)
        g = self._per_sample(sign, u) * self.gamma
        return s, g * u + (1 - g) * s + (1 + self._per_sample(sign, inc) * self.gamma) * inc

    def forward_exact(self, u, s, bits, **ctx):
        if not self._executor_layer().supports_exact:
            raise ValueError(f"BDIA: exact=True needs gamma = 2^-k (k = 1..8), got {self.gamma}")
        if not self.training:
            return s, s + quantize_ste(self.f(s, **ctx), bits)
        sign = self._draw(s)
        inc = self.f(s, **ctx)
        sg = self._per_sample(sign, u)
        out = sg * _floor_grid_ste(u, self.gamma, bits) + s - sg * _floor_grid_ste(s, self.gamma, bits)
        # (1+g)*inc is rounded once, onto the fixed-point grid (as the fused bdia_step_ kernel does)
        factor = 1 + self._per_sample(sign, inc).double() * self.gamma
        return s, out + quantize_ste(inc, bits, factor=factor)

    def inverse(self, y1, y2, **ctx):
        if not self.training:
            raise ValueError("BDIA in eval mode is p + f(p) (g = 0), which is not invertible")
        if self.last_signs is None or self.last_signs.shape[0] != y1.shape[0]:
            raise ValueError("BDIA.inverse needs the signs of the forward it undoes (last_signs); run forward first")
        s = y1
        with replayed_rng(self._last_rng, s.device):
            inc = self.f(s, **ctx)
        g = self._per_sample(self.last_signs, s) * self.gamma
        return (y2 - (1 - g) * s - (1 + g) * inc) / g, s

    def _executor_layer(self):
        layer = self._built_layer(_ext._C.BDIA, self.f, self.gamma, type(self).__name__)
        layer.training = self.training  # g = 0 in eval mode
        return layer


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
