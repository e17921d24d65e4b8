"""revengine.reference: every op's ATen reference against its CPU kernel, and the kernel switch
(revengine.ops.use_kernels / REVENGINE_KERNELS=aten) for ops called from Python and from the C++
executor."""

import pytest
import torch

import revengine as rev
from revengine import reference as R
from revengine.models import BLOCK_TYPES, RevMoEConfig, RevMoEForCausalLM
from revengine.ops import use_kernels

from conftest import child_env, run_python

ops = torch.ops.revengine
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1,), (7,), (33, 5), (3, 1031)]  # empty, odd, past a 1024 float16 staging block


@pytest.fixture(autouse=True)
def custom_kernels():
    use_kernels("custom")
    yield
    use_kernels("custom")


def rand(shape, dtype, seed, noncontig=False, scale=1.0):
    """Random values; non-contiguous: every other column of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)[..., ::2]
    else:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (t * scale).to(dtype)


def cases():
    for dtype in FLOATS:
        for shape in SHAPES:
            for noncontig in (False, True):
                yield pytest.param(dtype, shape, noncontig, id=f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{'nc' if noncontig else 'c'}")


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        assert torch.equal(a.isnan(), b.isnan())
        # NaN payloads are not part of the contract: one NaN for all
        a, b = (t.masked_fill(t.isnan(), float("nan")).contiguous() for t in (a, b))
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        assert torch.equal(a.view(bits), b.view(bits)), (a - b).abs().max()
    else:
        assert torch.equal(a, b)


def near_fma(ref, ker, *terms):
    """float64 has no fma in torch: the reference rounds twice, so |ref - ker| <= 1 ulp of the terms."""
    bound = sum(t.abs() for t in terms).double() * 2.0**-52
    assert bool(((ref.double() - ker.double()).abs() <= bound + 1e-300).all())


@pytest.mark.parametrize("dtype,shape,noncontig", list(cases()))
def test_coupling_and_affine_ops(dtype, shape, noncontig):
    x = rand(shape, dtype, 0, noncontig)
    f = rand(shape, dtype, 1, noncontig)
    lam = 0.7
    # out of place
    ker, ref = ops.coupling_update(x, f, lam), R.coupling_update(x, f, lam)
    (near_fma(ref, ker, x * lam, ref) if dtype == torch.float64 else same_bits(ref, ker))
    # in place, then the inverse with its flag
    a, b = x.clone(), x.clone()
    ops.coupling_update_(a, f, lam)
    R.coupling_update_(b, f, lam)
    (near_fma(b, a, x * lam, a) if dtype == torch.float64 else same_bits(b, a))
    b.copy_(a)
    fa, fb = ops.coupling_inverse_(a, f, lam, True), R.coupling_inverse_(b, f, lam, True)
    same_bits(b, a)
    assert bool(fa) == bool(fb) and fa.shape == fb.shape == ()
    # affine, scale of another dtype (autocast) and shift of x's
    scale = (rand(shape, torch.float32, 2, noncontig).abs() + 0.5)
    shift = rand(shape, dtype, 3, noncontig)
    a, b = x.clone(), x.clone()
    ops.affine_update_(a, scale, shift)
    R.affine_update_(b, scale, shift)
    (near_fma(b, a, x.double() * scale.double(), a) if dtype == torch.float64 else same_bits(b, a))
    b.copy_(a)
    fa, fb = ops.affine_inverse_(a, scale, shift, True), R.affine_inverse_(b, scale, shift, True)
    same_bits(b, a)
    assert bool(fa) == bool(fb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_finite_flags_and_overflow(dtype):
    y = torch.tensor([1.0, 6e4, float("nan"), -2.0]).to(dtype)
    f = torch.tensor([0.0, -6e4, 0.0, 1.0]).to(dtype)
    a, b = y.clone(), y.clone()
    fa, fb = ops.coupling_inverse_(a, f, 0.25, True), R.coupling_inverse_(b, f, 0.25, True)
    same_bits(b, a)
    assert not bool(fa) and not bool(fb)
    assert bool(R.coupling_inverse_(y.clone(), f, 0.25, False))  # unchecked: always True
    for t in (y, f, torch.arange(3), torch.tensor([1 + 2j, float("inf")])):
        assert bool(ops.all_finite(t)) == bool(R.all_finite(t))


def test_fma_rounding_to_float32_is_exact():
    """Inputs where a double-rounded sum would differ from the fma (midpoints of float32)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200000, generator=g)
    f = -(x.double() * 0.3).float() + torch.randn(200000, generator=g) * 1e-7
    same_bits(R.coupling_update(x, f, 0.3), ops.coupling_update(x, f, 0.3))


