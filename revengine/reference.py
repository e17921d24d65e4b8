"""ATen references of every `torch.ops.revengine.*` op: the same arithmetic contract as the custom
kernels (csrc/ops.cpp, csrc/moe_ops.cpp), written with ordinary torch ops, so they run on any
device. They are the yardstick of `revengine selftest` and the fallback when a custom kernel is
wrong on some GPU:

    REVENGINE_KERNELS=aten python train.py     # read when revengine is imported
    revengine.ops.use_kernels("aten")           # or switch at run time; "custom" switches back

The switch registers these functions as the CPU and CUDA kernels of the ops (torch.library),
overriding the C++ kernels for every caller, the C++ executor included (it calls the ops through
the dispatcher). The ops' C++ Autograd and ADInplaceOrView kernels stay in place, so autograd,
version counters and the no-grad checks of the in-place ops are unchanged. Argument checks run
through the ops' Meta kernels (the same checks and messages as the custom kernels).

Agreement with the custom kernels (tests/test_reference.py):
* bit for bit: the fixed-point ops, all_finite, bdia_step_/bdia_unstep_, moe_permute, moe_gather,
  and every op whose opmath is float32 (bfloat16/float16/float32 inputs): the fused multiply-add
  is computed in double and rounded to float32 through round-to-odd, which is exact;
* float64 inputs: coupling_update/affine_update round twice (no fma in torch), within 1 ulp;
  sums and matmuls (moe_*) may associate differently, within a few ulps of the opmath type.
"""
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _ext  # noqa: F401  (registers the ops whose kernels these replace)

Tensor = torch.Tensor

__all__ = [
    "REFERENCES",
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
    "moe_permute",
    "moe_gather",
    "moe_gather_backward",
    "moe_grouped_mm",
    "moe_grouped_mm_weight_grad",
    "moe_scatter_combine",
    "moe_scatter_combine_backward",
    "install",
    "uninstall",
    "installed",
]

_ops = torch.ops.revengine
_TWO62 = 2.0**62


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _meta(t: Tensor) -> Tensor:
    """A meta tensor with t's shape, strides and dtype (to run an op's Meta kernel: its checks)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fma_f32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 fma(a, b, c), correctly rounded, for float32 a, b, c of one shape.

    a * b is exact in double; the double sum is rounded to odd (the error of the round-to-nearest
    sum, from TwoSum, decides), and a round-to-odd double (53 >= 2 * 24 + 2 bits) rounds to float32
    exactly as the infinitely precise result would: one rounding, as the kernels' fma."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    fix = (err != 0) & torch.isfinite(err) & even
    if bool(fix.any()):
        s = torch.where(fix, torch.nextafter(s, torch.where(err > 0, torch.inf, -torch.inf).to(s.dtype)), s)
    return s.float()


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fma(a, b, c) in the operands' (opmath) dtype: exact for float32, two roundings for float64."""
    if a.dtype == torch.float32:
        return _fma_f32(a, b, c)
    return a * b + c  # torch has no fma: within 1 ulp of it


def _store(r: Tensor, dtype: torch.dtype) -> Tensor:
    """Rounds an opmath result once to dtype (a no-op for float32/float64)."""
    return r if r.dtype == dtype else r.to(dtype)


def _full(like: Tensor, value: float, dtype: torch.dtype) -> Tensor:
    # a full tensor, not a Python scalar: CUDA turns division by a scalar into a multiplication
    # by its reciprocal (not bit-exact)
    return torch.full(like.shape, value, dtype=dtype, device=like.device)


def _flag(ok: bool, like: Tensor) -> Tensor:
    return torch.tensor(bool(ok), device=like.device)


def _fixed_range_error(op: str, name: str, x: Tensor, v: Tensor, frac_bits: int, suffix: str = "") -> None:
    """Raises the kernels' error when some scaled value v is non-finite or |v| >= 2^62."""
    bad = (~torch.isfinite(v)) | (v.abs() >= _TWO62)
    nbad = int(bad.sum())
    if nbad == 0:
        return
    first = int(bad.reshape(-1).nonzero()[0, 0])
    value = float(x.reshape(-1)[first])
    raise RuntimeError(
        f"revengine::{op}: {nbad} of {x.numel()} elements of {name} are non-finite or out of the fixed-point "
        f"range (|{name}| * 2^{frac_bits} must be < 2^62); first bad value: {value!r} at flat index {first}{suffix}"
    )


