import os

import torch

if os.environ.get("REVENGINE_OPS_DEV_LIB"):
    # Development only: a throwaway build of csrc/ops.cpp alone (see the ops.cpp header).
    torch.ops.load_library(os.environ["REVENGINE_OPS_DEV_LIB"])
else:
    import revengine  # noqa: F401  (loads the extension that registers torch.ops.revengine)

import itertools
from fractions import Fraction

import pytest
from torch.library import opcheck

R = torch.ops.revengine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
PAIRS = list(itertools.product(FLOATS, FLOATS))  # (x dtype, operand dtype)
PAIR_IDS = [f"{str(a).split('.')[1]}-{str(b).split('.')[1]}" for a, b in PAIRS]
DTYPE_IDS = [str(d).split(".")[1] for d in FLOATS]

# (precision bits incl. the implicit one, smallest normal exponent)
PREC = {torch.float32: (24, -126), torch.float64: (53, -1022), torch.bfloat16: (8, -126), torch.float16: (11, -14)}
GRAIN = 32768
BIG = 300_000  # > grain: exercises the parallel path


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def lam_op(lam, dtype):
    """lam as the kernel uses it: converted to the opmath type of x."""
    return lam if dtype == torch.float64 else float(torch.tensor(lam, dtype=torch.float32))


def ulp(t):
    """Spacing of t's dtype at |t| (t finite)."""
    p, emin = PREC[t.dtype]
    r = t.double().abs()
    _, e = torch.frexp(r)  # r = m 2^e, m in [0.5, 1)
    e = torch.where(r == 0, torch.full_like(e, emin), e - 1).clamp(min=emin)
    return torch.ldexp(torch.ones_like(r), e - (p - 1))


def assert_within_ulp(out, ref64, dtype, n=1):
    """out (dtype) is within n ulp of the float64 reference rounded to dtype."""
    assert out.dtype == dtype
    ref = ref64.to(dtype).to(out.device)
    out64, r64 = out.double(), ref.double()
    both_nan = out64.isnan() & r64.isnan()
    same = (out64 == r64) | both_nan
    close = (out64 - r64).abs() <= n * ulp(ref)
    bad = ~(same | close)
    assert not bad.any(), (
        f"{int(bad.sum())} elements differ by more than {n} ulp; e.g. out={out64[bad][:5].tolist()} "
        f"ref={r64[bad][:5].tolist()}"
    )


def exact(fn, *tensors):
    """fn evaluated exactly (rational arithmetic) elementwise, rounded once to float64."""
    cols = [t.double().cpu().flatten().tolist() for t in tensors]
    vals = [float(fn(*map(Fraction, row))) for row in zip(*cols)]
    return torch.tensor(vals, dtype=torch.float64).reshape(tensors[0].shape)