@pytest.mark.parametrize("dtype,shape,noncontig", list(cases()))
def test_fixed_point_ops_bit_for_bit(dtype, shape, noncontig):
    x = rand(shape, dtype, 4, noncontig, scale=100.0)
    for bits in (0, 12, 40):
        same_bits(R.fixed_quantize(x, bits), ops.fixed_quantize(x, bits))
        q = ops.fixed_quantize(x, bits)
        for out in FLOATS:
            same_bits(R.fixed_dequantize(q, bits, out), ops.fixed_dequantize(q, bits, out))
    acc = torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64, generator=torch.Generator().manual_seed(6))
    a, b = acc.clone(), acc.clone()
    for sign in (1, -1, 1):
        ops.fixed_update_(a, x, 50, sign)  # large: wraps around
        R.fixed_update_(b, x, 50, sign)
        same_bits(b, a)


def test_fixed_point_errors_match_and_leave_acc_unchanged():
    inc = torch.tensor([1.0, float("inf"), 2.0**70, 3.0])
    acc = torch.arange(4)
    msgs = []
    for fn in (ops.fixed_update_, R.fixed_update_):
        a = acc.clone()
        with pytest.raises(RuntimeError) as e:
            fn(a, inc, 8, 1)
        assert torch.equal(a, acc)
        msgs.append(str(e.value).split("\n")[0])
    assert msgs[1] in msgs[0]  # the same message (the C++ one may carry a location suffix)
    with pytest.raises(RuntimeError, match="non-finite or out of the fixed-point range"):
        R.fixed_quantize(inc, 8)
    with pytest.raises(RuntimeError, match="frac_bits"):  # argument checks: the Meta kernels'
        R.fixed_quantize(inc, -1)


@pytest.mark.parametrize("shift", range(1, 9))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 13), (4, 0)])
def test_bdia_step_unstep_bit_for_bit(shift, dtype, shape):
    g = torch.Generator().manual_seed(shift)
    u = torch.randint(-(2**62), 2**62, shape, dtype=torch.int64, generator=g)
    src = torch.randint(-(2**40), 2**40, shape, dtype=torch.int64, generator=g)
    inc = rand(shape, dtype, shift)
    sign = torch.tensor([1, -1, -1, 1][: shape[0]], dtype=torch.int64)
    for alias in (False, True):
        a, b = u.clone(), u.clone()
        sa, sb = (a, b) if alias else (src, src)
        la = ops.bdia_step_(a, sa, inc, sign, 30, shift)
        lb = R.bdia_step_(b, sb, inc, sign, 30, shift)
        same_bits(lb, la)
        same_bits(b, a)
        if not alias:
            ops.bdia_unstep_(a, src, inc, sign, la, 30, shift)
            R.bdia_unstep_(b, src, inc, sign, lb, 30, shift)
            same_bits(b, a)
            same_bits(b, u)
    if len(shape) != 2 or not shape[1]:
        return
    # non-contiguous u (column-major copies), then a bad increment: an error, u unchanged
    a, b = (torch.empty_strided(shape, (1, shape[0]), dtype=u.dtype).copy_(u) for _ in range(2))
    same_bits(R.bdia_step_(b, src, inc, sign, 30, shift), ops.bdia_step_(a, src, inc, sign, 30, shift))
    same_bits(b, a)
    bad = inc.clone()
    bad[0, 0] = float("nan")
    for fn in (ops.bdia_step_, R.bdia_step_):
        before = a.clone()
        with pytest.raises(RuntimeError, match="non-finite or out of the fixed-point range"):
            fn(a, a, bad, sign, 30, shift)
        assert torch.equal(a, before)


def routing(T, k, E, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,k,E,H", [(0, 2, 3, 5), (1, 1, 1, 4), (9, 2, 4, 7), (33, 3, 5, 0), (17, 2, 6, 33)])
def test_moe_ops(dtype, T, k, E, H):
    ids = routing(T, k, E, T + H)
    for idt in (torch.int64, torch.int32, torch.int16):
        for a, b in zip(R.moe_permute(ids.to(idt), E), ops.moe_permute(ids.to(idt), E)):
            same_bits(a, b)
    slots, off = ops.moe_permute(ids, E)
    x = rand((T, 2 * H), dtype, 7)[:, ::2]  # non-contiguous rows
    same_bits(R.moe_gather(x, slots, k), ops.moe_gather(x, slots, k))
    go = rand((T * k, H), dtype, 8)
    tol = dict(rtol=0, atol=0)  # same summation order and matmuls: bit for bit on CPU
    torch.testing.assert_close(R.moe_gather_backward(go, slots, k), ops.moe_gather_backward(go, slots, k), **tol)
    xs = ops.moe_gather(x, slots, k)
    w = rand((E, 3, H), dtype, 9)
    # matmuls: BLAS may take another path for a slice than for a select (a few ulps)
    mm_tol = dict(rtol=1e-13, atol=1e-13) if dtype == torch.float64 else {}
    torch.testing.assert_close(R.moe_grouped_mm(xs, w, off), ops.moe_grouped_mm(xs, w, off), **mm_tol)
    gy = rand((T * k, 3), dtype, 10)
    torch.testing.assert_close(R.moe_grouped_mm_weight_grad(gy, xs, off), ops.moe_grouped_mm_weight_grad(gy, xs, off),
                               **mm_tol)
    weights = rand((T, k), torch.float32, 11).abs()
    torch.testing.assert_close(R.moe_scatter_combine(go, weights, slots, T), ops.moe_scatter_combine(go, weights, slots, T), **tol)
    gout = rand((T, H), dtype, 12)
    for a, b in zip(R.moe_scatter_combine_backward(gout, go, weights, slots),
                    ops.moe_scatter_combine_backward(gout, go, weights, slots)):
        # the dot products of dweights: torch's sum may associate differently
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype != torch.float64 else 1e-13, atol=1e-6)
    with pytest.raises(RuntimeError, match="topk_ids must be in"):
        R.moe_permute(torch.full((2, 1), E), E)