def _rne_int64(v: Tensor) -> Tensor:
    """round_half_even of a double tensor (|v| < 2^62) as int64."""
    return torch.round(v).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# element-wise ops (csrc/ops.cpp)
# ---------------------------------------------------------------------------------------------
def coupling_update(x: Tensor, f: Tensor, lam: float) -> Tensor:
    """lam * x + f (fma in opmath, one rounding to x's dtype), a fresh contiguous tensor."""
    _ops.coupling_update(_meta(x), _meta(f), lam)
    om = _opmath(x.dtype)
    xo = x.to(om)
    r = _fma(_full(x, lam, om), xo, f.to(om))
    return _store(r, x.dtype).contiguous()


def coupling_update_(x: Tensor, f: Tensor, lam: float) -> None:
    """x <- lam * x + f in place."""
    _ops.coupling_update_(_meta(x), _meta(f), lam)
    om = _opmath(x.dtype)
    x.copy_(_store(_fma(_full(x, lam, om), x.to(om), f.to(om)), x.dtype))


def coupling_inverse_(y: Tensor, f: Tensor, lam: float, check_finite: bool) -> Tensor:
    """y <- (y - f) / lam in place; the flag: all stored results finite (or check_finite off)."""
    _ops.coupling_inverse_(_meta(y), _meta(f), lam, check_finite)
    om = _opmath(y.dtype)
    r = _store((y.to(om) - f.to(om)) / _full(y, lam, om), y.dtype)
    y.copy_(r)
    return _flag(not check_finite or bool(torch.isfinite(r).all()), y)