def randn(shape, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def rand_positive(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(dtype).to(device)


def bits(t):
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


# ------------------------------------------------------------------------------------------
# Float ops against plain-torch references
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt,fdt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("lam", [0.75, -1.3])
def test_coupling_update_reference(device, xdt, fdt, lam):
    x = randn((37, 29), xdt, device, 1)
    f = randn((37, 29), fdt, device, 2)
    lo = Fraction(lam_op(lam, xdt))
    ref = exact(lambda a, b: lo * a + b, x, f.to(opmath(xdt)))
    out = R.coupling_update(x, f, lam)
    assert out.shape == x.shape and out.dtype == xdt and out.device == x.device
    assert_within_ulp(out, ref, xdt)
    y = x.clone()
    assert R.coupling_update_(y, f, lam) is None
    assert torch.equal(bits(y), bits(out)), "in-place and out-of-place results differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt,fdt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("lam", [0.75, -1.3])
def test_coupling_inverse_reference(device, xdt, fdt, lam):
    y = randn((41, 13), xdt, device, 3)
    f = randn((41, 13), fdt, device, 4)
    lo = Fraction(lam_op(lam, xdt))
    ref = exact(lambda a, b: (a - b) / lo, y, f.to(opmath(xdt)))
    flag = R.coupling_inverse_(y, f, lam, True)
    assert flag.dtype == torch.bool and flag.dim() == 0 and flag.device == y.device and bool(flag)
    assert_within_ulp(y, ref, xdt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt,sdt", PAIRS, ids=PAIR_IDS)
def test_affine_reference(device, xdt, sdt):
    x = randn((23, 31), xdt, device, 5)
    scale = rand_positive((23, 31), sdt, device, 6)
    shift = randn((23, 31), sdt, device, 7)
    om = opmath(xdt)
    s_op, h_op = scale.to(om), shift.to(om)
    ref = exact(lambda a, b, c: a * b + c, x, s_op, h_op)
    y = x.clone()
    assert R.affine_update_(y, scale, shift) is None
    assert_within_ulp(y, ref, xdt)
    ref_inv = exact(lambda a, b, c: (a - c) / b, y, s_op, h_op)
    flag = R.affine_inverse_(y, scale, shift, True)
    assert bool(flag)
    assert_within_ulp(y, ref_inv, xdt)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_mixed_scale_shift_dtypes(device):
    x = randn((100,), torch.float32, device, 8)
    scale = rand_positive((100,), torch.bfloat16, device, 9)
    shift = randn((100,), torch.float16, device, 10)
    ref = exact(lambda a, b, c: a * b + c, x, scale, shift)
    y = x.clone()
    R.affine_update_(y, scale, shift)
    assert_within_ulp(y, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt,fdt", PAIRS, ids=PAIR_IDS)
def test_coupling_round_trip(device, xdt, fdt):
    x = randn((64, 33), xdt, device, 11)
    f = randn((64, 33), fdt, device, 12)
    y = x.clone()
    R.coupling_update_(y, f, 0.9)
    assert bool(R.coupling_inverse_(y, f, 0.9, True))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3}[xdt]
    torch.testing.assert_close(y.double(), x.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_inverse_finite_flag(device, xdt, bad):
    y0 = randn((BIG,), xdt, device, 14)
    f = randn((BIG,), xdt, device, 15)
    for pos in (0, GRAIN + 5, BIG - 1):  # first chunk, a middle chunk, the last element
        fb = f.clone()
        fb[pos] = bad
        y = y0.clone()
        assert not bool(R.coupling_inverse_(y, fb, 0.5, True))
        y = y0.clone()
        assert bool(R.coupling_inverse_(y, fb, 0.5, False)), "check_finite=False must return true"
        scale = torch.ones_like(y0)
        y = y0.clone()
        assert not bool(R.affine_inverse_(y, scale, fb, True))
        assert bool(R.affine_inverse_(y0.clone(), scale, fb, False))
    # finite inputs, clean flag
    assert bool(R.coupling_inverse_(y0.clone(), f, 0.5, True))


@pytest.mark.parametrize("device", DEVICES)
def test_flag_reports_overflow_of_the_final_rounding(device):
    # 60000 / 0.5 = 120000 is finite in float (the opmath type) but overflows float16.
    y = torch.full((10,), 60000.0, dtype=torch.float16, device=device)
    f = torch.zeros(10, dtype=torch.float16, device=device)
    assert not bool(R.coupling_inverse_(y, f, 0.5, True))
    assert torch.isinf(y).all()
    scale = torch.full((10,), 1e-10, dtype=torch.float32, device=device)
    y = torch.full((10,), 1e30, device=device)  # 1e40 overflows float32
    assert not bool(R.affine_inverse_(y, scale, torch.zeros(10, device=device), True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_conversions_match_torch(device, dt):
    # float -> dt rounding: x = 0, lam = 1, f = arbitrary float32 bit patterns: r = f exactly.
    g = torch.Generator().manual_seed(16)
    fb = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    # values near the half / bfloat16 rounding boundaries (ties, overflow, subnormal range)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 1 + 2.0**-11,
                          1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.3895e38, 3.4e38, 1e-40, -0.0])
    f = torch.cat([fb.view(torch.float32), edges, -edges]).to(device)
    f = f[~f.isnan()]
    x = torch.zeros(f.shape, dtype=dt, device=device)
    R.coupling_update_(x, f, 1.0)
    ref = f.to(dt)
    ref = torch.where(f == 0, torch.zeros_like(ref), ref)  # 0 * 1 + (-0) is +0
    assert torch.equal(bits(x), bits(ref))
    # dt -> float: every bit pattern, x * 1 + 0 (finite values; -0 becomes +0)
    allbits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dt).to(device)
    finite = allbits[torch.isfinite(allbits)]
    y = finite.clone()
    R.coupling_update_(y, torch.zeros_like(finite, dtype=torch.float32), 1.0)
    ref = torch.where(finite == 0, torch.zeros_like(finite), finite)
    assert torch.equal(bits(y), bits(ref))
    # all_finite on every finite bit pattern, and with each kind of non-finite one
    assert bool(R.all_finite(finite))
    for special in allbits[~torch.isfinite(allbits)][::97]:
        assert not bool(R.all_finite(torch.cat([finite[:100], special.reshape(1)])))


# ------------------------------------------------------------------------------------------
# Fixed point
# ------------------------------------------------------------------------------------------
def quantize_ref(x, frac_bits):
    return torch.round(x.double().cpu() * 2.0**frac_bits).to(torch.int64)  # round half to even


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("frac_bits", [0, 8, 40])
def test_fixed_quantize_reference(device, xdt, frac_bits):
    x = randn((BIG,), xdt, device, 17, scale=3.0)
    q = R.fixed_quantize(x, frac_bits)
    assert q.dtype == torch.int64 and q.shape == x.shape and q.device == x.device
    assert torch.equal(q.cpu(), quantize_ref(x, frac_bits))


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_quantize_round_half_even_full_range(device):
    g = torch.Generator().manual_seed(18)
    # log-uniform magnitudes over [2^-3, 2^62), both signs, plus ties and 2^52 neighbourhood
    e = torch.rand(200_000, generator=g, dtype=torch.float64) * 65 - 3
    v = torch.exp2(e) * torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0).double()
    v = v[v.abs() < 2.0**62]
    k = torch.randint(-(2**40), 2**40, (10_000,), generator=g, dtype=torch.int64).double()
    specials = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.0**52 - 0.5, 2.0**52 - 1.5, 2.0**52, 2.0**52 + 1,
                             2.0**53 - 1, 2.0**53 + 2, 2.0**62 - 1024, -(2.0**62 - 1024), 2.0**51 + 0.5, -0.0,
                             4503599627370495.5, -4503599627370495.5], dtype=torch.float64)
    x = torch.cat([v, k + 0.5, k - 0.5, specials]).to(device)
    assert torch.equal(R.fixed_quantize(x, 0).cpu(), quantize_ref(x, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("odt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("frac_bits", [0, 16, 52])
def test_fixed_dequantize_reference(device, odt, frac_bits):
    g = torch.Generator().manual_seed(19)
    q = torch.cat([
        torch.randint(-(2**62), 2**62, (BIG,), generator=g, dtype=torch.int64),
        torch.randint(-(2**20), 2**20, (1000,), generator=g, dtype=torch.int64),
        torch.tensor([0, 1, -1, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63), 2**62 - 1], dtype=torch.int64),
    ]).to(device)
    out = R.fixed_dequantize(q, frac_bits, odt)
    assert out.dtype == odt and out.shape == q.shape and out.device == q.device
    ref = (q.cpu().double() * 2.0**-frac_bits).to(odt)
    assert torch.equal(bits(out.cpu()), bits(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
def test_quantize_dequantize_round_trip_exact(device, xdt):
    frac_bits = 12
    p, _ = PREC[xdt]
    g = torch.Generator().manual_seed(20)
    k = torch.randint(-(2 ** (p - 1)), 2 ** (p - 1), (5000,), generator=g, dtype=torch.int64)
    x = (k.double() * 2.0**-frac_bits).to(xdt).to(device)  # exactly representable in xdt
    q = R.fixed_quantize(x, frac_bits)
    assert torch.equal(q.cpu(), k)
    assert torch.equal(R.fixed_dequantize(q, frac_bits, xdt), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
def test_fixed_update_restores_bit_for_bit(device, xdt):
    frac_bits = 32
    g = torch.Generator().manual_seed(21)
    acc0 = torch.randint(-(2**61), 2**61, (BIG,), generator=g, dtype=torch.int64).to(device)
    inc = randn((BIG,), xdt, device, 22, scale=10.0)
    acc = acc0.clone()
    assert R.fixed_update_(acc, inc, frac_bits, 1) is None
    assert torch.equal(acc.cpu(), acc0.cpu() + quantize_ref(inc, frac_bits))
    R.fixed_update_(acc, inc, frac_bits, -1)
    assert torch.equal(acc, acc0)
    # int64 wrap-around is undone exactly too
    accw = torch.full((4,), 2**63 - 1, dtype=torch.int64, device=device)
    incw = torch.full((4,), 1.0, dtype=xdt, device=device)
    R.fixed_update_(accw, incw, 0, 1)
    R.fixed_update_(accw, incw, 0, -1)
    assert torch.equal(accw, torch.full((4,), 2**63 - 1, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fixed_update_non_finite_raises_and_leaves_acc(device, bad, contiguous):
    base = torch.arange(BIG, dtype=torch.int64, device=device).reshape(600, 500)
    acc = base if contiguous else base.t()
    before = acc.clone()
    inc = torch.ones(acc.shape, dtype=torch.float32, device=device)
    inc[3, 7] = bad
    inc[-1, -1] = bad
    with pytest.raises(RuntimeError, match=r"fixed_update_: 2 of 300000 elements of inc are non-finite") as ei:
        R.fixed_update_(acc, inc, 20, 1)
    assert str(bad) in str(ei.value) and "first bad value" in str(ei.value)
    assert torch.equal(acc, before), "acc must be left unchanged on error"


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_quantize_errors(device):
    x = torch.tensor([1.0, float("nan"), 2.0, float("-inf")], device=device)
    with pytest.raises(RuntimeError, match=r"fixed_quantize: 2 of 4 elements of x are non-finite.*first bad value: nan"):
        R.fixed_quantize(x, 10)
    with pytest.raises(RuntimeError, match=r"1 of 2 elements.*2\^62.*first bad value: 4294967296"):
        R.fixed_quantize(torch.tensor([1.0, 2.0**32], dtype=torch.float64, device=device), 30)
    # just below the limit is fine
    assert R.fixed_quantize(torch.tensor([2.0**61], dtype=torch.float64, device=device), 0).item() == 2**61
    with pytest.raises(RuntimeError, match="frac_bits"):
        R.fixed_quantize(x, -1)
    with pytest.raises(RuntimeError, match="must be float32, float64, bfloat16 or float16"):
        R.fixed_quantize(torch.ones(3, dtype=torch.int32, device=device), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_argument_errors(device):
    acc = torch.zeros(5, dtype=torch.int64, device=device)
    inc = torch.ones(5, device=device)
    with pytest.raises(RuntimeError, match=r"sign must be \+1 or -1, got 2"):
        R.fixed_update_(acc, inc, 8, 2)
    with pytest.raises(RuntimeError, match="acc must be an int64 tensor"):
        R.fixed_update_(acc.int(), inc, 8, 1)
    with pytest.raises(RuntimeError, match=r"inc must have the same shape as acc.*\[4\].*\[5\]"):
        R.fixed_update_(acc, inc[:4], 8, 1)
    with pytest.raises(RuntimeError, match="q must be an int64 tensor"):
        R.fixed_dequantize(inc, 8, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32"):
        R.fixed_dequantize(acc, 8, torch.int32)


# ------------------------------------------------------------------------------------------
# Argument checking
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_shape_mismatch_and_lam_errors(device):
    x = torch.randn(4, 5, device=device)
    f = torch.randn(5, 4, device=device)
    shape_msg = r"f must have the same shape as x \(no broadcasting\), got f of shape \[5, 4\] and x of shape \[4, 5\]"
    with pytest.raises(RuntimeError, match=shape_msg):
        R.coupling_update(x, f, 0.5)
    with pytest.raises(RuntimeError, match=shape_msg):
        R.coupling_update_(x, f, 0.5)
    with pytest.raises(RuntimeError, match=shape_msg):
        R.coupling_inverse_(x, f, 0.5, True)
    with pytest.raises(RuntimeError, match=r"f must have the same shape as x"):
        R.coupling_update(x, torch.randn(5, device=device), 0.5)  # no broadcasting
    with pytest.raises(RuntimeError, match=r"scale must have the same shape as x"):
        R.affine_update_(x, f, x)
    with pytest.raises(RuntimeError, match=r"shift must have the same shape as x"):
        R.affine_inverse_(x, x, f, True)
    with pytest.raises(RuntimeError, match="lam must be non-zero"):
        R.coupling_inverse_(x, x.clone(), 0.0, True)
    with pytest.raises(RuntimeError, match="lam must be finite"):
        R.coupling_inverse_(x, x.clone(), float("inf"), True)
    with pytest.raises(RuntimeError, match="not representable as a non-zero finite float32"):
        R.coupling_inverse_(x, x.clone(), 1e-60, True)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16, got Int"):
        R.coupling_update_(torch.ones(3, dtype=torch.int32, device=device), torch.ones(3, device=device), 1.0)
    with pytest.raises(RuntimeError, match="f must be float32, float64, bfloat16 or float16, got Long"):
        R.coupling_update(torch.ones(3, device=device), torch.ones(3, dtype=torch.int64, device=device), 1.0)


def test_device_mismatch():
    x = torch.randn(3)
    f = torch.randn(3, device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        R.coupling_update_(x, f, 0.5)
    with pytest.raises(RuntimeError, match="same device"):
        R.coupling_update(f, x, 0.5)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="same device"):
            R.coupling_update_(x, torch.randn(3, device="cuda"), 0.5)


# ------------------------------------------------------------------------------------------
# Layouts, aliasing, parallelism
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_writes_through(device, xdt):
    base = randn((50, 70), xdt, device, 23)
    view = base.t()  # (70, 50), not contiguous
    f = randn((70, 50), torch.float32, device, 24).t().contiguous().t()  # also non-contiguous
    expect = R.coupling_update(view.contiguous(), f.contiguous(), 0.7)
    R.coupling_update_(view, f, 0.7)
    assert torch.equal(base.t(), expect)
    expect_inv = view.contiguous()
    flag_ref = R.coupling_inverse_(expect_inv, f.contiguous(), 0.7, True)
    flag = R.coupling_inverse_(view, f, 0.7, True)
    assert bool(flag) == bool(flag_ref) and torch.equal(base.t(), expect_inv)
    scale = rand_positive((70, 50), xdt, device, 25)
    shift = randn((70, 50), xdt, device, 26)
    expect = view.contiguous()
    R.affine_update_(expect, scale, shift)
    R.affine_update_(view, scale[:, :], shift)
    assert torch.equal(base.t(), expect)
    R.affine_inverse_(expect, scale, shift, True)
    R.affine_inverse_(view, scale, shift, True)
    assert torch.equal(base.t(), expect)
    # strided slices
    base2 = randn((200,), xdt, device, 27)
    sl = base2[::2]
    expect = R.coupling_update(sl.contiguous(), torch.ones(100, device=device), 2.0)
    R.coupling_update_(sl, torch.ones(100, device=device), 2.0)
    assert torch.equal(base2[::2], expect)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_update_non_contiguous_acc(device):
    base = torch.zeros(30, 40, dtype=torch.int64, device=device)
    inc = randn((40, 30), torch.float32, device, 28)
    R.fixed_update_(base.t(), inc, 16, 1)
    assert torch.equal(base.t().cpu(), quantize_ref(inc, 16))


@pytest.mark.parametrize("device", DEVICES)
def test_aliasing_operands(device):
    # f is x itself: element-for-element aliasing
    x = randn((1000,), torch.float32, device, 29)
    expect = R.coupling_update(x, x.clone(), 0.5)
    R.coupling_update_(x, x, 0.5)
    assert torch.equal(x, expect)
    # f partially overlaps x (shifted by one element): must behave as if f were read first
    buf = randn((GRAIN * 2 + 10,), torch.float64, device, 30)
    x, f = buf[1:], buf[:-1]
    expect = R.coupling_update(x.clone(), f.clone(), 0.5)
    R.coupling_update_(x, f, 0.5)
    assert torch.equal(x, expect)
    buf = randn((1000,), torch.float64, device, 31)
    y, f = buf[:-1], buf[1:]
    expect = y.clone()
    R.coupling_inverse_(expect, f.clone(), 3.0, True)
    R.coupling_inverse_(y, f, 3.0, True)
    assert torch.equal(y, expect)
    # written-to tensor with internal overlap is rejected
    with pytest.raises(RuntimeError, match="single memory location"):
        R.coupling_update_(torch.zeros(1, device=device).expand(10), torch.ones(10, device=device), 1.0)


def _all_ops_big(device, xdt):
    x = randn((BIG,), xdt, device, 32)
    f = randn((BIG,), torch.float32, device, 33)
    s = rand_positive((BIG,), xdt, device, 34)
    out = {}
    out["upd"] = R.coupling_update(x, f, 0.6)
    y = x.clone()
    out["inv_flag"] = R.coupling_inverse_(y, f, 0.6, True)
    out["inv"] = y
    y = x.clone()
    R.affine_update_(y, s, f.to(xdt))
    out["aff"] = y.clone()
    out["aff_flag"] = R.affine_inverse_(y, s, f.to(xdt), True)
    out["affinv"] = y
    out["q"] = R.fixed_quantize(x, 30)
    out["dq"] = R.fixed_dequantize(out["q"] * 7, 30, xdt)
    acc = torch.zeros(BIG, dtype=torch.int64, device=device)
    R.fixed_update_(acc, x, 30, -1)
    out["acc"] = acc
    out["fin"] = R.all_finite(x)
    return x, f, s, out


def _same(a, b):
    if a.is_floating_point():
        return torch.equal(bits(a), bits(b))
    return torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xdt", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_large_tensors_match_small_chunks_and_thread_counts(device, xdt):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x, f, s, one = _all_ops_big(device, xdt)
        torch.set_num_threads(max(2, threads))
        _, _, _, many = _all_ops_big(device, xdt)
    finally:
        torch.set_num_threads(threads)
    for k in one:
        assert _same(one[k], many[k]), f"{k} differs between 1 and {max(2, threads)} threads"
    # the same results computed on small pieces (each well below the grain size)
    pieces = [slice(i, min(i + 1000, BIG)) for i in range(0, BIG, 1000)]
    upd = torch.cat([R.coupling_update(x[p], f[p], 0.6) for p in pieces])
    assert _same(upd, many["upd"])
    y = x.clone()
    for p in pieces:
        R.coupling_inverse_(y[p], f[p], 0.6, True)
    assert _same(y, many["inv"])
    y = x.clone()
    for p in pieces:
        R.affine_update_(y[p], s[p], f[p].to(xdt))
    assert _same(y, many["aff"])
    q = torch.cat([R.fixed_quantize(x[p], 30) for p in pieces])
    assert _same(q, many["q"])
    acc = torch.zeros(BIG, dtype=torch.int64, device=device)
    for p in pieces:
        R.fixed_update_(acc[p], x[p], 30, -1)
    assert _same(acc, many["acc"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", FLOATS + [torch.int32, torch.bool, torch.complex64], ids=str)
def test_all_finite(device, dt):
    x = torch.ones(BIG, dtype=dt, device=device)
    assert bool(R.all_finite(x)) and R.all_finite(x).dtype == torch.bool and R.all_finite(x).dim() == 0
    assert bool(R.all_finite(torch.empty(0, dtype=dt, device=device)))
    if dt.is_floating_point or dt.is_complex:
        for pos in (0, GRAIN * 3 + 1, BIG - 1):
            for bad in (float("nan"), float("inf"), -float("inf")):
                y = x.clone()
                y[pos] = bad
                assert not bool(R.all_finite(y))
                assert not bool(R.all_finite(y[::3] if pos % 3 == 0 else y[pos:]))  # non-contiguous too
    if dt.is_complex:
        y = x.clone()
        y[5] = complex(1.0, float("inf"))
        assert not bool(R.all_finite(y.conj()))


# ------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_coupling_update(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    f = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: R.coupling_update(a, b, -0.7), (x, f))
    assert torch.autograd.gradgradcheck(lambda a, b: R.coupling_update(a, b, -0.7), (x, f))


@pytest.mark.parametrize("device", DEVICES)
def test_coupling_update_grad_dtypes(device):
    x = torch.randn(6, device=device, requires_grad=True)
    f = torch.randn(6, device=device).bfloat16().requires_grad_()
    out = R.coupling_update(x, f, 0.25)
    assert out.dtype == torch.float32 and out.requires_grad
    g = torch.randn(6, device=device)
    out.backward(g)
    assert torch.equal(x.grad, g * 0.25)
    assert f.grad.dtype == torch.bfloat16 and torch.equal(f.grad, g.bfloat16())
    # only f requires grad
    x2 = torch.randn(6, device=device)
    f2 = torch.randn(6, device=device, requires_grad=True)
    (gf,) = torch.autograd.grad(R.coupling_update(x2, f2, 3.0).sum(), f2)
    assert torch.equal(gf, torch.ones(6, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_non_differentiable_ops_refuse_grad(device):
    x = torch.randn(8, device=device, requires_grad=True)
    f = torch.randn(8, device=device)
    with pytest.raises(RuntimeError, match=r"revengine::coupling_update_ is not differentiable; it is used by the "
                                           r"reversible executor under no_grad"):
        R.coupling_update_(x, f, 0.5)
    for call in (lambda: R.coupling_inverse_(f.clone(), x, 0.5, True),
                 lambda: R.affine_update_(f.clone(), x, f),
                 lambda: R.affine_inverse_(f.clone(), f.abs() + 1, x, True),
                 lambda: R.fixed_quantize(x, 8),
                 lambda: R.fixed_update_(torch.zeros(8, dtype=torch.int64, device=device), x, 8, 1)):
        with pytest.raises(RuntimeError, match="is not differentiable"):
            call()
    # under no_grad they work, and the mutated tensor's version counter moves like aten in-place ops
    with torch.no_grad():
        v = x._version
        R.coupling_update_(x, f, 0.5)
        assert x._version > v
        v = x._version
        assert bool(R.coupling_inverse_(x, f, 0.5, True))
        assert x._version > v
        R.fixed_quantize(x, 8)
    # all_finite is fine on tensors that require grad (checking parameters)
    assert bool(R.all_finite(x))
    # inference_mode: normal tensors still get their version bumped (as with aten in-place ops),
    # inference tensors work
    x2 = torch.randn(8, device=device)
    v, v_aten = x2._version, torch.randn(8)._version
    with torch.inference_mode():
        R.coupling_update_(x2, f, 0.5)
        t = torch.randn(8, device=device)
        R.coupling_update_(t, f, 0.5)
        R.affine_inverse_(t, f.abs() + 1, f, True)
        R.fixed_update_(torch.zeros(8, dtype=torch.int64, device=device), t, 8, 1)
    assert x2._version > v and v_aten == 0


# ------------------------------------------------------------------------------------------
# bdia_step_ / bdia_unstep_: one exact BDIA layer, fused (csrc/ops.cpp's contract)
# ------------------------------------------------------------------------------------------
SHIFTS = [1, 2, 3, 4, 5, 6, 7, 8]


def bdia_reference(u, src, inc, sign, frac_bits, k):
    """(u after the step, the packed low bytes), in exact torch int64 / float64 arithmetic."""
    s = sign.view((-1,) + (1,) * (u.dim() - 1))
    g = 2.0**-k
    factor = torch.where(s < 0, (1 - g) * 2.0**frac_bits, (1 + g) * 2.0**frac_bits).double()
    q = torch.round(inc.double() * factor).long()
    out = s * (u >> k) + src - s * (src >> k) + q
    low = (u & ((1 << k) - 1)).reshape(-1)
    per = 8 // k if (k < 8 and 8 % k == 0) else 1
    low = torch.cat([low, low.new_zeros((-low.numel()) % per)]).view(-1, per)
    packed = sum(low[:, j] << (j * k) for j in range(per))
    return out, packed.to(torch.uint8)


def bdia_operands(shape, inc_dtype, device, seed, bits=40):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-(2**bits), 2**bits, shape, generator=g, dtype=torch.int64)
    src = torch.randint(-(2**bits), 2**bits, shape, generator=g, dtype=torch.int64)
    inc = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(inc_dtype)
    sign = torch.randint(0, 2, (shape[0],), generator=g, dtype=torch.int64) * 2 - 1
    return [t.to(device) for t in (u, src, inc, sign)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", SHIFTS)
def test_bdia_step_reference_and_exact_inverse(device, dt, k):
    # an odd element count: the last byte of low is partly used; B = 3 samples of 7*5 elements
    for shape, frac in (((3, 7, 5), 24), ((2, 1), 0), ((4, BIG // 4 + 1), 16)):
        u, src, inc, sign = bdia_operands(shape, dt, device, 60 + k)
        u0 = u.clone()
        out, low_ref = bdia_reference(u.cpu(), src.cpu(), inc.cpu(), sign.cpu(), frac, k)
        low = R.bdia_step_(u, src, inc, sign, frac, k)
        assert low.dtype == torch.uint8 and low.device == u.device
        assert torch.equal(u.cpu(), out) and torch.equal(low.cpu(), low_ref)
        R.bdia_unstep_(u, src, inc, sign, low, frac, k)
        assert torch.equal(u, u0)


@pytest.mark.parametrize("device", DEVICES)
def test_bdia_step_layouts_and_aliasing(device):
    u, src, inc, sign = bdia_operands((4, 6, 10), torch.float32, device, 70)
    out, low_ref = bdia_reference(u.cpu(), src.cpu(), inc.cpu(), sign.cpu(), 24, 2)
    # non-contiguous u (a copy written back) and operands
    big = torch.zeros(4, 6, 20, dtype=torch.int64, device=device)
    ut = big[:, :, ::2]
    ut.copy_(u)
    low = R.bdia_step_(ut, src.transpose(1, 2).contiguous().transpose(1, 2), inc.transpose(0, 1).contiguous()
                       .transpose(0, 1), sign, 24, 2)
    assert torch.equal(ut.cpu(), out) and torch.equal(low.cpu(), low_ref) and not big[:, :, 1::2].any()
    R.bdia_unstep_(ut, src, inc, sign, low, 24, 2)
    assert torch.equal(ut, u)
    # src may be u itself (element-for-element aliasing)
    a = u.clone()
    out, low_ref = bdia_reference(u.cpu(), u.cpu(), inc.cpu(), sign.cpu(), 24, 3)
    low = R.bdia_step_(a, a, inc, sign, 24, 3)
    assert torch.equal(a.cpu(), out) and torch.equal(low.cpu(), low_ref)
    # every sign value below 0 is -1, every other one +1
    s2 = torch.tensor([-7, 0, 5, -1], dtype=torch.int64, device=device)
    a = u.clone()
    out, _ = bdia_reference(u.cpu(), src.cpu(), inc.cpu(), torch.tensor([-1, 1, 1, -1]), 24, 4)
    R.bdia_step_(a, src, inc, s2, 24, 4)
    assert torch.equal(a.cpu(), out)
    # empty samples: nothing to do
    e = torch.empty(2, 0, dtype=torch.int64, device=device)
    assert R.bdia_step_(e, e, torch.empty(2, 0, device=device), sign[:2], 24, 4).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["step", "unstep"])
def test_bdia_step_bad_increment_raises_and_leaves_u(device, direction):
    u, src, inc, sign = bdia_operands((3, BIG // 3 + 2), torch.float32, device, 71)
    low = R.bdia_step_(u.clone(), src, inc, sign, 24, 4)
    for value, frac in ((float("nan"), 24), (float("inf"), 24), (2.0**40, 24)):
        bad = inc.clone()
        bad[1, 17] = value
        bad[2, 5] = value
        u0 = u.clone()
        call = ((lambda: R.bdia_step_(u, src, bad, sign, frac, 4)) if direction == "step" else
                (lambda: R.bdia_unstep_(u, src, bad, sign, low, frac, 4)))
        with pytest.raises(RuntimeError) as ei:
            call()
        msg = str(ei.value).splitlines()[0]
        first = 17 + bad.shape[1]
        assert (f"revengine::bdia_{direction}_: 2 of {bad.numel()} elements of inc * (1 + g) are non-finite or "
                f"out of the fixed-point range" in msg), msg
        assert f"at flat index {first}" in msg and msg.endswith("(u was left unchanged)"), msg
        assert torch.equal(u, u0)
    # low was only read by the failed unstep
    assert torch.equal(low, R.bdia_step_(u.clone(), src, inc, sign, 24, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_bdia_step_argument_errors(device):
    u, src, inc, sign = bdia_operands((3, 4), torch.float32, device, 72)
    low = R.bdia_step_(u.clone(), src, inc, sign, 24, 2)
    cases = [
        (lambda: R.bdia_step_(u.double(), src, inc, sign, 24, 2), "u must be an int64 tensor"),
        (lambda: R.bdia_step_(u, src.int(), inc, sign, 24, 2), "src must be an int64 tensor"),
        (lambda: R.bdia_step_(u, src[:2], inc, sign, 24, 2), "src must have u's shape and device"),
        (lambda: R.bdia_step_(u, src, inc[:, :3], sign, 24, 2), "inc must have the same shape as u"),
        (lambda: R.bdia_step_(u, src, inc.long(), sign, 24, 2), "inc must be float32, float64"),
        (lambda: R.bdia_step_(u, src, inc, sign[:2], 24, 2), r"sign must be an int64 tensor of shape \[3\]"),
        (lambda: R.bdia_step_(u, src, inc, sign.float(), 24, 2), r"sign must be an int64 tensor"),
        (lambda: R.bdia_step_(u, src, inc, sign, 24, 0), r"shift must be in 1..8 \(gamma = 2\^-shift\), got 0"),
        (lambda: R.bdia_step_(u, src, inc, sign, 24, 9), "shift must be in 1..8"),
        (lambda: R.bdia_step_(u, src, inc, sign, -1, 2), "frac_bits must be in"),
        (lambda: R.bdia_step_(u[0], src[0], inc[0], sign[:4], 24, 2), "sign must be"),
        (lambda: R.bdia_step_(u.view(-1)[:0].view(0, 4), src[:0], inc[:0], sign[:0], 24, 2),
         "u needs a non-empty sample dimension 0"),
        (lambda: R.bdia_unstep_(u, src, inc, sign, low[:-1], 24, 2), r"low must be the uint8 tensor of shape \[3\]"),
        (lambda: R.bdia_unstep_(u, src, inc, sign, low.long(), 24, 2), "low must be the uint8 tensor"),
        (lambda: R.bdia_unstep_(u, src, inc, sign, low, 24, 4), r"low must be the uint8 tensor of shape \[6\]"),
    ]
    u0 = u.clone()
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
    assert torch.equal(u, u0)
    with pytest.raises(RuntimeError, match="revengine::bdia_step_ is not differentiable"):
        R.bdia_step_(u, src, inc.clone().requires_grad_(), sign, 24, 2)
    with torch.no_grad():
        v = u._version
        R.bdia_step_(u, src, inc.clone().requires_grad_(), sign, 24, 2)
        assert u._version > v


# ------------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensor / Meta, AOT dispatch)
# ------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    def t(shape, dtype=torch.float32, seed=0, rg=False, positive=False):
        v = rand_positive(shape, dtype, device, seed) if positive else randn(shape, dtype, device, seed)
        return v.requires_grad_(rg)

    q = torch.randint(-(2**40), 2**40, (3, 4), dtype=torch.int64, device=device)
    return [
        (R.coupling_update.default, (t((3, 4), torch.float64, 1, True), t((3, 4), torch.float64, 2, True), 0.5)),
        (R.coupling_update.default, (t((5,), torch.float32, 3, True), t((5,), torch.bfloat16, 4, True), -2.0)),
        (R.coupling_update.default, (t((2, 3), torch.float16, 5), t((2, 3), torch.float32, 6, True), 1.5)),
        (R.coupling_update_.default, (t((3, 4), seed=7), t((3, 4), seed=8), 0.5)),
        (R.coupling_update_.default, (t((6,), torch.bfloat16, 9), t((6,), torch.float32, 10), 3.0)),
        (R.coupling_inverse_.default, (t((3, 4), seed=11), t((3, 4), seed=12), 0.5, True)),
        (R.coupling_inverse_.default, (t((7,), torch.float64, 13), t((7,), torch.float16, 14), -1.25, False)),
        (R.affine_update_.default, (t((3, 4), seed=15), t((3, 4), seed=16, positive=True), t((3, 4), seed=17))),
        (R.affine_update_.default, (t((2, 2), torch.bfloat16, 18), t((2, 2), torch.float32, 19, positive=True),
                                    t((2, 2), torch.float32, 20))),
        (R.affine_inverse_.default, (t((3, 4), seed=21), t((3, 4), seed=22, positive=True), t((3, 4), seed=23), True)),
        (R.fixed_quantize.default, (t((3, 4), seed=24), 20)),
        (R.fixed_quantize.default, (t((9,), torch.bfloat16, 25), 0)),
        (R.fixed_dequantize.default, (q, 20, torch.float32)),
        (R.fixed_dequantize.default, (q, 33, torch.bfloat16)),
        (R.fixed_update_.default, (q.clone(), t((3, 4), seed=26), 20, 1)),
        (R.fixed_update_.default, (q.clone(), t((3, 4), torch.float16, 27), 8, -1)),
        (R.all_finite.default, (t((3, 4), seed=28),)),
        (R.all_finite.default, (t((3, 4), seed=29, rg=True),)),
        (R.bdia_step_.default, (q.clone(), q.flip(0), t((3, 4), seed=30), torch.tensor([1, -1, 1], device=device),
                                24, 2)),
        (R.bdia_step_.default, (q.clone(), q.clone(), t((3, 4), torch.bfloat16, 31),
                                torch.tensor([-1, -1, 1], device=device), 16, 3)),
        (R.bdia_unstep_.default, (q.clone(), q.flip(0), t((3, 4), seed=32), torch.tensor([1, -1, 1], device=device),
                                  torch.arange(6, dtype=torch.uint8, device=device), 24, 4)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    seen = set()
    for op, args in _opcheck_samples(device):
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
        seen.add(op.name())
    assert seen == {f"revengine::{n}" for n in ("coupling_update", "coupling_update_", "coupling_inverse_",
                                                "affine_update_", "affine_inverse_", "fixed_quantize",
                                                "fixed_dequantize", "fixed_update_", "all_finite", "bdia_step_",
                                                "bdia_unstep_")}


# ------------------------------------------------------------------------------------------
# Meta
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xdt,fdt", [(torch.float32, torch.bfloat16), (torch.float16, torch.float64)],
                         ids=["float32-bfloat16", "float16-float64"])
def test_meta(xdt, fdt):
    m = "meta"
    x = torch.empty(3, 5, 7, dtype=xdt, device=m)
    f = torch.empty(3, 5, 7, dtype=fdt, device=m)
    out = R.coupling_update(x, f, 0.5)
    assert out.device.type == m and out.shape == x.shape and out.dtype == xdt and out.is_contiguous()
    assert R.coupling_update_(x, f, 0.5) is None
    for flag in (R.coupling_inverse_(x, f, 0.5, True), R.affine_inverse_(x, f, f, False), R.all_finite(x)):
        assert flag.device.type == m and flag.shape == () and flag.dtype == torch.bool
    assert R.affine_update_(x, f, f) is None
    q = R.fixed_quantize(x, 16)
    assert q.device.type == m and q.shape == x.shape and q.dtype == torch.int64
    d = R.fixed_dequantize(q, 16, torch.bfloat16)
    assert d.device.type == m and d.shape == x.shape and d.dtype == torch.bfloat16
    assert R.fixed_update_(q, x, 16, -1) is None
    # the Meta kernels do the same checks
    with pytest.raises(RuntimeError, match="f must have the same shape as x"):
        R.coupling_update(x, f[0], 0.5)
    with pytest.raises(RuntimeError, match="lam must be non-zero"):
        R.coupling_inverse_(x, f, 0.0, True)
    with pytest.raises(RuntimeError, match="sign must be"):
        R.fixed_update_(q, x, 16, 0)
    with pytest.raises(RuntimeError, match="inc must have the same shape as acc"):
        R.fixed_update_(q, x[0], 16, 1)
    sign = torch.empty(3, dtype=torch.int64, device=m)
    low = R.bdia_step_(q, q, x, sign, 16, 2)  # 105 elements, 4 to a byte
    assert low.device.type == m and low.shape == (27,) and low.dtype == torch.uint8
    assert R.bdia_step_(q, q, x, sign, 16, 3).shape == (105,)
    assert R.bdia_unstep_(q, q, x, sign, low, 16, 2) is None
    with pytest.raises(RuntimeError, match="sign must be an int64 tensor of shape"):
        R.bdia_step_(q, q, x, sign[:2], 16, 2)
    with pytest.raises(RuntimeError, match="low must be the uint8 tensor"):
        R.bdia_unstep_(q, q, x, sign, low[1:], 16, 2)


def test_meta_under_compile_dynamic_shapes():
    # fake tensors with symbolic shapes go through the Meta kernels
    def fn(x, f, s, h):
        y = R.coupling_update(x, f, 0.5)
        R.affine_update_(y, s, h)
        ok = R.coupling_inverse_(y, f, 0.5, True)
        return y, ok, R.fixed_quantize(y, 10)

    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for n in (5, 9):
        args = [torch.randn(n), torch.randn(n).bfloat16(), torch.rand(n) + 1, torch.randn(n)]
        ref = fn(*[a.clone() for a in args])
        got = compiled(*[a.clone() for a in args])
        for a, b in zip(ref, got):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (the same arithmetic contract: see csrc/ops.cpp)
# ------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels are compared with the CPU ones only on a GPU"
)
ODD = BIG + 3  # not a multiple of the kernels' 4-element vectors: exercises the scalar tail


def mixed(n, dtype, seed, scale=1.0):
    """Values over much of dtype's range: normal ones, huge ones (overflow on update), subnormals,
    signed zeros, values near the float16/bfloat16 rounding boundaries."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    v = torch.randn(n, generator=g, dtype=torch.float64) * scale
    v = v * torch.exp2(torch.randint(-20, 21, (n,), generator=g).double())
    k = n // 16
    idx = torch.randperm(n, generator=g)
    v[idx[:k]] = (torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1) * fi.max  # near overflow
    v[idx[k:2 * k]] = torch.randn(k, generator=g, dtype=torch.float64) * fi.smallest_normal  # subnormals
    v[idx[2 * k:2 * k + 8]] = 0.0
    v[idx[2 * k + 8:2 * k + 16]] = -0.0
    return v.to(dtype)


def assert_same_within_ulp(got, ref, n=1):
    """got (from CUDA) equals the CPU kernels' ref, or is within n ulp of it (both nan counts as equal)."""
    got = got.cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape
    g, r = got.double(), ref.double()
    same = (g == r) | (g.isnan() & r.isnan())
    fin = torch.isfinite(r) & torch.isfinite(g)
    close = fin & ((g - r).abs() <= n * ulp(torch.where(fin, ref, torch.zeros_like(ref))))
    bad = ~(same | close)
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements differ from the CPU kernels by more than {n} ulp; "
        f"e.g. cuda={g[bad][:5].tolist()} cpu={r[bad][:5].tolist()}"
    )


def both(fn, *tensors):
    """fn on CPU clones of `tensors` and on CUDA clones; returns (cpu_args, cpu_out, cuda_args, cuda_out)."""
    cpu = [t.clone() for t in tensors]
    dev = [t.clone().cuda() for t in tensors]
    return cpu, fn(*cpu), dev, fn(*dev)


def error_text(fn):
    with pytest.raises(RuntimeError) as ei:
        fn()
    return str(ei.value).splitlines()[0]


@needs_cuda
@pytest.mark.parametrize("xdt,fdt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "misaligned", "strided"])
def test_cuda_float_ops_match_cpu(xdt, fdt, layout):
    def view(t):  # the layouts the glue must handle: vector path, scalar path, copy written back
        if layout == "misaligned":
            return t[1:]
        if layout == "strided":
            return t[::2]
        return t

    x0 = mixed(ODD + 1, xdt, 40)
    f0 = mixed(ODD + 1, fdt, 41)
    s0 = (rand_positive((ODD + 1,), torch.float64, "cpu", 42) * torch.exp2(torch.randint(-8, 9, (ODD + 1,)).double())).to(fdt)
    h0 = mixed(ODD + 1, fdt, 43, scale=1e-3)
    for lam in (0.75, -1.3):
        cpu, out_c, dev, out_d = both(lambda x, f: R.coupling_update(view(x), view(f), lam), x0, f0)
        assert out_d.device.type == "cuda" and out_d.dtype == xdt
        assert_same_within_ulp(out_d, out_c)

        def upd_(x, f):
            R.coupling_update_(view(x), view(f), lam)
            return x

        _, xc, _, xd = both(upd_, x0, f0)
        assert_same_within_ulp(xd, xc)

        def inv_(y, f):
            flag = R.coupling_inverse_(view(y), view(f), lam, True)
            return y, flag

        _, (yc, flag_c), _, (yd, flag_d) = both(inv_, x0, f0)
        assert_same_within_ulp(yd, yc)
        assert flag_d.device.type == "cuda" and flag_d.dtype == torch.bool and flag_d.dim() == 0
        assert bool(flag_d) == bool(flag_c)
        y = x0.clone().cuda()
        assert bool(R.coupling_inverse_(view(y), view(f0.cuda()), lam, False))

    def aff(x, s, h):
        R.affine_update_(view(x), view(s), view(h))
        return x

    _, xc, _, xd = both(aff, x0, s0, h0)
    assert_same_within_ulp(xd, xc)

    def aff_inv(y, s, h):
        flag = R.affine_inverse_(view(y), view(s), view(h), True)
        return y, flag

    _, (yc, flag_c), _, (yd, flag_d) = both(aff_inv, x0, s0, h0)
    assert_same_within_ulp(yd, yc)
    assert bool(flag_d) == bool(flag_c)


@needs_cuda
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
def test_cuda_finite_flags_match_cpu(xdt):
    x = randn((ODD,), xdt, "cpu", 44)
    f = randn((ODD,), xdt, "cpu", 45)
    for pos in (0, 1, GRAIN + 5, ODD - 2, ODD - 1):  # vector groups and the scalar tail
        for bad in (float("nan"), float("inf"), -float("inf")):
            fb = f.clone()
            fb[pos] = bad
            for call in (lambda y, g: R.coupling_inverse_(y, g, 0.5, True),
                         lambda y, g: R.affine_inverse_(y, torch.ones_like(y), g, True)):
                _, flag_c, _, flag_d = both(call, x, fb)
                assert not bool(flag_c) and not bool(flag_d)
            xb = x.clone()
            xb[pos] = bad
            assert not bool(R.all_finite(xb.cuda())) and not bool(R.all_finite(xb.cuda()[pos:]))
    assert bool(R.all_finite(x.cuda()))
    # overflow of the final rounding is reported as on the CPU
    y = torch.full((10,), 60000.0 if xdt == torch.float16 else float(torch.finfo(xdt).max) / 2, dtype=xdt)
    _, flag_c, _, flag_d = both(lambda a, b: R.coupling_inverse_(a, b, 0.25, True), y, torch.zeros_like(y))
    assert bool(flag_c) == bool(flag_d) == False  # noqa: E712


@needs_cuda
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("frac_bits", [0, 20, 52])
def test_cuda_fixed_point_matches_cpu_bit_for_bit(xdt, frac_bits):
    x = mixed(ODD, xdt, 46)
    x = torch.where(x.double().abs() * 2.0**frac_bits < 2.0**61, x, torch.zeros_like(x))  # in range
    q_c, q_d = R.fixed_quantize(x, frac_bits), R.fixed_quantize(x.cuda(), frac_bits)
    assert q_d.device.type == "cuda" and torch.equal(q_d.cpu(), q_c)
    assert torch.equal(R.fixed_quantize(x.cuda()[1:], frac_bits).cpu(), q_c[1:])  # scalar path
    g = torch.Generator().manual_seed(47)
    q = torch.cat([torch.randint(-(2**62), 2**62, (ODD,), generator=g, dtype=torch.int64),
                   torch.tensor([0, 1, -1, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63)], dtype=torch.int64)])
    for odt in FLOATS:
        for fb in (frac_bits, 1023):
            d_c = R.fixed_dequantize(q, fb, odt)
            d_d = R.fixed_dequantize(q.cuda(), fb, odt)
            assert torch.equal(bits(d_d.cpu()), bits(d_c))
    acc0 = torch.randint(-(2**62), 2**62, (ODD,), generator=g, dtype=torch.int64)
    for sign in (1, -1):
        a_c, a_d = acc0.clone(), acc0.clone().cuda()
        R.fixed_update_(a_c, x, frac_bits, sign)
        R.fixed_update_(a_d, x.cuda(), frac_bits, sign)
        assert torch.equal(a_d.cpu(), a_c)
        a_t = torch.empty((ODD, 2), dtype=torch.int64, device="cuda")[:, 0]  # non-contiguous acc
        a_t.copy_(acc0)
        R.fixed_update_(a_t, x.cuda(), frac_bits, sign)
        assert torch.equal(a_t.cpu(), a_c)


@needs_cuda
@pytest.mark.parametrize("xdt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_cuda_fixed_point_errors_match_cpu(xdt, contiguous):
    base = randn((600, 500), xdt, "cpu", 48)
    x = base if contiguous else base.t()
    for bads in ([(3, 7)], [(0, 0), (599 if contiguous else 499, 499 if contiguous else 599)], [(10, 3), (2, 100)]):
        xb = x.clone()
        for i, j in bads:
            xb[i, j] = float("nan")
        xb[5, 5] = 2.0**45  # out of range with frac_bits = 20
        msg_c = error_text(lambda: R.fixed_quantize(xb, 20))
        msg_d = error_text(lambda: R.fixed_quantize(xb.cuda(), 20))
        assert msg_d == msg_c
        acc0 = torch.arange(xb.numel(), dtype=torch.int64).reshape(xb.shape)
        acc_c = acc0.clone() if contiguous else acc0.clone().t().contiguous().t()
        acc_d = acc_c.cuda() if contiguous else acc_c.t().contiguous().cuda().t()
        msg_c = error_text(lambda: R.fixed_update_(acc_c, xb, 20, 1))
        msg_d = error_text(lambda: R.fixed_update_(acc_d, xb.cuda(), 20, 1))
        assert msg_d == msg_c and "(acc was left unchanged)" in msg_d
        assert torch.equal(acc_d.cpu(), acc0) and torch.equal(acc_c, acc0)


@needs_cuda
@pytest.mark.parametrize("dt", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", SHIFTS)
def test_cuda_bdia_step_matches_cpu_bit_for_bit(dt, k):
    u, src, inc, sign = bdia_operands((5, ODD // 5 + 1), dt, "cpu", 80 + k, bits=60)
    inc = torch.where(inc.double().abs() < 2.0**30, inc, torch.zeros_like(inc))  # in range at frac 30
    (u_c, *_), low_c, (u_d, *_), low_d = both(lambda a, b, c, d: R.bdia_step_(a, b, c, d, 30, k), u, src, inc, sign)
    assert low_d.device.type == "cuda" and torch.equal(low_d.cpu(), low_c) and torch.equal(u_d.cpu(), u_c)
    R.bdia_unstep_(u_d, src.cuda(), inc.cuda(), sign.cuda(), low_d, 30, k)
    assert torch.equal(u_d.cpu(), u)
    # errors: the same message, u left unchanged
    bad = inc.clone()
    bad[2, 9] = float("nan")
    msg_c = error_text(lambda: R.bdia_step_(u.clone(), src, bad, sign, 30, k))
    u_d = u.cuda()
    msg_d = error_text(lambda: R.bdia_step_(u_d, src.cuda(), bad.cuda(), sign.cuda(), 30, k))
    assert msg_d == msg_c and torch.equal(u_d.cpu(), u)


@needs_cuda
def test_cuda_ops_follow_the_current_stream_and_device_checks():
    x = torch.randn(1000, device="cuda")
    f = torch.randn(1000, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = R.coupling_update(x, f, 0.5)
        flag = R.coupling_inverse_(y, f, 0.5, True)
    s.synchronize()
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert bool(flag)
    with pytest.raises(RuntimeError, match="same device"):
        R.coupling_update(x, f.cpu(), 0.5)
    with pytest.raises(RuntimeError, match="same device"):
        R.fixed_update_(torch.zeros(1000, dtype=torch.int64, device="cuda"), f.cpu(), 8, 1)
    # empty tensors
    e = torch.empty(0, device="cuda")
    assert R.coupling_update(e, e, 0.5).shape == (0,)
    assert bool(R.coupling_inverse_(e, e, 0.5, True)) and bool(R.all_finite(e))
    assert R.fixed_quantize(e, 8).shape == (0,)


# ------------------------------------------------------------------------------------------
# The CUDA sources compile (nvcc + the CPU torch's headers), so that CI catches CUDA build
# breaks without a GPU or a CUDA torch.
# ------------------------------------------------------------------------------------------
def _nvcc_available():
    import shutil

    cuda_home = os.environ.get("CUDA_HOME", "")
    return bool(shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
                or os.path.exists("/usr/local/cuda/bin/nvcc"))


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHECK_SCRIPT = os.path.join(_ROOT, "scripts", "check_cuda_compile.sh")
needs_nvcc = pytest.mark.skipif(not _nvcc_available(), reason="nvcc not installed")
needs_script = pytest.mark.skipif(not os.path.exists(_CHECK_SCRIPT), reason="not a source checkout")


def _run_check(root, **env):
    import subprocess
    import sys

    return subprocess.run(["bash", os.path.join(root, "scripts", "check_cuda_compile.sh")], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.slow  # 15-40 s on a 2-core machine
@needs_nvcc
@needs_script
def test_cuda_sources_compile():
    proc = _run_check(_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check_cuda_compile: OK" in proc.stdout
    assert "coupling_kernels.cu" in proc.stdout and "ops_cuda.cpp" in proc.stdout


@pytest.mark.slow
@needs_nvcc
@needs_script
def test_cuda_compile_check_fails_on_a_compile_error(tmp_path):
    import shutil

    for d in ("csrc", "scripts"):
        shutil.copytree(os.path.join(_ROOT, d), tmp_path / d)
    with open(tmp_path / "csrc" / "cuda" / "coupling_kernels.cu", "a") as fh:
        fh.write("\nthis is not C++;\n")
    proc = _run_check(str(tmp_path), REVENGINE_CHECK_GENCODES="-gencode=arch=compute_90,code=sm_90")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "FAILED nvcc -c csrc/cuda/coupling_kernels.cu" in proc.stdout
    assert "check_cuda_compile: ok     g++" in proc.stdout  # the glue still compiles


def test_python_wrappers_are_the_ops():
    """revengine.ops: each typed wrapper computes what its torch op computes."""
    from revengine import ops

    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert torch.equal(ops.coupling_update(x, f, 0.5), torch.ops.revengine.coupling_update(x, f, 0.5))
    y = x.clone()
    ops.coupling_update_(y, f, 0.5)
    assert torch.equal(y, torch.ops.revengine.coupling_update(x, f, 0.5))
    assert bool(ops.coupling_inverse_(y, f, 0.5)) and torch.allclose(y, x, atol=1e-6)
    scale = torch.rand(7, 5, generator=g) + 0.5
    z = x.clone()
    ops.affine_update_(z, scale, f)
    assert bool(ops.affine_inverse_(z, scale, f)) and torch.allclose(z, x, atol=1e-6)
    q = ops.fixed_quantize(x, 16)
    assert q.dtype == torch.int64 and torch.equal(q, torch.ops.revengine.fixed_quantize(x, 16))
    assert torch.equal(ops.fixed_dequantize(q, 16, torch.float64), q.double() / 2**16)
    acc = q.clone()
    ops.fixed_update_(acc, f, 16, 1)
    ops.fixed_update_(acc, f, 16, -1)
    assert torch.equal(acc, q)
    assert bool(ops.all_finite(x)) and not bool(ops.all_finite(torch.tensor([1.0, float("nan")])))
    u, src = ops.fixed_quantize(x, 24), ops.fixed_quantize(f, 24)
    sign = torch.tensor([1, -1, 1, 1, -1, -1, 1])
    u0 = u.clone()
    low = ops.bdia_step_(u, src, f, sign, 24, 4)
    assert not torch.equal(u, u0)
    ops.bdia_unstep_(u, src, f, sign, low, 24, 4)
    assert torch.equal(u, u0)