def kernel_file(name: str) -> str:
    """The CPU line of the dispatcher's table for revengine::name (where its kernel was registered)."""
    table = torch._C._dispatch_dump_table(f"revengine::{name}")
    return next(line for line in table.splitlines() if line.startswith("CPU:"))


def test_switch_replaces_and_restores_every_kernel():
    for name in R.REFERENCES:
        assert "ops.cpp" in kernel_file(name), name
    use_kernels("aten")
    assert rev.ops.kernels() == "aten"
    for name in R.REFERENCES:
        assert "ops.cpp" not in kernel_file(name), name
    use_kernels("aten")  # idempotent
    use_kernels("custom")
    assert rev.ops.kernels() == "custom"
    for name in R.REFERENCES:
        assert "ops.cpp" in kernel_file(name), name
    with pytest.raises(ValueError):
        use_kernels("triton")


def count_calls(monkeypatch):
    """Wraps every reference with a call counter (taking effect at the next use_kernels("aten"))."""
    counts = {}

    def wrap(name, fn):
        def counted(*args):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args)
        return counted

    monkeypatch.setattr(R, "REFERENCES", {n: wrap(n, f) for n, f in R.REFERENCES.items()})
    return counts


def test_executor_and_autograd_use_the_references(monkeypatch):
    counts = count_calls(monkeypatch)
    torch.manual_seed(0)
    f = torch.nn.Linear(8, 8).double()
    g = torch.nn.Linear(8, 8).double()
    stack = rev.Sequential(rev.AdditiveCoupling(f, g), rev.AdditiveCoupling(g, f), mode="reversible")
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)

    def run():
        stack.zero_grad(set_to_none=True)
        x.grad = None
        stack(x).square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]

    custom = run()
    assert not counts
    use_kernels("aten")
    aten = run()
    assert counts.get("coupling_update_", 0) > 0 and counts.get("coupling_inverse_", 0) > 0, counts  # from C++
    for a, b in zip(aten, custom):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    # autograd of the differentiable ops goes on through the C++ Autograd kernels
    xx = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ff = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: rev.ops.coupling_update(a, b, 0.5), (xx, ff))
    with pytest.raises(RuntimeError, match="not differentiable"):
        rev.ops.coupling_update_(xx, ff, 1.0)
    n = dict(counts)
    use_kernels("custom")
    run()
    assert counts == n  # custom again: no reference called


def test_profiler_sees_no_custom_kernel(monkeypatch):
    """Under "aten" every revengine op the profiler records runs the reference (counted), whose
    ATen work shows up beneath it; the custom kernels record no ATen work of their own."""
    counts = count_calls(monkeypatch)
    use_kernels("aten")
    x = torch.randn(64, dtype=torch.float32)
    f = torch.randn(64, dtype=torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rev.ops.coupling_update_(x, f, 1.0)
        rev.ops.fixed_quantize(x, 10)
    names = [e.name for e in prof.events()]
    ours = [n for n in names if n.startswith("revengine::")]
    assert ours and counts.get("coupling_update_") == 1 and counts.get("fixed_quantize") == 1
    assert "aten::copy_" in names and "aten::round" in names  # the references' work


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_model_same_loss_and_grads_with_either_kernels(block_type):
    cfg = RevMoEConfig.preset("tiny", block_type=block_type, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    torch.manual_seed(0)
    model = RevMoEForCausalLM(cfg).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # bdia's random signs
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, g0 = run()
    use_kernels("aten")
    l1, g1 = run()
    assert abs(float(l1 - l0)) <= 1e-12 * abs(float(l0))
    assert g0.keys() == g1.keys()
    worst = max(float((g1[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-300)) for n in g0)
    assert worst <= 1e-12, worst


def test_env_variable_selects_aten_at_import():
    code = "import revengine as r; print(r.ops.kernels())"
    for value, want in (("aten", "aten"), ("", "custom"), ("custom", "custom")):
        env = child_env(REVENGINE_KERNELS=value)
        out = run_python(["-c", code], env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want
