"""MoE routing kernels (csrc/moe_ops.cpp, revengine/moe.py): values vs plain-torch references,
gradients (gradcheck / gradgradcheck in float64), opcheck, argument errors, moe_forward vs the
Python loop over experts, and a smoke run of benchmarks/moe_kernels.py."""
import json

import pytest
import torch
from torch.library import opcheck

from conftest import load_benchmark
from revengine import moe

R = torch.ops.revengine

FLOATS = [torch.float64, torch.float32]
DTYPE_IDS = ["float64", "float32"]
# (tokens T, experts E, top-k k, hidden H): zero-token experts are forced by `routing` below.
SHAPES = [(7, 5, 1, 3), (9, 6, 2, 4), (12, 8, 4, 5), (1, 3, 2, 2)]
SHAPE_IDS = [f"T{t}-E{e}-k{k}-H{h}" for t, e, k, h in SHAPES]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def routing(T, E, k, seed=0, dtype=torch.int64, skip_experts=True):
    """topk_ids [T, k]: distinct experts per token, drawn from the even experts only when
    skip_experts (so the odd ones get zero tokens) and there are enough of them."""
    g = gen(seed)
    pool = torch.arange(0, E, 2) if skip_experts and (E + 1) // 2 >= k else torch.arange(E)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]) if T else torch.zeros(0, k)
    return ids.to(dtype)


def randn(*shape, dtype=torch.float64, seed=0, rg=False):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype).requires_grad_(rg)


def ref_permute(ids, E):
    flat = ids.reshape(-1).long()
    slots = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=E), 0)
    return slots, offsets


def ref_grouped_mm(x, w, offsets):
    outs = [x[offsets[e]:offsets[e + 1]] @ w[e].t() for e in range(w.shape[0])]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def ref_scatter_combine(y, w, slots, T):
    k = w.shape[1]
    pos = torch.empty_like(slots)
    pos[slots] = torch.arange(slots.numel())
    return (w.reshape(T, k, 1).to(y.dtype) * y[pos].reshape(T, k, -1)).sum(1)


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# moe_permute
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("T,E,k", [(7, 5, 1), (9, 6, 2), (12, 8, 4), (0, 4, 2), (5000, 16, 4), (3, 1, 1)])
def test_permute(T, E, k, id_dtype):
    ids = routing(T, E, k, seed=T + k, dtype=id_dtype, skip_experts=T < 100)
    slots, offsets = moe.permute(ids, E)
    rs, ro = ref_permute(ids, E)
    assert slots.dtype == offsets.dtype == torch.int64
    assert torch.equal(slots, rs) and torch.equal(offsets, ro)
    if T >= 100:  # spans several counting-sort chunks; result independent of the thread count
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            s1, o1 = moe.permute(ids, E)
        finally:
            torch.set_num_threads(n)
        assert torch.equal(s1, slots) and torch.equal(o1, offsets)


def test_permute_noncontiguous():
    ids = routing(10, 6, 4, seed=3).t().contiguous().t()  # [10, 4], transposed strides
    assert not ids.is_contiguous()
    slots, offsets = moe.permute(ids, 6)
    rs, ro = ref_permute(ids, 6)
    assert torch.equal(slots, rs) and torch.equal(offsets, ro)


