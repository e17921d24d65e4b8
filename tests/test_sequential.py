"""revengine.Sequential and the C++ executor: exact gradients, the hard cases, bad input."""
import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st

import revengine as rev
from revengine.testing import strategies as rst
from conftest import KINDS, NotInvertible, UserCoupling, make_layer, max_grad_err, mlp, rel_err, run_step

MODES = ["reversible", "checkpoint"]


def stack(kind, depth, width, mode="reversible", dropout=0.0, ctx=False, dtype=torch.float64, **kw):
    layers = [make_layer(kind, width, dtype=dtype, dropout=dropout, ctx=ctx) for _ in range(depth)]
    return rev.Sequential(*layers, mode=mode, **kw)


def same_layers(seq, mode, **kw):
    return rev.Sequential(*seq.layers, mode=mode, split=seq.split, merge=seq.merge, **kw)


# --- gradients against mode="plain" ----------------------------------------------------------------

# User couplings run their own inverse without RNG replay, so they are checked without dropout
# (test_user_coupling_with_dropout_is_caught_by_debug shows what happens with it).
GRAD_CASES = [(k, d) for k in KINDS for d in (0.0, 0.2) if not (k == "user" and d)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind,dropout", GRAD_CASES)
def test_grads_equal_plain_float64_depth16(kind, mode, dropout):
    seq = stack(kind, 16, 6, dropout=dropout)
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    plain = run_step(same_layers(seq, "plain"), x)
    got = run_step(same_layers(seq, mode), x)
    assert rel_err(got[0], plain[0]) <= 1e-10
    assert max_grad_err(got, plain) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_grads_with_context_kwargs(kind, mode):
    seq = stack(kind, 16, 4, ctx=True)
    x = torch.randn(3, 8, dtype=torch.float64)
    ref_scale = torch.rand(4, dtype=torch.float64) + 0.5
    cos, sin = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    results = {}
    for m in ("plain", mode):
        scale = ref_scale.clone().requires_grad_(True)
        out = run_step(same_layers(seq, m), x, scale=scale, rope=(cos, sin), flag=True)
        results[m] = out + (scale.grad.clone(),)
    assert max_grad_err(results[mode], results["plain"]) <= 1e-10
    assert rel_err(results[mode][3], results["plain"][3]) <= 1e-10


# --- the executor on CUDA (skipped without a GPU) ----------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the executor's CUDA path "
                                                                      "runs only on a GPU")
# (kind, exact, dropout): every coupling kind; fixed point where it exists; dropout replays CUDA's RNG
CUDA_CASES = [(k, False, d) for k, d in GRAD_CASES] + [("additive", True, 0.0), ("additive", True, 0.2),
                                                      ("bdia", False, 0.2), ("bdia", True, 0.0), ("bdia", True, 0.2)]


def cuda_case_stack(kind, exact, dropout, mode, depth=8, width=6):
    if kind == "bdia":  # float: gamma 1/2 keeps the 2^depth drift of its inverse small at depth 8
        layers = [rev.BDIA(mlp(width, dropout=dropout, gain=0.5), 2.0**-4 if exact else 0.5) for _ in range(depth)]
        return rev.Sequential(*layers, mode=mode, split="duplicate", merge="last", exact=exact, exact_bits=24)
    return stack(kind, depth, width, mode=mode, dropout=dropout, exact=exact, exact_bits=24 if exact else 16)


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind,exact,dropout", CUDA_CASES)
def test_cuda_grads_equal_plain_and_cpu(kind, exact, dropout, mode):
    seq = cuda_case_stack(kind, exact, dropout, mode).cuda()
    seq.debug, seq.debug_tol = mode == "reversible", (0.0 if exact else None)
    x = torch.randn(5, 3, 6 if kind == "bdia" else 12, dtype=torch.float64)
    plain = run_step(same_layers(seq, "plain", exact=exact, exact_bits=seq.exact_bits), x.cuda())
    got = run_step(seq, x.cuda())
    assert got[0].device.type == "cuda" and got[1].device.type == "cuda"
    assert rel_err(got[0], plain[0]) <= 1e-10 and max_grad_err(got, plain) <= 1e-10
    if mode == "reversible" and exact:
        assert seq.last_report.reconstruction_errors == [0.0] * 8
    if dropout == 0.0 and kind != "bdia":  # the CPU's numbers (bdia's signs are per-device draws)
        cpu = run_step(copy.deepcopy(seq).cpu(), x)
        on_cpu = (got[0].cpu(), got[1].cpu(), [g.cpu() if g is not None else None for g in got[2]])
        assert rel_err(on_cpu[0], cpu[0]) <= 1e-10 and max_grad_err(on_cpu, cpu) <= 1e-10