def _affine_operands(x: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    om = _opmath(x.dtype)
    if scale.dtype != shift.dtype:  # promoted first (exact), as the kernels do
        t = torch.promote_types(scale.dtype, shift.dtype)
        scale, shift = scale.to(t), shift.to(t)
    return scale.to(om), shift.to(om)


def affine_update_(x: Tensor, scale: Tensor, shift: Tensor) -> None:
    """x <- fma(x, scale, shift) in place."""
    _ops.affine_update_(_meta(x), _meta(scale), _meta(shift))
    sc, sh = _affine_operands(x, scale, shift)
    x.copy_(_store(_fma(x.to(sc.dtype), sc, sh), x.dtype))


def affine_inverse_(y: Tensor, scale: Tensor, shift: Tensor, check_finite: bool) -> Tensor:
    """y <- (y - shift) / scale in place; the all-finite flag as coupling_inverse_."""
    _ops.affine_inverse_(_meta(y), _meta(scale), _meta(shift), check_finite)
    sc, sh = _affine_operands(y, scale, shift)
    r = _store((y.to(sc.dtype) - sh) / sc, y.dtype)
    y.copy_(r)
    return _flag(not check_finite or bool(torch.isfinite(r).all()), y)


def fixed_quantize(x: Tensor, frac_bits: int) -> Tensor:
    """int64 round_half_even(double(x) * 2^frac_bits); an error for non-finite or out-of-range x."""
    _ops.fixed_quantize(_meta(x), frac_bits)
    v = x.double() * (2.0**frac_bits)
    _fixed_range_error("fixed_quantize", "x", x, v, frac_bits)
    return _rne_int64(v).contiguous()


def fixed_dequantize(q: Tensor, frac_bits: int, dtype: torch.dtype) -> Tensor:
    """dtype(double(q) * 2^-frac_bits), through float32 for bfloat16/float16 (as torch converts)."""
    _ops.fixed_dequantize(_meta(q), frac_bits, dtype)
    v = q.double() * (2.0**-frac_bits)
    if dtype in (torch.bfloat16, torch.float16):
        v = v.float()
    return v.to(dtype).contiguous()


def fixed_update_(acc: Tensor, inc: Tensor, frac_bits: int, sign: int) -> None:
    """acc += sign * round_half_even(double(inc) * 2^frac_bits) (wrap-around); a bad inc is an error
    that leaves acc unchanged."""
    _ops.fixed_update_(_meta(acc), _meta(inc), frac_bits, sign)
    v = inc.double() * (2.0**frac_bits)
    _fixed_range_error("fixed_update_", "inc", inc, v, frac_bits, " (acc was left unchanged)")
    q = _rne_int64(v)
    acc.copy_(acc + q if sign > 0 else acc - q)


def all_finite(x: Tensor) -> Tensor:
    """Whether x holds no NaN or Inf, a 0-dim bool tensor on x's device."""
    _ops.all_finite(_meta(x))
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    if not x.is_floating_point():
        return _flag(True, x)
    return torch.isfinite(x).all()


def _bdia_per_byte(shift: int) -> int:
    return 8 // shift if shift < 8 and 8 % shift == 0 else 1


def _bdia_q(u: Tensor, inc: Tensor, sign: Tensor, frac_bits: int, shift: int, op: str) -> Tuple[Tensor, Tensor]:
    """(q, neg): the rounded increments round_half_even(double(inc) (1 + s 2^-k) 2^frac_bits) shaped
    [B, inner], and per-sample "sign < 0" [B, 1]; a bad increment is the kernels' error."""
    g = 2.0**-shift
    neg = (sign < 0).view(-1, 1)
    scale = torch.where(
        neg,
        torch.tensor((1.0 - g) * 2.0**frac_bits, dtype=torch.float64, device=u.device),
        torch.tensor((1.0 + g) * 2.0**frac_bits, dtype=torch.float64, device=u.device),
    )
    v = inc.double().reshape(u.shape[0], -1) * scale
    _fixed_range_error(op, "inc * (1 + g)", inc, v, frac_bits, " (u was left unchanged)")
    return _rne_int64(v), neg


def bdia_step_(u: Tensor, src: Tensor, inc: Tensor, sign: Tensor, frac_bits: int, shift: int) -> Tensor:
    """One exact BDIA step in place (see revengine.ops.bdia_step_); returns the packed low bits."""
    low_meta = _ops.bdia_step_(_meta(u), _meta(src), _meta(inc), _meta(sign), frac_bits, shift)
    n = u.numel()
    if n == 0:
        return torch.empty(low_meta.shape, dtype=torch.uint8, device=u.device)
    k = shift
    q, neg = _bdia_q(u, inc, sign, frac_bits, shift, "bdia_step_")
    p = u.reshape(u.shape[0], -1)
    t = src.reshape(u.shape[0], -1)
    h = p >> k
    th = t >> k  # arithmetic shift: floor(t / 2^k)
    new = torch.where(neg, -h, h) + t - torch.where(neg, -th, th) + q  # int64: wraps around
    per = _bdia_per_byte(k)
    nbytes = low_meta.shape[0]
    bits = (p.reshape(-1) & ((1 << k) - 1)).to(torch.int32)
    bits = torch.nn.functional.pad(bits, (0, nbytes * per - n)).view(nbytes, per)
    offs = torch.arange(per, device=u.device, dtype=torch.int32) * k
    low = (bits << offs).sum(dim=1).to(torch.uint8)  # fields do not overlap: sum = or
    u.copy_(new.view(u.shape))
    return low


def bdia_unstep_(u: Tensor, src: Tensor, inc: Tensor, sign: Tensor, low: Tensor, frac_bits: int, shift: int) -> None:
    """The exact inverse of bdia_step_ given its low bits, in place."""
    _ops.bdia_unstep_(_meta(u), _meta(src), _meta(inc), _meta(sign), _meta(low), frac_bits, shift)
    n = u.numel()
    if n == 0:
        return
    k = shift
    q, neg = _bdia_q(u, inc, sign, frac_bits, shift, "bdia_unstep_")
    p = u.reshape(u.shape[0], -1)
    t = src.reshape(u.shape[0], -1)
    th = t >> k
    sh = p - q - t + torch.where(neg, -th, th)  # s (p >> k)
    h = torch.where(neg, -sh, sh)
    per = _bdia_per_byte(k)
    offs = torch.arange(per, device=u.device, dtype=torch.int32) * k
    bits = ((low.to(torch.int32).view(-1, 1) >> offs) & ((1 << k) - 1)).reshape(-1)[:n].to(torch.int64)
    u.copy_(((h << k) | bits.view_as(h)).view(u.shape))


# ---------------------------------------------------------------------------------------------
# MoE routing ops (csrc/moe_ops.cpp)
# ---------------------------------------------------------------------------------------------
def _inverse_permutation(op: str, sorted_slots: Tensor) -> Tensor:
    """pos[s] = i where sorted_slots[i] = s; an error unless sorted_slots is a permutation."""
    n = sorted_slots.numel()
    s = sorted_slots.reshape(-1)
    if n and bool(((s < 0) | (s >= n)).any()):
        i = int(((s < 0) | (s >= n)).nonzero()[0, 0])
        raise RuntimeError(
            f"revengine::{op}: sorted_slots[{i}] = {int(s[i])} is out of range [0, {n}); sorted_slots must be a "
            "permutation of the T*k slots (as returned by moe_permute)"
        )
    pos = torch.full((n,), -1, dtype=torch.int64, device=s.device)
    pos[s] = torch.arange(n, device=s.device)
    if n and bool((pos < 0).any()):
        raise RuntimeError(
            f"revengine::{op}: a slot appears twice in sorted_slots; sorted_slots must be a permutation of the "
            "T*k slots (as returned by moe_permute)"
        )
    return pos


def moe_permute(topk_ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """(sorted_slots, expert_offsets): the slots t*k+j stably sorted by expert, and the expert bounds."""
    _ops.moe_permute(_meta(topk_ids), num_experts)
    ids = topk_ids.reshape(-1).to(torch.int64)
    if ids.numel() and bool(((ids < 0) | (ids >= num_experts)).any()):
        i = int(((ids < 0) | (ids >= num_experts)).nonzero()[0, 0])
        k = topk_ids.shape[1]
        raise RuntimeError(
            f"revengine::moe_permute: topk_ids must be in [0, num_experts = {num_experts}), got {int(ids[i])} at "
            f"token {i // k}, choice {i % k} (flat index {i})"
        )
    slots = torch.sort(ids, stable=True).indices
    counts = torch.bincount(ids, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return slots, offsets


def moe_gather(x: Tensor, sorted_slots: Tensor, k: int) -> Tensor:
    """Row i = x[sorted_slots[i] // k]."""
    _ops.moe_gather(_meta(x), _meta(sorted_slots), k)
    n = sorted_slots.numel()
    if n and bool(((sorted_slots < 0) | (sorted_slots >= n)).any()):
        i = int(((sorted_slots < 0) | (sorted_slots >= n)).nonzero()[0, 0])
        raise RuntimeError(
            f"revengine::moe_gather: sorted_slots[{i}] = {int(sorted_slots[i])} is out of range [0, T*k = {n})"
        )
    return x.index_select(0, torch.div(sorted_slots, k, rounding_mode="floor")).contiguous()


def moe_gather_backward(grad_out: Tensor, sorted_slots: Tensor, k: int) -> Tensor:
    """dx[t] = sum_j grad_out[position of slot t*k+j] (j in order, opmath sums)."""
    _ops.moe_gather_backward(_meta(grad_out), _meta(sorted_slots), k)
    pos = _inverse_permutation("moe_gather_backward", sorted_slots)
    N, H = grad_out.shape
    g = grad_out.to(_opmath(grad_out.dtype))[pos].view(N // k if k else 0, k, H)
    return _store(_ordered_sum(g), grad_out.dtype).contiguous()


def _ordered_sum(g: Tensor) -> Tensor:
    """Sum over dim 1 in index order (the kernels' summation order), [T, k, H] -> [T, H]."""
    out = torch.zeros(g.shape[0], g.shape[2], dtype=g.dtype, device=g.device)
    for j in range(g.shape[1]):
        out = out + g[:, j]
    return out


def _offsets(op: str, expert_offsets: Tensor, n: int) -> List[int]:
    off = [int(v) for v in expert_offsets.tolist()]
    ok = off and off[0] == 0 and off[-1] == n and all(a <= b for a, b in zip(off, off[1:]))
    if not ok:
        raise RuntimeError(
            f"revengine::{op}: expert_offsets must be non-decreasing from 0 to {n} (as returned by moe_permute), got {off}"
        )
    return off


def moe_grouped_mm(x: Tensor, weight: Tensor, expert_offsets: Tensor) -> Tensor:
    """Rows [off[e], off[e+1]) of the result are x[rows] @ weight[e].T."""
    _ops.moe_grouped_mm(_meta(x), _meta(weight), _meta(expert_offsets))
    N, M = x.shape[0], weight.shape[1]
    off = _offsets("moe_grouped_mm", expert_offsets, N)
    out = torch.zeros(N, M, dtype=x.dtype, device=x.device)
    for e in range(weight.shape[0]):
        if off[e + 1] > off[e] and x.shape[1]:
            out[off[e] : off[e + 1]] = x[off[e] : off[e + 1]] @ weight[e].t()
    return out


def moe_grouped_mm_weight_grad(grad_out: Tensor, x: Tensor, expert_offsets: Tensor) -> Tensor:
    """dweight[e] = grad_out[rows].T @ x[rows] (zero for an expert without rows)."""
    _ops.moe_grouped_mm_weight_grad(_meta(grad_out), _meta(x), _meta(expert_offsets))
    N, K, M = x.shape[0], x.shape[1], grad_out.shape[1]
    E = expert_offsets.shape[0] - 1
    off = _offsets("moe_grouped_mm_weight_grad", expert_offsets, N)
    dw = torch.zeros(E, M, K, dtype=x.dtype, device=x.device)
    for e in range(E):
        if off[e + 1] > off[e]:
            dw[e] = grad_out[off[e] : off[e + 1]].t() @ x[off[e] : off[e + 1]]
    return dw


def moe_scatter_combine(y: Tensor, weights: Tensor, sorted_slots: Tensor, num_tokens: int) -> Tensor:
    """out[t] = sum_j weights[t, j] * y[position of slot t*k+j] (opmath, j in order)."""
    _ops.moe_scatter_combine(_meta(y), _meta(weights), _meta(sorted_slots), num_tokens)
    pos = _inverse_permutation("moe_scatter_combine", sorted_slots)
    T, k = weights.shape
    H = y.shape[1]
    om = _opmath(y.dtype)
    yo = y.to(om)[pos].view(T, k, H)
    return _store(_ordered_sum(yo * weights.to(om).unsqueeze(-1)), y.dtype).contiguous()


def moe_scatter_combine_backward(grad_out: Tensor, y: Tensor, weights: Tensor, sorted_slots: Tensor) -> Tuple[Tensor, Tensor]:
    """(dy, dweights): dy[position of t*k+j] = weights[t, j] grad_out[t], dweights[t, j] = <grad_out[t], y[...]>."""
    _ops.moe_scatter_combine_backward(_meta(grad_out), _meta(y), _meta(weights), _meta(sorted_slots))
    pos = _inverse_permutation("moe_scatter_combine_backward", sorted_slots)
    T, k = weights.shape
    H = y.shape[1]
    om = _opmath(y.dtype)
    g = grad_out.to(om).view(T, 1, H)
    w = weights.to(om)
    dy_sorted = torch.empty(T * k, H, dtype=y.dtype, device=y.device)
    dy_sorted[pos] = (w.unsqueeze(-1) * g).reshape(T * k, H).to(y.dtype)
    dw = (g * y.to(om)[pos].view(T, k, H)).sum(-1)
    return dy_sorted, dw.to(weights.dtype)


REFERENCES: Dict[str, Callable] = {
    name: globals()[name] for name in __all__ if name not in ("REFERENCES", "install", "uninstall", "installed")
}

# ---------------------------------------------------------------------------------------------
# the switch (revengine.ops.use_kernels is the public surface)
# ---------------------------------------------------------------------------------------------
_DEVICES: Sequence[str] = ("CPU", "CUDA")
_lib: Optional[torch.library.Library] = None


def install(names: Optional[Sequence[str]] = None) -> None:
    """Registers the references as the CPU and CUDA kernels of the ops `names` (default: all),
    replacing an earlier install."""
    global _lib
    uninstall()
    lib = torch.library.Library("revengine", "IMPL")
    with warnings.catch_warnings():
        # "Overriding a previously registered kernel": the point of the switch
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for name in names if names is not None else REFERENCES:
            for dev in _DEVICES:
                lib.impl(name, REFERENCES[name], dev)
    _lib = lib


def uninstall() -> None:
    """Removes the registrations of `install`: the custom C++/CUDA kernels are in place again."""
    global _lib
    if _lib is not None:
        _lib._destroy()
        _lib = None


def installed() -> bool:
    """Whether the references currently replace the custom kernels."""
    return _lib is not None
