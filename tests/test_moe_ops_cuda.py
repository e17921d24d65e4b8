"""CUDA kernels of the MoE routing ops (csrc/cuda/moe_kernels.cu, csrc/cuda/moe_ops_cuda.cpp) against
the CPU kernels: permutations identical, gather / gather_backward / scatter_combine / grad_y
bit-identical (same arithmetic, see moe_kernels.cu), grouped matmuls (cuBLAS) and the routing
weights' gradient (a different summation order) within tight tolerances; gradients of whole
pipelines, gradcheck / gradgradcheck and opcheck on the GPU; argument errors. Skipped without a
CUDA device (and without a CUDA build of the extension)."""
import pytest
import torch
from torch.library import opcheck

from revengine import moe

R = torch.ops.revengine

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA MoE kernels are compared with the CPU ones only on a GPU"
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FLOAT_IDS = ["float64", "float32", "bfloat16", "float16"]
# (tokens T, experts E, top-k k, hidden H)
SHAPES = [(7, 5, 1, 3), (9, 6, 2, 4), (12, 8, 4, 5), (1, 3, 2, 2), (300, 16, 4, 40), (257, 64, 8, 129)]
SHAPE_IDS = [f"T{t}-E{e}-k{k}-H{h}" for t, e, k, h in SHAPES]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def routing(T, E, k, seed=0, dtype=torch.int64, skip_experts=True):
    """topk_ids [T, k] (CPU): distinct experts per token, only even experts when skip_experts and
    there are enough of them (so some experts get no tokens)."""
    g = gen(seed)
    pool = torch.arange(0, E, 2) if skip_experts and (E + 1) // 2 >= k else torch.arange(E)
    if T == 0:
        return torch.zeros(0, k, dtype=dtype)
    return torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]).to(dtype)


def random_ids(T, E, k, seed=0, dtype=torch.int64):
    """topk_ids [T, k] (CPU) drawn uniformly (repeats within a token allowed: permute does not care)."""
    return torch.randint(0, E, (T, k), generator=gen(seed)).to(dtype)


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def tight(dtype):
    """scatter_combine: the same operations in the same order as the CPU kernel, so bit-identical
    where the host compiler does not contract the CPU loop's multiply-add into an FMA (x86-64
    without -march); about one rounding of the output otherwise (e.g. aarch64)."""
    return {
        torch.float64: dict(rtol=1e-13, atol=1e-14),
        torch.float32: dict(rtol=1e-6, atol=1e-7),
        torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
        torch.float16: dict(rtol=1e-3, atol=1e-5),
    }[dtype]


def tol(dtype):
    """Results that may differ from the CPU's in summation order: the routing weights' dot products
    (a tree reduction on CUDA), the grouped matmuls (cuBLAS, reduced-precision reductions allowed for
    bfloat16/float16)."""
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
    }[dtype]


def both(*tensors):
    """The tensors and CUDA copies of them."""
    return tensors, tuple(t.cuda() for t in tensors)


def assert_same(cuda, cpu):
    assert cuda.device.type == "cuda" and cuda.dtype == cpu.dtype and cuda.shape == cpu.shape
    assert torch.equal(cuda.cpu(), cpu), f"max |diff| = {(cuda.cpu().double() - cpu.double()).abs().max()}"


# ------------------------------------------------------------------------------------------
# moe_permute: identical to the CPU (stable)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize(
    "T,E,k",
    [(7, 5, 1), (9, 6, 2), (12, 8, 4), (0, 4, 2), (5000, 16, 4), (3, 1, 1), (100000, 64, 8), (70000, 1, 1),
     (20000, 3000, 4), (500, 20000, 2)],
)
def test_permute_matches_cpu(T, E, k, id_dtype):
    if id_dtype == torch.int16 and E > 32767:
        pytest.skip("ids do not fit int16")
    ids = routing(T, E, k, seed=T + k, dtype=id_dtype) if T < 100 else random_ids(T, E, k, seed=T, dtype=id_dtype)
    slots_c, off_c = R.moe_permute(ids, E)
    slots_d, off_d = R.moe_permute(ids.cuda(), E)
    assert_same(slots_d, slots_c)
    assert_same(off_d, off_c)
    # and against a stable sort
    ref = torch.sort(ids.reshape(-1).long(), stable=True).indices
    assert torch.equal(slots_d.cpu(), ref)


