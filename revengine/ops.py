"""Typed wrappers of revengine's element-wise torch ops (`torch.ops.revengine.*`).

The executor calls these kernels from C++; the wrappers are the Python surface for users,
benchmarks and tests. Every op has CPU, CUDA (when built) and Meta kernels, so it runs under
torch.compile and passes `torch.library.opcheck`. The MoE routing ops have their own wrappers in
`revengine.moe`.

Arithmetic contract, shared by the CPU and CUDA kernels (results agree bit for bit across devices):

* opmath is float32 for bfloat16/float16 inputs, else the input's dtype; every operand is converted
  to opmath and the result is rounded once to the input's dtype. Operands (f, scale, shift) must
  have the input's shape and device but may have any floating dtype (autocast).
* Fixed point: a float x is the int64 round_half_even(double(x) * 2^frac_bits); sums wrap around.

The in-place ops (trailing underscore) refuse inputs that require grad: they are the executor's
buffers, outside autograd. `coupling_update` is the differentiable out-of-place form.

`use_kernels("aten")` (or REVENGINE_KERNELS=aten in the environment when revengine is imported)
replaces the custom CPU/CUDA kernels of every op, the MoE ops included, by their ATen references
(`revengine.reference`), for all callers including the C++ executor; `use_kernels("custom")` puts
the custom kernels back.
"""
import os

import torch

from . import _ext  # noqa: F401  (loads the C++ extension, which registers the ops)
from . import reference

__all__ = [
    "coupling_update",
    "coupling_update_",
    "coupling_inverse_",
    "affine_update_",
    "affine_inverse_",
    "fixed_quantize",
    "fixed_dequantize",
    "fixed_update_",
    "all_finite",
    "bdia_step_",
    "bdia_unstep_",
    "use_kernels",
    "kernels",
    "KERNELS_ENV",
]

KERNELS_ENV = "REVENGINE_KERNELS"

_ops = torch.ops.revengine
Tensor = torch.Tensor


def coupling_update(x: Tensor, f: Tensor, lam: float = 1.0) -> Tensor:
    """lam * x + f, fused (one rounding); differentiable in x and f."""
    return _ops.coupling_update(x, f, float(lam))


def coupling_update_(x: Tensor, f: Tensor, lam: float = 1.0) -> None:
    """x <- lam * x + f in place (an additive coupling's forward step)."""
    _ops.coupling_update_(x, f, float(lam))


def coupling_inverse_(y: Tensor, f: Tensor, lam: float = 1.0, check_finite: bool = True) -> Tensor:
    """y <- (y - f) / lam in place (the step's inverse). Returns a 0-dim bool tensor: whether every
    result is finite (always True when check_finite is False)."""
    return _ops.coupling_inverse_(y, f, float(lam), bool(check_finite))


def affine_update_(x: Tensor, scale: Tensor, shift: Tensor) -> None:
    """x <- x * scale + shift in place (an affine coupling's forward step, one rounding)."""
    _ops.affine_update_(x, scale, shift)


def affine_inverse_(y: Tensor, scale: Tensor, shift: Tensor, check_finite: bool = True) -> Tensor:
    """y <- (y - shift) / scale in place. Returns the all-finite flag as `coupling_inverse_` does."""
    return _ops.affine_inverse_(y, scale, shift, bool(check_finite))


def fixed_quantize(x: Tensor, frac_bits: int) -> Tensor:
    """int64 round_half_even(double(x) * 2^frac_bits) (the scaling is exact in double)."""
    return _ops.fixed_quantize(x, int(frac_bits))


def fixed_dequantize(q: Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """dtype(double(q) * 2^-frac_bits): the float value of a fixed-point int64 tensor."""
    return _ops.fixed_dequantize(q, int(frac_bits), dtype)


def fixed_update_(acc: Tensor, inc: Tensor, frac_bits: int, sign: int = 1) -> None:
    """acc += sign * round_half_even(double(inc) * 2^frac_bits) in place (int64, wrap-around).
    Adding and then subtracting the same inc restores acc bit for bit; a non-finite or
    out-of-range inc is an error naming the first bad index, and acc is left unchanged."""
    _ops.fixed_update_(acc, inc, int(frac_bits), int(sign))


def all_finite(x: Tensor) -> Tensor:
    """A 0-dim bool tensor: whether x holds no NaN or Inf (one pass, no temporaries)."""
    return _ops.all_finite(x)


def bdia_step_(u: Tensor, src: Tensor, inc: Tensor, sign: Tensor, frac_bits: int, shift: int) -> Tensor:
    """One exact BDIA step on fixed-point streams, in place; returns the dropped low bits.

    Per element of sample b (dim 0), with s = +-1 the sign of sign[b], k = shift, g = s 2^-k:
    q = round_half_even(double(inc) * (1 + g) 2^frac_bits) (one rounding), the k low bits of u are
    kept (packed 8/k to a byte for k = 1, 2, 4, else one a byte), and
    u <- s (u >> k) + src - s (src >> k) + q (wrap-around). `src` may alias `u`.
    """
    return _ops.bdia_step_(u, src, inc, sign, int(frac_bits), int(shift))


def bdia_unstep_(u: Tensor, src: Tensor, inc: Tensor, sign: Tensor, low: Tensor, frac_bits: int, shift: int) -> None:
    """The exact inverse of `bdia_step_` given its low bits: u <- ((s (u - q - src + s (src >> k))) << k) | low."""
    _ops.bdia_unstep_(u, src, inc, sign, low, int(frac_bits), int(shift))


def use_kernels(kind: str) -> None:
    """Selects the kernels of every `torch.ops.revengine` op on CPU and CUDA: "custom" (the C++/CUDA
    kernels, the default) or "aten" (the ATen references of `revengine.reference`: slower, but
    ordinary torch ops, a fallback when a custom kernel misbehaves on some GPU)."""
    if kind == "aten":
        reference.install()
    elif kind == "custom":
        reference.uninstall()
    else:
        raise ValueError(f"revengine.ops.use_kernels: kind must be 'custom' or 'aten', got {kind!r}")


def kernels() -> str:
    """The kernels in use: "custom" or "aten"."""
    return "aten" if reference.installed() else "custom"


def _kernels_from_env() -> None:
    kind = os.environ.get(KERNELS_ENV, "").strip().lower()
    if kind:
        try:
            use_kernels(kind)
        except ValueError:
            raise ValueError(f"{KERNELS_ENV}={kind!r}: expected 'custom' or 'aten'") from None


_kernels_from_env()