def test_dropout_replays_rng_and_leaves_caller_rng_alone():
    seq = stack("additive", 8, 8, dropout=0.5)
    x = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = seq(x)
    state = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), state), "backward must not move the caller's RNG"
    plain = run_step(same_layers(seq, "plain"), x, seed=3)
    got = run_step(seq, x, seed=3)
    assert max_grad_err(got, plain) <= 1e-10
    # Without replay, the recompute draws other masks: the grads are then wrong.
    no_replay = run_step(same_layers(seq, "reversible", preserve_rng_state=False, check_finite=False), x, seed=3)
    assert max_grad_err(no_replay, plain) > 1e-3


@settings(max_examples=25, deadline=None)
@given(
    shape=rst.stream_shapes(max_half_width=6),
    depth=rst.depths(1, 6),
    lam=rst.scales(),
    beta=rst.scales(),
    dtype=rst.float_dtypes(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_additive_stacks(shape, depth, lam, beta, dtype, seed):
    torch.manual_seed(seed)
    half = shape[-1] // 2
    layers = [rev.AdditiveCoupling(mlp(half, dtype=dtype), mlp(half, dtype=dtype), lam=lam, beta=beta) for _ in range(depth)]
    seq = rev.Sequential(*layers)
    x = torch.randn(shape, dtype=dtype)
    plain = run_step(same_layers(seq, "plain"), x)
    got = run_step(seq, x)
    tol = 1e-9 if dtype == torch.float64 else 2e-3 * (max(1 / lam, 1 / beta) ** depth)
    assert max_grad_err(got, plain) <= tol


@settings(max_examples=15, deadline=None)
@given(layer=rst.couplings(width=3, dropout=True), x=rst.inputs(width=6))
def test_fuzz_check_layer_float64(layer, x):
    report = rev.testing.check_layer(layer, x)
    assert report.grad_error <= 1e-10
    assert report.reconstruction_error <= 1e-10 * max(1.0, report.scale)


# --- exact=True ----------------------------------------------------------------------------------

def bounded_stack(depth, width, **kw):
    def fn():
        return torch.nn.Sequential(mlp(width, dtype=torch.float32), torch.nn.Tanh())

    return rev.Sequential(*[rev.AdditiveCoupling(fn(), fn()) for _ in range(depth)], **kw)


@pytest.mark.parametrize("autocast", [False, True])
def test_exact_reconstruction_is_bit_exact_at_depth_64(autocast):
    seq = bounded_stack(64, 8, exact=True)
    x = torch.round(torch.randn(32, 16) * 2**16) / 2**16  # representable in the fixed-point format
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = seq(x)
        back = seq.inverse(y)
    assert y.abs().max() < 256  # float32 holds the 16-fractional-bit value exactly
    assert torch.equal(back, x)
    if not autocast:
        # Without exact the same float32 stack only reconstructs approximately.
        loose = bounded_stack(64, 8)
        loose.load_state_dict(seq.state_dict())
        with torch.no_grad():
            assert not torch.equal(loose.inverse(loose(x)), x)


@pytest.mark.parametrize("autocast", [False, True])
def test_exact_backward_reconstructs_bit_exact_and_matches_plain_exact(autocast):
    seq = bounded_stack(48, 4, exact=True, debug=True, debug_tol=0.0)
    x = torch.round(torch.randn(8, 8) * 2**16) / 2**16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = run_step(seq, x)
        assert seq.last_report.reconstruction_errors == [0.0] * 48
        plain = run_step(same_layers(seq, "plain", exact=True), x)
    assert rel_err(got[0], plain[0]) == 0.0
    assert max_grad_err(got, plain) <= (5e-2 if autocast else 1e-4)


def test_exact_rejects_scaled_and_user_couplings():
    with pytest.raises(ValueError, match="exact=True"):
        rev.Sequential(make_layer("meft", 4), exact=True)
    with pytest.raises(ValueError, match="UserCoupling"):
        rev.Sequential(UserCoupling(4), exact=True)


# --- the hard cases --------------------------------------------------------------------------------

def test_bf16_autocast_is_replayed_and_reconstruction_error_reported():
    seq = stack("additive", 8, 16, dtype=torch.float32, debug=True, debug_tol=math.inf)
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_step(seq, x)
        plain = run_step(same_layers(seq, "plain"), x)
        ckpt = run_step(same_layers(seq, "checkpoint"), x)
    errors = seq.last_report.reconstruction_errors
    assert all(0.0 <= e < 1e-4 for e in errors), errors  # fp32 streams, bf16 increments replayed
    assert rel_err(got[0], plain[0]) == 0.0
    # Same bf16 recompute as plain: the grads agree to the reconstruction error, like checkpoint's.
    assert max_grad_err(got, plain) < 1e-2
    assert max_grad_err(ckpt, plain) < 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_buffers_updated_once(mode):
    def fn():
        return torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.BatchNorm1d(4), torch.nn.Tanh()).double()

    layers = [rev.AdditiveCoupling(fn(), fn()) for _ in range(3)]
    x = torch.randn(16, 8, dtype=torch.float64)
    ref = rev.Sequential(*[rev.AdditiveCoupling(fn(), fn()) for _ in range(3)], mode="plain")
    ref.load_state_dict(rev.Sequential(*layers).state_dict())
    plain = run_step(ref, x)
    got = run_step(rev.Sequential(*layers, mode=mode), x)
    assert max_grad_err(got, plain) <= 1e-10
    for (name, a), (_, b) in zip(rev.Sequential(*layers).named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), name
    assert all(int(b) == 1 for n, b in ref.named_buffers() if n.endswith("num_batches_tracked"))


def test_is_recomputing_only_inside_backward():
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            seen.append(rev.is_recomputing())
            return self.lin(x)

    seq = rev.Sequential(rev.AdditiveCoupling(Spy(), Spy()))
    y = seq(torch.randn(3, 4))
    assert seen == [False, False]
    y.sum().backward()
    assert seen == [False, False, True, True]
    assert not rev.is_recomputing()


def test_user_input_saved_by_another_op_is_never_touched():
    seq = stack("additive", 4, 4)
    z = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    x = torch.relu(z)  # ReLU saves its output x for its own backward
    before = x.detach().clone()
    version = x._version
    y = seq(x)
    (y.sum() + x.sum()).backward()
    assert x._version == version and torch.equal(x, before)
    z2 = z.detach().clone().requires_grad_(True)
    x2 = torch.relu(z2)
    (same_layers(seq, "plain")(x2).sum() + x2.sum()).backward()
    assert rel_err(z.grad, z2.grad) <= 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_autograd_grad_wrt_params(mode):
    seq = stack("affine", 6, 4)
    params = list(seq.parameters())
    x = torch.randn(5, 8, dtype=torch.float64)
    grads = {}
    for m in ("plain", mode):
        loss = same_layers(seq, m)(x).square().sum()
        grads[m] = torch.autograd.grad(loss, params)
    assert all(p.grad is None for p in params)
    assert max(rel_err(a, b) for a, b in zip(grads[mode], grads["plain"])) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_over_backward_calls(mode):
    seq = stack("meft", 6, 4)
    xs = [torch.randn(4, 8, dtype=torch.float64) for _ in range(3)]

    def accumulate(s):
        for p in s.parameters():
            p.grad = None
        outs = [s(x).sin().sum() for x in xs]  # all forwards first, then the backwards
        for o in outs:
            o.backward()
        return [p.grad.clone() for p in s.parameters()]

    got, ref = accumulate(same_layers(seq, mode)), accumulate(same_layers(seq, "plain"))
    assert max(rel_err(a, b) for a, b in zip(got, ref)) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_parameters_shared_between_layers(mode):
    f, g = mlp(4), mlp(4)
    layers = [rev.AdditiveCoupling(f, g), rev.AdditiveCoupling(g, f), rev.AdditiveCoupling(f, f)]
    seq = rev.Sequential(*layers, mode=mode)
    x = torch.randn(5, 8, dtype=torch.float64)
    assert max_grad_err(run_step(seq, x), run_step(same_layers(seq, "plain"), x)) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_output_used_twice_and_retain_graph(mode):
    seq = stack("additive", 5, 4)
    x0 = torch.randn(5, 8, dtype=torch.float64)

    def grads(s):
        x = x0.clone().requires_grad_(True)
        y = s(x)
        loss = (y * y).sum() + y.tanh().sum()
        loss.backward(retain_graph=True)
        loss.backward()  # second pass through the same graph accumulates
        return x.grad

    assert rel_err(grads(same_layers(seq, mode)), grads(same_layers(seq, "plain"))) <= 1e-10


@pytest.mark.parametrize("exact", [False, True], ids=["float", "exact"])
def test_backward_consumes_the_outputs_only_when_nobody_holds_them(exact):
    """Without retain_graph the backward rebuilds the inputs inside the saved outputs' memory when
    nothing else holds it, else in copies: the grads are the same either way (and plain's), and an
    output the user still holds keeps its values."""
    seq = stack("additive", 4, 4)
    x0 = torch.randn(3, 8, dtype=torch.float64)

    clones = {}

    def grads(s, hold):
        x = x0.clone().requires_grad_(True)
        ya, yb = s((x[:, :4], x[:, 4:]))
        kept = (ya, yb, ya.detach().clone(), yb.detach().clone()) if hold else None
        loss = (ya * ya).sum() + yb.tanh().sum()
        del ya, yb
        with torch.profiler.profile() as prof:
            loss.backward()
        clones[hold] = sum(e.count for e in prof.key_averages() if e.key == "aten::clone")
        if hold:
            assert torch.equal(kept[0], kept[2]) and torch.equal(kept[1], kept[3])
        return x.grad

    rev_seq = rev.Sequential(*seq.layers, merge=None, mode="reversible", exact=exact)
    ref = rev.Sequential(*seq.layers, merge=None, mode="plain")
    consumed, copied = grads(rev_seq, False), grads(rev_seq, True)
    assert torch.equal(consumed, copied)
    # float: the outputs are the streams' memory, copied only while the user holds them; exact: the
    # user's outputs are float conversions of the fixed-point streams, which are never copied
    assert clones[True] - clones[False] == (0 if exact else 2), clones
    assert clones[False] == 0, clones
    # exact mode rounds every increment to its fixed point (24 fraction bits), plain does not
    assert rel_err(consumed, grads(ref, False)) <= (1e-4 if exact else 1e-10)


def test_second_backward_without_retain_graph_is_a_clear_error():
    seq = stack("additive", 3, 4)
    y = seq(torch.randn(2, 8, dtype=torch.float64, requires_grad=True)).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_no_grad_inference_records_nothing():
    seq = stack("additive", 8, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = seq(x)
        ref = same_layers(seq, "plain")(x)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, ref)


def test_input_without_requires_grad():
    seq = stack("affine", 4, 4)
    x = torch.randn(3, 8, dtype=torch.float64)
    got, ref = {}, {}
    for store, s in ((got, seq), (ref, same_layers(seq, "plain"))):
        for p in s.parameters():
            p.grad = None
        s(x).square().sum().backward()
        store.update({n: p.grad.clone() for n, p in s.named_parameters()})
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-10


def test_frozen_parameters_get_no_grad():
    seq = stack("additive", 4, 4)
    for layer in list(seq.layers)[:2]:
        layer.requires_grad_(False)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    seq(x).sum().backward()
    assert all(p.grad is None for layer in list(seq.layers)[:2] for p in layer.parameters())
    assert all(p.grad is not None for layer in list(seq.layers)[2:] for p in layer.parameters())


def test_graph_holds_only_cpp_nodes():
    seq = stack("additive", 4, 4)
    y = seq(torch.randn(3, 8, dtype=torch.float64, requires_grad=True))
    seen, todo, names = set(), [y.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        assert not isinstance(fn, torch.autograd.function.BackwardCFunction), type(fn)
        todo.extend(f for f, _ in fn.next_functions)
    assert names.count("RevengineLayerBackward") == 4


def test_inverse_round_trip_and_merges():
    seq = stack("meft", 8, 4)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        assert (seq.inverse(seq(x)) - x).abs().max() < 1e-10
        dup = rev.Sequential(*seq.layers, split="duplicate", merge=None)
        y1, y2 = dup(x[:, :4])
        assert (dup.inverse((y1, y2))[0] - x[:, :4]).abs().max() < 1e-10
    with pytest.raises(ValueError, match="loses information"):
        rev.Sequential(*seq.layers, merge="mean").inverse(x)


def test_memory_of_intermediate_outputs_is_not_kept():
    # Intermediate node outputs are placeholders: the graph holds only the final streams.
    seq = stack("additive", 16, 64)
    x = torch.randn(256, 128, dtype=torch.float64, requires_grad=True)
    y = seq(x)
    seen, todo, nodes = set(), [y.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes += fn.name() == "RevengineLayerBackward"
        todo.extend(f for f, _ in fn.next_functions)
    assert nodes == 16


# --- the layers as a sequence ------------------------------------------------------------------------

def test_iteration_indexing_and_slicing():
    seq = stack("additive", 5, 4, merge="mean", exact=True, exact_bits=20, check_finite=False,
                preserve_rng_state=False, debug=True)
    layers = list(seq.layers)
    assert len(seq) == 5 and list(seq) == layers
    assert seq[0] is layers[0] and seq[-1] is layers[4] and seq[2] is layers[2]
    with pytest.raises(IndexError):
        seq[5]
    tail = seq[2:]
    assert type(tail) is rev.Sequential and tail is not seq and len(tail) == 3
    assert all(a is b for a, b in zip(tail, layers[2:]))  # the same modules, not copies
    assert list(seq[::2]) == layers[::2] and len(seq[5:]) == 0
    settings = ("split", "merge", "mode", "exact", "exact_bits", "check_finite", "preserve_rng_state", "debug")
    assert all(getattr(tail, k) == getattr(seq, k) for k in settings)
    assert tail.layers.exact  # a slice of an exact stack checks what is appended to it too


@pytest.mark.parametrize("kind", KINDS)
def test_slices_run_in_sequence_like_the_whole_stack(kind):
    seq = stack(kind, 6, 4)
    head, tail = seq[:2], seq[2:]
    x0 = torch.randn(3, 8, dtype=torch.float64)
    ref = run_step(same_layers(seq, "plain"), x0)

    def two_stacks(x):
        return tail(head(x))

    two_stacks.parameters = seq.parameters  # run_step reads the grads of the whole stack
    got = run_step(two_stacks, x0)
    assert rel_err(got[0], ref[0]) <= 1e-10
    assert max_grad_err(got, ref) <= 1e-10
    with torch.no_grad():
        assert (head.inverse(tail.inverse(seq(x0))) - x0).abs().max() < 1e-10


@pytest.mark.parametrize("mode", ["reversible", "checkpoint", "plain"])
def test_appended_layers_run_in_every_mode(mode):
    seq = stack("additive", 2, 4, mode=mode)
    x = torch.randn(3, 8, dtype=torch.float64)
    run_step(seq, x)  # a forward before the append: nothing may be cached per stack
    seq.append(make_layer("affine", 4)).extend([make_layer("user", 4), make_layer("meft", 4)])
    seq.layers.append(make_layer("additive", 4))
    seq.layers.insert(0, make_layer("additive", 4))
    seq.layers[1] = make_layer("additive", 4)
    assert len(seq) == 7
    ref = run_step(same_layers(seq, "plain"), x)
    got = run_step(seq, x)
    assert rel_err(got[0], ref[0]) <= 1e-10 and max_grad_err(got, ref) <= 1e-10


def test_append_and_extend_check_like_the_constructor():
    seq = stack("additive", 2, 4)
    for add in (seq.append, seq.layers.append, lambda m: seq.extend([make_layer("additive", 4), m]),
                lambda m: seq.layers.extend([make_layer("additive", 4), m]), lambda m: seq.layers.insert(2, m),
                lambda m: seq.layers.__setitem__(-1, m)):
        with pytest.raises(TypeError, match=r"layer \d \(Linear\) is not a reversible coupling"):
            add(torch.nn.Linear(4, 4))
    assert len(seq) == 2  # a failed extend adds nothing
    with pytest.raises(TypeError, match=r"layer 2 \(Linear\) is not a reversible coupling"):
        seq.append(torch.nn.Linear(4, 4))
    exact = stack("additive", 2, 4, exact=True)
    with pytest.raises(ValueError, match=r"exact=True needs .* layer 2 \(AdditiveCoupling\) does not support it"):
        exact.append(make_layer("meft", 4))
    with pytest.raises(ValueError, match=r"layer 3 \(AffineCoupling\) does not support it"):
        exact.layers.extend([make_layer("additive", 4), make_layer("affine", 4)])
    with pytest.raises(ValueError, match=r"layer 1 \(AffineCoupling\) does not support it"):
        exact[1:].append(make_layer("affine", 4))
    assert len(exact) == 2


def test_state_dict_keys_are_those_of_a_module_list():
    layers = [make_layer("additive", 4) for _ in range(3)]
    seq = rev.Sequential(*layers)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList(layers)
    assert list(seq.state_dict()) == list(holder.state_dict()) and "layers.2.g.fc2.bias" in seq.state_dict()
    seq.append(make_layer("additive", 4))
    assert "layers.3.f.fc1.weight" in seq.state_dict()
    fresh = rev.Sequential(*[make_layer("additive", 4) for _ in range(4)])
    fresh.load_state_dict(seq.state_dict())
    x = torch.randn(2, 8, dtype=torch.float64)
    assert torch.equal(fresh(x), seq(x))


# --- bad input -------------------------------------------------------------------------------------

def test_odd_width_is_a_clear_error():
    seq = stack("additive", 2, 4)
    with pytest.raises(ValueError, match="even last dimension, got 7"):
        seq(torch.randn(3, 7, dtype=torch.float64))


@pytest.mark.parametrize(
    "b",
    [
        torch.randn(3, 5, dtype=torch.float64),
        torch.randn(3, 4, dtype=torch.float32),
    ],
)
def test_streams_that_differ(b):
    seq = stack("additive", 2, 4)
    a = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="must match in shape, dtype and device"):
        seq((a, b))


def test_streams_on_different_devices_are_rejected_by_the_executor():
    seq = stack("additive", 2, 4)
    a = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, 4, dtype=torch.float64, device="meta")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        seq((a, b))


def test_layer_that_changes_stream_shape_is_named():
    class Bad(rev.Coupling):
        def forward(self, x1, x2):
            return x1[..., :-1], x2

        def inverse(self, y1, y2):
            return y1, y2

    seq = rev.Sequential(make_layer("additive", 4), Bad())
    with pytest.raises(RuntimeError, match=r"layer 1 \(Bad\) changed its streams"):
        seq(torch.randn(3, 8, dtype=torch.float64, requires_grad=True))


def test_non_invertible_coupling_caught_by_check_layer_and_debug_flag():
    layer = NotInvertible()
    report = rev.testing.check_layer(layer, torch.randn(4, 8, dtype=torch.float64))
    assert report.reconstruction_error > 1e-3 and not report.ok()
    with pytest.raises(AssertionError):
        report.assert_ok()
    good = rev.testing.check_layer(make_layer("additive", 4), torch.randn(4, 8, dtype=torch.float64))
    assert good.ok() and good.reconstruction_error < 1e-12 and good.grad_error < 1e-12
    seq = rev.Sequential(make_layer("additive", 4), layer, debug=True)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"layer 1 \(NotInvertible\) did not invert"):
        seq(x).sum().backward()