# ------------------------------------------------------------------------------------------
# values of gather / grouped_mm / scatter_combine vs references
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS)
@pytest.mark.parametrize("T,E,k,H", SHAPES, ids=SHAPE_IDS)
def test_values(T, E, k, H, dtype):
    ids = routing(T, E, k, seed=1)
    slots, offsets = moe.permute(ids, E)
    assert (offsets[1:] - offsets[:-1] == 0).any() or E <= k  # some experts get no tokens
    x = randn(T, H, dtype=dtype, seed=2)
    xs = moe.gather(x, slots, k)
    assert torch.equal(xs, x[slots // k])
    w = randn(E, 6, H, dtype=dtype, seed=3)
    y = moe.grouped_mm(xs, w, offsets)
    torch.testing.assert_close(y, ref_grouped_mm(xs, w, offsets), **tol(dtype))
    gates = randn(T, k, dtype=dtype, seed=4)
    out = moe.scatter_combine(y, gates, slots)
    assert out.shape == (T, 6) and out.dtype == dtype
    torch.testing.assert_close(out, ref_scatter_combine(y, gates, slots, T), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_low_precision(dtype):
    T, E, k, H = 16, 6, 2, 8
    ids = routing(T, E, k, seed=5)
    slots, offsets = moe.permute(ids, E)
    x = randn(T, H, dtype=dtype, seed=6)
    w = randn(E, 4, H, dtype=dtype, seed=7)
    gates = randn(T, k, dtype=torch.float32, seed=8)  # float32 gates with low-precision activations
    out = moe.scatter_combine(moe.grouped_mm(moe.gather(x, slots, k), w, offsets), gates, slots)
    assert out.dtype == dtype
    xs = x.double()[slots // k]
    ref = ref_scatter_combine(ref_grouped_mm(xs, w.double(), offsets), gates.double(), slots, T)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_noncontiguous_inputs():
    T, E, k, H = 8, 4, 2, 5
    ids = routing(T, E, k, seed=9, skip_experts=False)
    slots, offsets = moe.permute(ids, E)
    x = randn(H, T, seed=10).t()  # [T, H], not contiguous
    w = randn(E, H, 6, seed=11).transpose(1, 2)  # [E, 6, H], not contiguous
    gates = randn(k, T, seed=12).t()
    xs = moe.gather(x, slots, k)
    y = moe.grouped_mm(xs, w, offsets)
    torch.testing.assert_close(y, ref_grouped_mm(xs, w, offsets), rtol=1e-12, atol=1e-12)
    y_nc = torch.stack([y, 2 * y], -1)[..., 0]  # same values, strided
    assert not y_nc.is_contiguous()
    torch.testing.assert_close(moe.scatter_combine(y_nc, gates, slots), ref_scatter_combine(y, gates, slots, T),
                               rtol=1e-12, atol=1e-12)


def test_empty():
    ids = torch.zeros(0, 2, dtype=torch.long)
    slots, offsets = moe.permute(ids, 3)
    assert slots.shape == (0,) and offsets.tolist() == [0, 0, 0, 0]
    x = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(3, 5, 4, requires_grad=True)
    out = moe.scatter_combine(moe.grouped_mm(moe.gather(x, slots, 2), w, offsets), torch.zeros(0, 2), slots)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert x.grad.shape == (0, 4) and torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------
# gradients (float64)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k,H", SHAPES, ids=SHAPE_IDS)
def test_gradcheck(T, E, k, H):
    ids = routing(T, E, k, seed=13)
    slots, offsets = moe.permute(ids, E)
    x = randn(T, H, seed=14, rg=True)
    xs = randn(T * k, H, seed=15, rg=True)
    w = randn(E, 3, H, seed=16, rg=True)
    y = randn(T * k, 3, seed=17, rg=True)
    gates = randn(T, k, seed=18, rg=True)
    assert torch.autograd.gradcheck(lambda x: moe.gather(x, slots, k), (x,))
    assert torch.autograd.gradcheck(lambda a, b: moe.grouped_mm(a, b, offsets), (xs, w))
    assert torch.autograd.gradcheck(lambda a, b: moe.scatter_combine(a, b, slots), (y, gates))


def test_gradgradcheck():
    T, E, k, H = 6, 5, 2, 3
    ids = routing(T, E, k, seed=19)
    slots, offsets = moe.permute(ids, E)
    x = randn(T, H, seed=20, rg=True)
    w = randn(E, 4, H, seed=21, rg=True)
    gates = randn(T, k, seed=22, rg=True)

    def f(x, w, gates):
        return moe.scatter_combine(moe.grouped_mm(moe.gather(x, slots, k), w, offsets), gates, slots)

    assert torch.autograd.gradcheck(f, (x, w, gates))
    assert torch.autograd.gradgradcheck(f, (x, w, gates))


def test_grad_of_empty_expert_is_zero():
    ids = torch.tensor([[0, 2], [2, 0], [0, 2]])
    slots, offsets = moe.permute(ids, 4)
    x = randn(3, 4, seed=23)
    w = randn(4, 5, 4, seed=24, rg=True)
    moe.grouped_mm(moe.gather(x, slots, 2), w, offsets).sum().backward()
    assert torch.equal(w.grad[1], torch.zeros(5, 4)) and torch.equal(w.grad[3], torch.zeros(5, 4))
    assert w.grad[0].abs().sum() > 0 and w.grad[2].abs().sum() > 0


# ------------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensor / Meta, AOT dispatch)
# ------------------------------------------------------------------------------------------
def _opcheck_samples():
    T, E, k, H, M = 6, 5, 2, 4, 3
    ids = routing(T, E, k, seed=25)
    slots, offsets = moe.permute(ids, E)
    return [
        (R.moe_permute.default, (ids, E)),
        (R.moe_permute.default, (routing(9, 8, 4, seed=26, dtype=torch.int32), 8)),
        (R.moe_gather.default, (randn(T, H, seed=27, rg=True), slots, k)),
        (R.moe_gather.default, (randn(T, H, dtype=torch.float32, seed=27), slots, k)),
        (R.moe_gather_backward.default, (randn(T * k, H, seed=28, rg=True), slots, k)),
        (R.moe_grouped_mm.default, (randn(T * k, H, seed=29, rg=True), randn(E, M, H, seed=30, rg=True), offsets)),
        (R.moe_grouped_mm.default, (randn(T * k, H, dtype=torch.float32, seed=29, rg=True),
                                    randn(E, M, H, dtype=torch.float32, seed=30), offsets)),
        (R.moe_grouped_mm_weight_grad.default, (randn(T * k, M, seed=31, rg=True), randn(T * k, H, seed=32, rg=True),
                                                offsets)),
        (R.moe_scatter_combine.default, (randn(T * k, H, seed=33, rg=True), randn(T, k, seed=34, rg=True), slots, T)),
        (R.moe_scatter_combine.default, (randn(T * k, H, dtype=torch.float32, seed=33, rg=True),
                                         randn(T, k, seed=34, rg=True), slots, T)),
        (R.moe_scatter_combine_backward.default, (randn(T, H, seed=35, rg=True), randn(T * k, H, seed=36, rg=True),
                                                  randn(T, k, seed=37, rg=True), slots)),
    ]


def test_opcheck():
    seen = set()
    for op, args in _opcheck_samples():
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
        seen.add(op.name())
    assert seen == {f"revengine::moe_{n}" for n in ("permute", "gather", "gather_backward", "grouped_mm",
                                                    "grouped_mm_weight_grad", "scatter_combine",
                                                    "scatter_combine_backward")}


def test_meta_shapes():
    ids = torch.empty(10, 4, dtype=torch.int32, device="meta")
    slots, offsets = R.moe_permute(ids, 16)
    assert slots.shape == (40,) and offsets.shape == (17,) and slots.dtype == torch.int64
    x = torch.empty(10, 8, device="meta")
    xs = R.moe_gather(x, slots, 4)
    y = R.moe_grouped_mm(xs, torch.empty(16, 6, 8, device="meta"), offsets)
    assert xs.shape == (40, 8) and y.shape == (40, 6)
    assert R.moe_scatter_combine(y, torch.empty(10, 4, device="meta"), slots, 10).shape == (10, 6)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_errors_permute():
    with pytest.raises(RuntimeError, match=r"topk_ids must be in \[0, num_experts = 4\), got 4 at token 1, choice 0"):
        moe.permute(torch.tensor([[0, 1], [4, 2]]), 4)
    with pytest.raises(RuntimeError, match=r"topk_ids must be in \[0, num_experts = 4\), got -1"):
        moe.permute(torch.tensor([[0, -1]], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="topk_ids must be int64, int32 or int16, got Float"):
        moe.permute(torch.zeros(2, 2), 4)
    with pytest.raises(RuntimeError, match=r"topk_ids must be 2-D \[T, k\]"):
        moe.permute(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(RuntimeError, match="num_experts must be >= 1"):
        moe.permute(torch.zeros(2, 2, dtype=torch.long), 0)


def test_errors_ops():
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    slots, offsets = moe.permute(ids, 3)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"sorted_slots must have T\*k = 3\*4 elements"):
        moe.gather(x, slots, 4)
    with pytest.raises(RuntimeError, match="sorted_slots must be int64"):
        moe.gather(x, slots.int(), 2)
    with pytest.raises(RuntimeError, match=r"sorted_slots\[0\] = 6 is out of range \[0, T\*k = 6\)"):
        moe.gather(x, torch.tensor([6, 0, 1, 2, 3, 4]), 2)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        moe.gather(x.long(), slots, 2)
    xs = moe.gather(x, slots, 2)
    with pytest.raises(RuntimeError, match="does not match x"):
        moe.grouped_mm(xs, torch.randn(3, 5, 3), offsets)
    with pytest.raises(RuntimeError, match="expert_offsets must have E\\+1 = 5 elements"):
        moe.grouped_mm(xs, torch.randn(4, 5, 4), offsets)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        moe.grouped_mm(xs, torch.randn(3, 5, 4, dtype=torch.float64), offsets)
    with pytest.raises(RuntimeError, match=r"expert_offsets\[E\] = 6 must equal the number of rows of x, 5"):
        moe.grouped_mm(xs[:5], torch.randn(3, 5, 4), offsets)
    with pytest.raises(RuntimeError, match="expert_offsets must be non-decreasing"):
        moe.grouped_mm(xs, torch.randn(3, 5, 4), torch.tensor([0, 4, 2, 6]))
    with pytest.raises(RuntimeError, match=r"expert_offsets\[0\] must be 0"):
        moe.grouped_mm(xs, torch.randn(3, 5, 4), torch.tensor([1, 2, 4, 6]))
    y = torch.randn(6, 5)
    with pytest.raises(RuntimeError, match="weights must be \\[T, k\\] with T = num_tokens = 4"):
        moe.scatter_combine(y, torch.rand(3, 2), slots, 4)
    with pytest.raises(RuntimeError, match=r"y must have T\*k = 6 rows"):
        moe.scatter_combine(y[:5], torch.rand(3, 2), slots[:5])
    with pytest.raises(RuntimeError, match="slot 1 appears twice in sorted_slots"):
        moe.scatter_combine(y, torch.rand(3, 2), torch.tensor([0, 1, 1, 3, 4, 5]))
    with pytest.raises(RuntimeError, match="out of range"):
        moe.scatter_combine(y, torch.rand(3, 2), torch.tensor([0, 1, 2, 3, 4, 7]))


def test_errors_moe_forward():
    x = torch.randn(4, 8)
    ids = torch.zeros(4, 2, dtype=torch.long)
    w = torch.rand(4, 2)
    with pytest.raises(ValueError, match="shapes do not agree"):
        moe.moe_forward(x, ids, w, torch.randn(3, 10, 8), torch.randn(3, 8, 4))
    with pytest.raises(ValueError, match="same shape"):
        moe.moe_forward(x, ids, w[:, :1], torch.randn(3, 10, 8), torch.randn(3, 8, 5))
    with pytest.raises(RuntimeError, match=r"topk_ids must be in \[0, num_experts = 3\), got 3"):
        moe.moe_forward(x, ids + 3, w, torch.randn(3, 10, 8), torch.randn(3, 8, 5))


# ------------------------------------------------------------------------------------------
# moe_forward vs the Python loop over experts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k,H,inter,lead", [(16, 8, 4, 12, 6, ()), (10, 5, 1, 8, 4, ()), (12, 6, 2, 6, 5, (3,))],
                         ids=["k4", "k1", "k2-3d"])
def test_moe_forward_matches_reference(T, E, k, H, inter, lead):
    ids = routing(T, E, k, seed=40)
    gates = torch.softmax(randn(T, k, seed=41), -1)
    shape = (lead[0], T // lead[0]) if lead else (T,)
    leaves = [randn(*shape, H, seed=42, rg=True), gates.reshape(*shape, k).requires_grad_(),
              randn(E, 2 * inter, H, seed=43, rg=True), randn(E, H, inter, seed=44, rg=True)]
    ids = ids.reshape(*shape, k)
    gout = randn(*shape, H, seed=45)
    results = []
    for fn in (moe.moe_forward, moe.moe_forward_reference):
        x, w, gu, dn = leaves
        out = fn(x, ids, w, gu, dn)
        grads = torch.autograd.grad(out, leaves, gout)
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_moe_forward_gradcheck():
    T, E, k, H, inter = 5, 4, 2, 3, 2
    ids = routing(T, E, k, seed=46)
    args = (randn(T, H, seed=47, rg=True), torch.rand(T, k, dtype=torch.float64, generator=gen(48)).requires_grad_(),
            randn(E, 2 * inter, H, seed=49, rg=True), randn(E, H, inter, seed=50, rg=True))
    assert torch.autograd.gradcheck(lambda x, w, gu, dn: moe.moe_forward(x, ids, w, gu, dn), args)


# ------------------------------------------------------------------------------------------
# benchmark smoke test
# ------------------------------------------------------------------------------------------
def test_benchmark_quick(capsys, tmp_path):
    bench = load_benchmark("moe_kernels.py")
    out_json = tmp_path / "r.json"
    assert bench.main(["--quick", "--tokens", "16", "48", "--rounds", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "kernels f+b ms" in out and "loop f+b ms" in out and "ratio" in out
    rows = [line for line in out.splitlines() if line.strip().split("|")[0].strip().isdigit()]
    assert len(rows) == 2, out
    res = json.loads(out_json.read_text())
    assert [r["tokens"] for r in res["rows"]] == [16, 48]
    assert all(r["max_abs_diff"] < 1e-4 for r in res["rows"])