def test_permute_large_expert_count():
    """E + 1 above the kernel's counter budget: one chunk, every expert its own bucket."""
    T, E, k = 40, 300000, 2
    ids = random_ids(T, E, k, seed=1)
    slots_c, off_c = R.moe_permute(ids, E)
    slots_d, off_d = R.moe_permute(ids.cuda(), E)
    assert_same(slots_d, slots_c)
    assert_same(off_d, off_c)


def test_permute_skewed_and_noncontiguous():
    ids = torch.zeros(4096, 4, dtype=torch.long)  # every slot to expert 0 (one big group per tile)
    ids[::7, 1] = 3
    for t in (ids, ids.t().contiguous().t()):
        slots_c, off_c = R.moe_permute(t, 5)
        slots_d, off_d = R.moe_permute(t.cuda(), 5)
        assert_same(slots_d, slots_c)
        assert_same(off_d, off_c)


def test_permute_out_of_range_ids_are_caught_by_grouped_mm():
    """CUDA does not check topk_ids (that needs a host sync): the bad slot goes after the last
    expert, sorted_slots stays a permutation and expert_offsets[E] < T*k, which grouped_mm rejects."""
    ids = torch.tensor([[0, 1], [4, 2]], device="cuda")
    slots, offsets = R.moe_permute(ids, 4)
    assert sorted(slots.tolist()) == [0, 1, 2, 3] and slots[-1].item() == 2
    assert offsets.tolist() == [0, 1, 2, 3, 3]
    xs = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"expert_offsets\[E\] = 3 must equal the number of rows of x, 4"):
        R.moe_grouped_mm(xs, torch.randn(4, 2, 3, device="cuda"), offsets)