def test_user_coupling_with_dropout_is_caught_by_debug():
    class Noisy(rev.Coupling):
        def __init__(self):
            super().__init__()
            self.f = mlp(4, dropout=0.5)

        def forward(self, x1, x2):
            return x1 + self.f(x2), x2

        def inverse(self, y1, y2):
            return y1 - self.f(y2), y2  # draws other dropout masks than the forward did

    seq = rev.Sequential(Noisy(), debug=True)
    with pytest.raises(RuntimeError, match=r"layer 0 \(Noisy\) did not invert"):
        seq(torch.randn(8, 8, dtype=torch.float64, requires_grad=True)).sum().backward()


def test_nan_in_reconstruction_names_the_layer_and_leaves_input_alone():
    class BlowsUpInRecompute(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4).double()

        def forward(self, x):
            out = self.lin(x)
            return out * math.inf if rev.is_recomputing() else out

    seq = rev.Sequential(make_layer("additive", 4), rev.AdditiveCoupling(BlowsUpInRecompute(), mlp(4)), make_layer("additive", 4))
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match=r"non-finite value \(NaN or Inf\) in the input of layer 1 \(AdditiveCoupling\)"):
        seq(x).sum().backward()
    assert torch.equal(x.detach(), before) and x._version == 0


def test_output_modified_in_place_is_detected():
    seq = stack("additive", 2, 4, merge=None)
    y1, y2 = seq(torch.randn(3, 8, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        y1.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        (y1.sum() + y2.sum()).backward()


def test_executor_errors_have_their_own_classes():
    # Raised by the C++ executor, inside loss.backward() (the autograd engine) or Sequential.inverse.
    assert issubclass(rev.ReconstructionError, rev.ReversibleError) and issubclass(rev.RecomputeError, rev.ReversibleError)
    assert issubclass(rev.ReversibleError, RuntimeError)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    seq = rev.Sequential(make_layer("additive", 4), NotInvertible(), debug=True)
    with pytest.raises(rev.ReconstructionError, match=r"layer 1 \(NotInvertible\) did not invert") as info:
        seq(x).sum().backward()
    assert isinstance(info.value, RuntimeError)

    class NanInverse(rev.Coupling):
        def forward(self, x1, x2):
            return x1, x2

        def inverse(self, y1, y2):
            return y1 * math.nan, y2

    seq = rev.Sequential(make_layer("additive", 4), NanInverse())
    with pytest.raises(rev.ReconstructionError, match=r"non-finite value \(NaN or Inf\) in the input of layer 1 \(NanInverse\) reconstructed during backward"):
        seq(x).sum().backward()
    with pytest.raises(rev.ReconstructionError, match=r"layer 1 \(NanInverse\) reconstructed by inverse\(\)"):
        seq.inverse(seq(x))

    seq = stack("additive", 2, 4, merge=None)
    y1, y2 = seq(x)
    with torch.no_grad():
        y2.mul_(2)
    with pytest.raises(rev.RecomputeError, match="modified in place"):
        (y1.sum() + y2.sum()).backward()
    loss = seq(x)[0].sum()
    loss.backward()
    with pytest.raises(rev.RecomputeError, match="second time"):
        loss.backward()
    with pytest.raises(rev.RecomputeError, match="double backward"):
        torch.autograd.grad(seq(x)[0].sum(), x, create_graph=True)
    # Misuse the executor finds in forward stays a plain RuntimeError.
    with pytest.raises(RuntimeError, match="must match in shape") as info:
        rev.Sequential(make_layer("additive", 4))._forward_reversible(x[:, :4], x[:1, :4], {})
    assert not isinstance(info.value, rev.ReversibleError)


def test_non_coupling_layer_and_bad_options():
    with pytest.raises(TypeError, match="not a reversible coupling"):
        rev.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="mode"):
        rev.Sequential(make_layer("additive", 4), mode="fast")
    with pytest.raises(ValueError, match="lam and beta"):
        rev.AdditiveCoupling(mlp(4), mlp(4), lam=0.0)


def test_double_backward_is_refused_clearly():
    seq = stack("additive", 2, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(seq(x).sum(), x, create_graph=True)


def test_deepcopy_and_pickle_after_a_debug_run():
    seq = stack("additive", 3, 4, debug=True)
    run_step(seq, torch.randn(2, 8, dtype=torch.float64))
    assert seq.last_report is not None
    for other in (copy.deepcopy(seq), pickle.loads(pickle.dumps(seq))):
        assert other.last_report is None and seq.last_report is not None
        for a, b in zip(other.parameters(), seq.parameters()):
            assert torch.equal(a, b) and a is not b
        x = torch.randn(2, 8, dtype=torch.float64)
        assert max_grad_err(run_step(other, x), run_step(seq, x)) == 0.0


@pytest.mark.parametrize("module", ["revengine.sequential", "revengine.couplings", "revengine.recompute"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0


class _RaisingInverse(rev.Coupling):
    """A coupling whose inverse raises a user's own exception type."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(2, 2)

    def forward(self, x1, x2):
        return x1 + self.f(x2), x2

    def inverse(self, y1, y2):
        raise KeyError("the user's own error")


def test_a_python_exception_inside_the_executor_keeps_its_class():
    stack = rev.Sequential(_RaisingInverse(), _RaisingInverse())
    y = stack(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(KeyError, match="the user's own error"):
        y.sum().backward()


# --- module hooks on a coupling, non-finite input ----------------------------------------------------

@pytest.mark.parametrize("kind", ["additive", "affine"])
@pytest.mark.parametrize("mode", ["reversible", "checkpoint", "plain"])
def test_forward_hooks_on_a_builtin_coupling_fire_in_every_mode(kind, mode):
    """Hooks on the coupling itself see its streams in and out, in every mode (reversible mode runs
    a hooked coupling through its module), and the gradients still equal plain's."""
    seq = stack(kind, 4, 6)
    seen = []

    def pre(module, args):
        seen.append(("pre", rev.is_recomputing(), tuple(a.shape for a in args)))

    def post(module, args, out):
        seen.append(("post", rev.is_recomputing(), tuple(o.shape for o in out)))

    handles = [seq[2].register_forward_pre_hook(pre), seq[2].register_forward_hook(post)]
    x = torch.randn(5, 12, dtype=torch.float64)
    plain = run_step(same_layers(seq, "plain"), x)
    seen.clear()
    got = run_step(same_layers(seq, mode), x)
    forward = [s for s in seen if not s[1]]
    assert forward == [("pre", False, ((5, 6), (5, 6))), ("post", False, ((5, 6), (5, 6)))]
    recompute = [s[0] for s in seen if s[1]]
    if mode == "reversible":  # the recompute runs the module (and its hooks) again
        assert recompute == ["pre", "post"]
    elif mode == "checkpoint":  # torch's checkpoint stops its recompute once it has what backward needs
        assert recompute[:1] == ["pre"]
    assert max_grad_err(got, plain) <= 1e-10
    for h in handles:
        h.remove()
    seen.clear()
    run_step(same_layers(seq, mode), x)
    assert seen == []


def test_forward_hooks_where_reversible_mode_cannot_run_them_are_refused():
    seq = stack("additive", 2, 6, exact=True)
    seq[1].register_forward_hook(lambda m, a, o: None)
    with pytest.raises(ValueError, match=r"layer 1 \(AdditiveCoupling\) has forward hooks.*exact=True"):
        seq(torch.randn(5, 12, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_reported_in_forward(bad):
    seq = stack("additive", 3, 6)
    x = torch.randn(5, 12, dtype=torch.float64)
    x[2, 7] = bad
    x.requires_grad_(True)
    with pytest.raises(ValueError, match=r"input of the reversible stack holds NaN or Inf"):
        seq(x)
    # without grad nothing is reconstructed later: the output is just non-finite
    with torch.no_grad():
        assert not seq(x).isfinite().all()
    # check_finite=False: the user opted out
    same_layers(seq, "reversible", check_finite=False)(x)