# ------------------------------------------------------------------------------------------
# forward and backward ops vs CPU
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("T,E,k,H", SHAPES, ids=SHAPE_IDS)
def test_ops_match_cpu(T, E, k, H, dtype):
    ids = routing(T, E, k, seed=1)
    slots, offsets = R.moe_permute(ids, E)
    (x, g, y, gates, gy, gt), (xd, gd, yd, gates_d, gyd, gtd) = both(
        randn(T, H, dtype=dtype, seed=2), randn(T * k, H, dtype=dtype, seed=3), randn(T * k, 6, dtype=dtype, seed=4),
        randn(T, k, dtype=dtype, seed=5), randn(T, 6, dtype=dtype, seed=6), randn(T * k, H, dtype=dtype, seed=7))
    sd, od = slots.cuda(), offsets.cuda()
    # bit-identical: row copies, fixed-order opmath sums, one rounded product per element
    assert_same(R.moe_gather(xd, sd, k), R.moe_gather(x, slots, k))
    assert_same(R.moe_gather_backward(gd, sd, k), R.moe_gather_backward(g, slots, k))
    out = R.moe_scatter_combine(yd, gates_d, sd, T)
    assert out.device.type == "cuda" and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), R.moe_scatter_combine(y, gates, slots, T), **tight(dtype))
    dy_c, dw_c = R.moe_scatter_combine_backward(gy, y, gates, slots)
    dy_d, dw_d = R.moe_scatter_combine_backward(gyd, yd, gates_d, sd)
    assert_same(dy_d, dy_c)
    assert dw_d.dtype == dw_c.dtype == dtype
    torch.testing.assert_close(dw_d.cpu(), dw_c, **tol(dtype))  # dot products: a tree reduction on CUDA
    # cuBLAS per expert
    w = randn(E, 6, H, dtype=dtype, seed=8)
    out_c = R.moe_grouped_mm(gt, w, offsets)
    out_d = R.moe_grouped_mm(gtd, w.cuda(), od)
    assert out_d.device.type == "cuda" and out_d.dtype == dtype
    torch.testing.assert_close(out_d.cpu(), out_c, **tol(dtype))
    gw_c = R.moe_grouped_mm_weight_grad(y, gt, offsets)
    gw_d = R.moe_grouped_mm_weight_grad(yd, gtd, od)
    torch.testing.assert_close(gw_d.cpu(), gw_c, **tol(dtype))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scatter_combine_mixed_weight_dtypes(dtype, wdtype):
    T, E, k, H = 33, 7, 3, 17
    slots, _ = R.moe_permute(routing(T, E, k, seed=9, skip_experts=False), E)
    (y, gates, g), (yd, gates_d, gd) = both(randn(T * k, H, dtype=dtype, seed=10), randn(T, k, dtype=wdtype, seed=11),
                                            randn(T, H, dtype=dtype, seed=12))
    torch.testing.assert_close(R.moe_scatter_combine(yd, gates_d, slots.cuda(), T).cpu(),
                               R.moe_scatter_combine(y, gates, slots, T), **tight(dtype))
    dy_c, dw_c = R.moe_scatter_combine_backward(g, y, gates, slots)
    dy_d, dw_d = R.moe_scatter_combine_backward(gd, yd, gates_d, slots.cuda())
    assert_same(dy_d, dy_c)
    assert dw_d.dtype == wdtype
    torch.testing.assert_close(dw_d.cpu(), dw_c, **tol(wdtype if wdtype != torch.float64 else torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("H", [1, 3, 8, 12, 130])
def test_gather_unaligned_rows(dtype, H):
    """Row sizes and base offsets that rule out the 16/8/4-byte copy units."""
    T, k = 11, 3
    slots, _ = R.moe_permute(routing(T, 5, k, seed=13, skip_experts=False), 5)
    xbig = randn(T + 1, H, dtype=dtype, seed=14)
    xbig_d = xbig.cuda()
    views = [lambda b: b[1:], lambda b: b.reshape(-1)[1:T * H + 1].reshape(T, H)]  # offset base pointers
    for view in views:
        x, xd = view(xbig), view(xbig_d)
        assert xd.is_contiguous() and xd.storage_offset() > 0
        assert_same(R.moe_gather(xd, slots.cuda(), k), R.moe_gather(x, slots, k))


def test_noncontiguous_inputs():
    T, E, k, H = 8, 4, 2, 5
    slots, offsets = R.moe_permute(routing(T, E, k, seed=15, skip_experts=False), E)
    sd, od = slots.cuda(), offsets.cuda()
    x = randn(H, T, seed=16).t()
    w = randn(E, H, 6, seed=17).transpose(1, 2)
    gates = randn(k, T, seed=18).t()
    xs_c = R.moe_gather(x, slots, k)
    xs_d = R.moe_gather(x.cuda(), sd, k)
    assert_same(xs_d, xs_c)
    y_c, y_d = R.moe_grouped_mm(xs_c, w, offsets), R.moe_grouped_mm(xs_d, w.cuda(), od)
    torch.testing.assert_close(y_d.cpu(), y_c, rtol=1e-12, atol=1e-12)
    y_nc = torch.stack([y_c, 2 * y_c], -1)[..., 0]
    assert not y_nc.is_contiguous()
    y_nc_d = torch.stack([y_d, 2 * y_d], -1)[..., 0]
    torch.testing.assert_close(R.moe_scatter_combine(y_nc_d, gates.cuda(), sd, T).cpu(),
                               R.moe_scatter_combine(y_nc, gates, slots, T), rtol=1e-12, atol=1e-12)


def test_empty():
    ids = torch.zeros(0, 2, dtype=torch.long, device="cuda")
    slots, offsets = R.moe_permute(ids, 3)
    assert slots.shape == (0,) and offsets.tolist() == [0, 0, 0, 0] and slots.is_cuda
    x = torch.zeros(0, 4, device="cuda", requires_grad=True)
    w = torch.randn(3, 5, 4, device="cuda", requires_grad=True)
    out = moe.scatter_combine(moe.grouped_mm(moe.gather(x, slots, 2), w, offsets),
                              torch.zeros(0, 2, device="cuda"), slots)
    assert out.shape == (0, 5) and out.is_cuda
    out.sum().backward()
    assert x.grad.shape == (0, 4) and torch.equal(w.grad, torch.zeros_like(w))
    # H = 0: grad_weights are zeros
    y, gates = torch.zeros(6, 0, device="cuda"), torch.randn(3, 2, device="cuda")
    s2, _ = R.moe_permute(torch.tensor([[0, 1], [1, 2], [2, 0]], device="cuda"), 3)
    dy, dw = R.moe_scatter_combine_backward(torch.zeros(3, 0, device="cuda"), y, gates, s2)
    assert dy.shape == (6, 0) and torch.equal(dw, torch.zeros_like(gates))


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
def pipeline(x, ids, w_up, w_down, gates):
    E, k = w_up.shape[0], ids.shape[1]
    slots, offsets = moe.permute(ids, E)
    h = torch.nn.functional.silu(moe.grouped_mm(moe.gather(x, slots, k), w_up, offsets))
    return moe.scatter_combine(moe.grouped_mm(h, w_down, offsets), gates, slots)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("T,E,k,H", [(9, 6, 2, 4), (64, 8, 2, 32), (200, 16, 4, 48)])
def test_pipeline_grads_match_cpu(T, E, k, H, dtype):
    ids = routing(T, E, k, seed=20)
    leaves_c = [randn(T, H, dtype=dtype, seed=21), randn(E, 12, H, dtype=dtype, seed=22),
                randn(E, H, 12, dtype=dtype, seed=23), torch.softmax(randn(T, k, seed=24), -1).to(dtype)]
    leaves_d = [t.cuda().requires_grad_() for t in leaves_c]
    leaves_c = [t.requires_grad_() for t in leaves_c]
    gout = randn(T, H, dtype=dtype, seed=25)
    out_c = pipeline(leaves_c[0], ids, *leaves_c[1:])
    out_d = pipeline(leaves_d[0], ids.cuda(), *leaves_d[1:])

    def check(a, b):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.bfloat16:  # one-ulp differences of the matmuls compound through the layers
            a, b = a.cpu().double(), b.double()
            assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6, f"relative error {(a - b).norm() / b.norm()}"
        else:  # the weights' grads sum over tokens: their rounding grows with the largest term
            t = tol(dtype)
            torch.testing.assert_close(a.cpu(), b, rtol=t["rtol"], atol=t["atol"] * max(1.0, float(b.abs().max())))

    check(out_d, out_c)
    g_c = torch.autograd.grad(out_c, leaves_c, gout)
    g_d = torch.autograd.grad(out_d, leaves_d, gout.cuda())
    for a, b in zip(g_d, g_c):
        check(a, b)


def test_gradcheck_cuda():
    T, E, k, H = 6, 5, 2, 3
    ids = routing(T, E, k, seed=26).cuda()
    slots, offsets = moe.permute(ids, E)

    def d(*shape, seed):
        return randn(*shape, seed=seed).cuda().requires_grad_()

    x, w, gates = d(T, H, seed=27), d(E, 4, H, seed=28), d(T, k, seed=29)

    def f(x, w, gates):
        return moe.scatter_combine(moe.grouped_mm(moe.gather(x, slots, k), w, offsets), gates, slots)

    assert torch.autograd.gradcheck(f, (x, w, gates))
    assert torch.autograd.gradgradcheck(f, (x, w, gates))


def test_opcheck_cuda():
    T, E, k, H, M = 6, 5, 2, 4, 3
    ids = routing(T, E, k, seed=30).cuda()
    slots, offsets = R.moe_permute(ids, E)

    def d(*shape, seed, dtype=torch.float64, rg=True):
        return randn(*shape, dtype=dtype, seed=seed).cuda().requires_grad_(rg)

    samples = [
        (R.moe_permute.default, (ids, E)),
        (R.moe_permute.default, (routing(9, 8, 4, seed=31, dtype=torch.int32).cuda(), 8)),
        (R.moe_gather.default, (d(T, H, seed=32), slots, k)),
        (R.moe_gather_backward.default, (d(T * k, H, seed=33), slots, k)),
        (R.moe_grouped_mm.default, (d(T * k, H, seed=34), d(E, M, H, seed=35), offsets)),
        (R.moe_grouped_mm_weight_grad.default, (d(T * k, M, seed=36), d(T * k, H, seed=37), offsets)),
        (R.moe_scatter_combine.default, (d(T * k, H, seed=38), d(T, k, seed=39), slots, T)),
        (R.moe_scatter_combine.default, (d(T * k, H, seed=38, dtype=torch.float32), d(T, k, seed=39), slots, T)),
        (R.moe_scatter_combine_backward.default, (d(T, H, seed=40), d(T * k, H, seed=41), d(T, k, seed=42), slots)),
    ]
    for op, args in samples:
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_moe_forward_matches_cpu():
    T, E, k, H, inter = 48, 8, 2, 16, 8
    ids = routing(T, E, k, seed=43)
    args = [randn(T, H, seed=44), ids, torch.softmax(randn(T, k, seed=45), -1), randn(E, 2 * inter, H, seed=46),
            randn(E, H, inter, seed=47)]
    out_c = moe.moe_forward(*args)
    out_d = moe.moe_forward(*[a.cuda() for a in args])
    torch.testing.assert_close(out_d.cpu(), out_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_d, moe.moe_forward_reference(*[a.cuda() for a in args]), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# argument errors (the CPU kernels' messages)
# ------------------------------------------------------------------------------------------
def test_errors_cuda():
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]], device="cuda")
    slots, offsets = R.moe_permute(ids, 3)
    x = torch.randn(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="sorted_slots is on cpu but x is on cuda"):
        R.moe_gather(x, slots.cpu(), 2)
    with pytest.raises(RuntimeError, match=r"sorted_slots must have T\*k = 3\*4 elements"):
        R.moe_gather(x, slots, 4)
    with pytest.raises(RuntimeError, match="sorted_slots must be int64"):
        R.moe_gather(x, slots.int(), 2)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        R.moe_gather(x.long(), slots, 2)
    with pytest.raises(RuntimeError, match="topk_ids must be int64, int32 or int16, got Float"):
        R.moe_permute(torch.zeros(2, 2, device="cuda"), 4)
    with pytest.raises(RuntimeError, match="num_experts must be >= 1"):
        R.moe_permute(ids, 0)
    xs = R.moe_gather(x, slots, 2)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        R.moe_grouped_mm(xs, torch.randn(3, 5, 4), offsets)
    with pytest.raises(RuntimeError, match="expert_offsets is on cpu but x is on cuda"):
        R.moe_grouped_mm(xs, torch.randn(3, 5, 4, device="cuda"), offsets.cpu())
    with pytest.raises(RuntimeError, match="expert_offsets must be non-decreasing"):
        R.moe_grouped_mm(xs, torch.randn(3, 5, 4, device="cuda"), torch.tensor([0, 4, 2, 6], device="cuda"))
    with pytest.raises(RuntimeError, match=r"expert_offsets\[0\] must be 0"):
        R.moe_grouped_mm_weight_grad(torch.randn(6, 5, device="cuda"), xs, torch.tensor([1, 2, 4, 6], device="cuda"))
    y = torch.randn(6, 5, device="cuda")
    with pytest.raises(RuntimeError, match="weights is on cpu but y is on cuda"):
        R.moe_scatter_combine(y, torch.rand(3, 2), slots, 3)
    with pytest.raises(RuntimeError, match=r"y must have T\*k = 6 rows"):
        R.moe_scatter_combine(y[:5], torch.rand(3, 2, device="cuda"), slots[:5], 3)
