"""revengine.optim.InBackwardOptimizer: the optimizer step inside backward (every mode, AdamW and
SGD, clipping per tensor and two-pass global, checkpoint/resume, refusals)."""
import copy

import pytest
import torch
from torch import nn

import revengine as rev
from revengine.optim import InBackwardOptimizer

MODES = ("reversible", "checkpoint", "plain")
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))),
    "sgd": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
}


def block(d, p=0.0):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(p), nn.Linear(2 * d, d))


def stack(mode, depth=4, d=8, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return rev.Sequential(*[rev.AdditiveCoupling(block(d, dropout), block(d, dropout)) for _ in range(depth)],
                          mode=mode).double()


def data(seed=1, n=16, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def loss_of(model, x, y):
    return (model(x) - y).square().mean()


def max_diff(a, b):
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", MODES)
def test_matches_the_unfused_optimizer(mode, opt_name):
    cls, kw = OPTIMIZERS[opt_name]
    fused_model = stack(mode)
    ref_model = copy.deepcopy(fused_model)
    fused = InBackwardOptimizer(fused_model.parameters(), cls, **kw)
    ref = cls(ref_model.parameters(), **kw)
    for step in range(3):
        x, y = data(seed=step)
        loss_of(fused_model, x, y).backward()
        assert all(p.grad is None for p in fused_model.parameters())
        loss_of(ref_model, x, y).backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
        assert max_diff(fused_model, ref_model) <= 1e-12
    assert max_diff(fused_model, stack(mode)) > 1e-4  # it did train


@pytest.mark.parametrize("fused", [True, False], ids=["in-backward", "control"])
def test_the_whole_models_grads_never_exist_at_once(fused):
    model = stack("reversible", depth=8)
    params = list(model.parameters())
    live = []
    opt = InBackwardOptimizer(params, torch.optim.AdamW, lr=1e-3) if fused else None
    for p in params:  # runs after the optimizer's hook: counts the grads alive at that moment
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    loss_of(model, *data()).backward()
    assert len(live) == len(params)
    if fused:
        assert max(live) == 0  # each grad is freed as soon as its parameter is stepped
    else:
        assert live == sorted(live) and live[-1] == len(params)  # without it, they pile up to the whole model


def test_global_clipping_two_pass_equals_clip_grad_norm_with_dropout():
    kw = dict(lr=1e-2, weight_decay=0.05)
    fused_model = stack("reversible", dropout=0.2)
    ref_model = copy.deepcopy(fused_model)
    fused = InBackwardOptimizer(fused_model.parameters(), torch.optim.AdamW, max_grad_norm=0.05, clip="global", **kw)
    ref = torch.optim.AdamW(ref_model.parameters(), **kw)
    for step in range(3):
        x, y = data(seed=step)
        torch.manual_seed(100 + step)
        fused.step_two_pass(lambda: loss_of(fused_model, x, y))
        torch.manual_seed(100 + step)
        loss_of(ref_model, x, y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
        assert fused.last_grad_norm == pytest.approx(float(norm), rel=1e-10)
        assert float(norm) > 0.05  # clipping was active
        ref.step()
        ref.zero_grad(set_to_none=True)
        assert max_diff(fused_model, ref_model) <= 1e-12


def test_per_tensor_clipping():
    kw = dict(lr=1e-2, momentum=0.0)
    fused_model = stack("reversible")
    ref_model = copy.deepcopy(fused_model)
    fused = InBackwardOptimizer(fused_model.parameters(), torch.optim.SGD, max_grad_norm=1e-3, **kw)
    ref = torch.optim.SGD(ref_model.parameters(), **kw)
    x, y = data()
    loss_of(fused_model, x, y).backward()
    loss_of(ref_model, x, y).backward()
    for p in ref_model.parameters():
        n = float(p.grad.norm())
        if n > 1e-3:
            p.grad.mul_(1e-3 / (n + 1e-6))
    ref.step()
    assert max_diff(fused_model, ref_model) <= 1e-12


def test_state_dict_resume_is_exact():
    cls, kw = OPTIMIZERS["adamw"]
    a = stack("reversible")
    opt_a = InBackwardOptimizer(a.parameters(), cls, **kw)
    for s in range(2):
        loss_of(a, *data(seed=s)).backward()
    saved_w = copy.deepcopy(a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    loss_of(a, *data(seed=2)).backward()

    b = stack("reversible", seed=5)
    b.load_state_dict(saved_w)
    opt_b = InBackwardOptimizer(b.parameters(), cls, **kw)
    opt_b.load_state_dict(saved_opt)
    loss_of(b, *data(seed=2)).backward()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="state for"):
        InBackwardOptimizer(stack("plain", depth=2).parameters(), cls, **kw).load_state_dict(saved_opt)


def test_refusals_and_lr():
    model = stack("reversible", depth=2)
    with pytest.raises(ValueError, match="grad_accumulation=4 is not supported"):
        InBackwardOptimizer(model.parameters(), torch.optim.AdamW, grad_accumulation=4)
    with pytest.raises(ValueError, match="clip must be one of"):
        InBackwardOptimizer(model.parameters(), clip="layer")
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        InBackwardOptimizer(model.parameters(), max_grad_norm=0.0)
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.raises(RuntimeError, match="step_two_pass is for clip='global'"):
        opt.step_two_pass(lambda: loss_of(model, *data()))
    opt.set_lr(5e-4)
    assert all(g["lr"] == 5e-4 for g in opt.param_groups)
    opt.remove()
    loss_of(model, *data()).backward()  # unhooked: grads stay
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="already hold gradients"):
        InBackwardOptimizer(model.parameters())


def test_reversible_moe_model_step_matches_adamw():
    from revengine.models import RevMoEConfig, RevMoEForCausalLM
    torch.manual_seed(0)
    cfg = RevMoEConfig.preset("tiny", block_type="leapfrog", router_aux_loss_coef=0.1)
    a = RevMoEForCausalLM(cfg).double()
    b = copy.deepcopy(a)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    fused = InBackwardOptimizer(a.parameters(), torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        a(ids, labels=ids).loss.backward()
        b(ids, labels=ids).loss.backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
    assert max_diff(a, b) <= 1e-12


def test_breakdown_counts_the_optimizer_state():
    model = stack("reversible", depth=2)
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    loss_of(model, *data()).backward()
    b = rev.memory.breakdown(model, opt)
    assert b["optimizer_state_bytes"] >= 2 * b["weights_bytes"] and b["grads_bytes"] == 0


# ---------------------------------------------------------------------------------------------
# Low-memory state: optimizers by name, state kept on a state_device, state files without pickle

def test_optimizer_class_names_and_errors(monkeypatch):
    from revengine.optim import optimizer_class
    assert optimizer_class("adamw") == (torch.optim.AdamW, {})
    with pytest.raises(ValueError, match="unknown optimizer 'adam8'"):
        optimizer_class("adam8")
    with pytest.raises(ValueError, match="weights must be one of"):
        optimizer_class("adamw", weights="fp16")
    import builtins
    real_import = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_torchao)
    monkeypatch.setattr("importlib.import_module", lambda name: no_torchao(name))
    with pytest.raises(ImportError, match="optimizer 'adamw8bit' needs torchao: pip install"):
        optimizer_class("adamw8bit")


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adamw4bit"])
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_low_bit_state_in_backward_matches_the_plain_optimizer_and_resumes(name, weights, tmp_path):
    """The same torchao class stepped inside backward and as a plain optimizer: same weights, bit for bit
    (stochastic rounding draws the same numbers); the state round-trips through a safetensors file."""
    if name != "adamw" or weights != "fp32":
        pytest.importorskip("torchao")
    from revengine.optim import WEIGHT_DTYPES, create, load_state_dict_file, optimizer_class, save_state_dict, set_lr
    dt = WEIGHT_DTYPES[weights]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(dt)  # 8192 elements: quantized
    ref = copy.deepcopy(model)
    cls, kw = optimizer_class(name, weights=weights)
    fused = InBackwardOptimizer(model.parameters(), cls, lr=1e-2, weight_decay=0.1, **kw)
    plain = [create(cls, [p], lr=1e-2, weight_decay=0.1, **kw) for p in ref.parameters()]  # the same order
    x = torch.randn(8, 64, dtype=dt)

    def step(m, opts=None, seed=0):
        torch.manual_seed(seed)
        m(x).float().square().mean().backward()
        for o in opts or ():
            o.step()
            o.zero_grad(set_to_none=True)
    for i in range(3):
        set_lr(fused, 1e-2 / (i + 1))
        for o in plain:
            set_lr(o, 1e-2 / (i + 1))
        step(model, seed=i)
        # stochastic rounding draws in hook order (last layer first): the plain optimizers in the same order
        torch.manual_seed(i)
        ref(x).float().square().mean().backward()
        for o in reversed(plain):
            o.step()
            o.zero_grad(set_to_none=True)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters())), (name, weights, i)
    save_state_dict(fused.state_dict(), str(tmp_path / "s.safetensors"))
    resumed_model = copy.deepcopy(model)
    resumed = InBackwardOptimizer(resumed_model.parameters(), cls, lr=1e-2, weight_decay=0.1, **kw)
    resumed.load_state_dict(load_state_dict_file(str(tmp_path / "s.safetensors")))
    step(model, seed=9)
    step(resumed_model, seed=9)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_state_device_keeps_the_state_there_and_steps_the_same():
    pytest.importorskip("torchao")
    from revengine.optim import optimizer_class
    cls, kw = optimizer_class("adamw8bit")
    a = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    b = copy.deepcopy(a)
    oa = InBackwardOptimizer(a.parameters(), cls, lr=1e-2, **kw)
    ob = InBackwardOptimizer(b.parameters(), cls, lr=1e-2, state_device="cpu", **kw)
    x = torch.randn(4, 64)
    for _ in range(2):
        a(x).square().mean().backward()
        b(x).square().mean().backward()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(v.device.type == "cpu" for st in ob.state.values() for v in st.values())
    ob.load_state_dict(ob.state_dict())  # load puts the state beside the parameters; it goes back to the CPU
    assert all(v.device.type == "cpu" for st in ob.state.values() for v in st.values())


def test_state_file_refuses_foreign_tensor_types(tmp_path):
    import json as _json

    from safetensors.torch import save_file

    from revengine.optim import STATE_META_KEY, load_state_dict_file
    meta = {"x": {"__subclass__": "os.system", "ctx": [], "size": [1], "stride": [1], "inner": {}}}
    save_file({"t": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={STATE_META_KEY: _json.dumps(meta)})
    with pytest.raises(ValueError, match="not allowed"):
        load_state_dict_file(str(tmp_path / "bad.safetensors"))
    save_file({"t": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an optimizer state file"):
        load_state_dict_file(str(tmp_path / "plain.safetensors"))


def test_adamw_defaults_to_its_fused_kernel_unless_the_caller_chooses():
    """Fused AdamW is the default for CPU/CUDA floating-point parameters (in backward and plain); an
    explicit fused/foreach choice, another optimizer or an integer tensor is left alone."""
    from revengine.optim import create, fused_default
    lin = nn.Linear(4, 4)
    assert InBackwardOptimizer(lin.parameters(), torch.optim.AdamW, lr=1e-3).optimizers[0].defaults["fused"] is True
    assert create(torch.optim.Adam, lin.parameters(), lr=1e-3).defaults["fused"] is True
    assert create(torch.optim.AdamW, lin.parameters(), lr=1e-3, foreach=True).defaults["fused"] is None
    assert "fused" not in fused_default(torch.optim.SGD, [lin.weight], {"lr": 1.0})
    assert "fused" not in fused_default(torch.optim.AdamW, [torch.zeros(2, dtype=torch.long)], {})


@pytest.mark.parametrize("cls,kw", [(torch.optim.AdamW, {"weight_decay": 0.1}), (torch.optim.AdamW, {"foreach": False}),
                                    (torch.optim.Adam, {}), (torch.optim.SGD, {"momentum": 0.9})],
                         ids=["adamw-fused", "adamw-loop", "adam-fused", "sgd-momentum"])
def test_large_parameters_step_in_row_slices_bit_identically(cls, kw, monkeypatch):
    """Above SLICE_ELEMENTS a parameter is stepped in row slices (views of it, its gradient and its
    state; the update's temporaries one slice at a time): the weights and the state equal the whole
    step's bit for bit, from the step that creates the state on. Slices start on whole 64-element
    units, here with 70-element rows and both threads running each slice's update."""
    monkeypatch.setattr(rev.optim, "SLICE_ELEMENTS", 20000)
    torch.manual_seed(0)
    w0 = torch.randn(3001, 70)
    whole, sliced = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ref = rev.optim.create(cls, [whole], lr=1e-2, **kw)
    opt = InBackwardOptimizer([sliced], cls, lr=1e-2, **kw)
    rows = opt.row_slices(sliced)
    assert len(rows) >= 10 and rows[0].start == 0 and rows[-1].stop == 3001
    assert all(r.start * 70 % 64 == 0 and r.stop == n.start for r, n in zip(rows, rows[1:]))
    small = nn.Parameter(torch.randn(100, 70))
    assert InBackwardOptimizer([small], cls, lr=1e-2, **kw).row_slices(small) is None
    for step in range(3):
        g = torch.randn(3001, 70) * (step + 1)
        (whole * g).sum().backward()
        ref.step()
        ref.zero_grad()
        (sliced * g).sum().backward()
        assert torch.equal(whole, sliced)
        assert ref.state[whole].keys() == opt.state[sliced].keys()
        for k, v in ref.state[whole].items():
            assert torch.equal(v, opt.state[sliced][k]), k


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_eager_low_bit_update_in_row_slices_equals_the_whole_update(name, monkeypatch):
    """A large parameter is updated in row slices cut on the quantized moments' block boundaries (the
    eager update's fp32 temporaries are then a slice's, not the parameter's): same weights and the same
    state, bit for bit, as updating it whole. (torchao's update, which runs off the CPU.)"""
    pytest.importorskip("torchao")
    from revengine import optim
    monkeypatch.setattr(optim, "FUSED_CPU_STEP", False)
    cls, kw = optim.optimizer_class(name)
    results = []
    pieces = []
    for limit in (optim.EAGER_UPDATE_ELEMENTS, 1000):  # whole; slices of whole blocks (12 or 14 rows of 64)
        monkeypatch.setattr(optim, "EAGER_UPDATE_ELEMENTS", limit)
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(96, 64))  # 6144 elements, whole blocks: quantized moments
        opt = InBackwardOptimizer([w], cls, lr=1e-2, weight_decay=0.1, **kw)
        for i in range(3):
            torch.manual_seed(i)
            (w * torch.randn_like(w)).sum().backward()
        state = opt.optimizers[0].state[w]
        pieces.append(len(list(optim._update_rows(w, [state["exp_avg"], state["exp_avg_sq"]]))))
        results.append((w.detach().clone(), [t.dequantize() if hasattr(t, "dequantize") else t.clone()
                                             for t in (state["exp_avg"], state["exp_avg_sq"])]))
    (w1, s1), (w2, s2) = results
    assert torch.equal(w1, w2) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert pieces == [1, 8 if name == "adamw8bit" else 7], pieces  # blocks of 256 / 128 elements
    assert type(state["exp_avg"]).__name__.startswith("OptimState"), type(state["exp_avg"])


def _torchao_state(opt, p):
    return {"step": torch.tensor(0.0), "exp_avg": opt._new_buffer(p, True), "exp_avg_sq": opt._new_buffer(p, False)}


def _codes(t):
    return (t.codes if hasattr(t, "codes") else t).view(-1)


def _record_fused_steps(monkeypatch):
    """What revengine.optim._fused_step returns on each call (True: the fused kernel stepped the parameter)."""
    from revengine import optim
    calls, real = [], optim._fused_step
    monkeypatch.setattr(optim, "_fused_step", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


@pytest.mark.parametrize("name,adamw", [("AdamW8bit", True), ("AdamW4bit", True), ("Adam8bit", False),
                                        ("_AdamW", True)])
def test_fused_cpu_step_matches_torchao_update(name, adamw, monkeypatch):
    """The fused CPU kernel against torchao's own update function (fp32 weights, 6 steps from the same
    state): the quantized moments get the same codes and scales, the weights the same values up to
    rounding (torch's vectorised sqrt is not correctly rounded; the kernel's is), far below the update."""
    ao = pytest.importorskip("torchao.optim")
    from torchao.optim.adam import single_param_adam

    from revengine import optim
    torch.manual_seed(0)
    cls = getattr(ao, name)
    p0 = torch.randn(48, 512)
    ref, ours = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    opt = optim._eager_class(cls)([ours], lr=3e-3, weight_decay=0.1)
    st_ref = _torchao_state(opt, ref)
    fused = _record_fused_steps(monkeypatch)
    for i in range(6):
        g = torch.randn_like(p0) * (i + 1)
        st_ref["step"] += 1
        single_param_adam(ref.detach(), g, st_ref["step"], st_ref["exp_avg"], st_ref["exp_avg_sq"], None,
                          torch.tensor(3e-3), 0.9, 0.999, 0.1, 1e-8, adamw, False)
        ours.grad = g
        opt.step()
    st = opt.state[ours]
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(_codes(st[k]), _codes(st_ref[k])) if hasattr(st[k], "codes") else \
            torch.allclose(st[k], st_ref[k], rtol=1e-6, atol=0), k
        if hasattr(st[k], "scale"):
            assert torch.equal(st[k].scale, st_ref[k].scale), k
    moved = (ref.detach() - p0).abs().max()
    assert (ours.detach() - ref.detach()).abs().max() <= 1e-5 * moved
    assert fused == [True] * 6  # the kernel stepped it (torchao's own path would give the same weights)
    monkeypatch.setattr(optim, "FUSED_CPU_STEP", False)  # the switch really selects torchao's path
    again = nn.Parameter(p0.clone())
    o2 = optim._eager_class(cls)([again], lr=3e-3, weight_decay=0.1)
    again.grad = torch.randn_like(p0)
    o2.step()
    assert fused[6:] == [False]
    assert type(o2.state[again]["exp_avg"]) is type(st["exp_avg"])


@pytest.mark.parametrize("levels", [16, 256])
def test_fused_quantizer_gives_torchao_codes_at_every_boundary(levels):
    """The kernel's table quantizer against torchao's binary search on the hard values: every qmap
    entry and every halfway point, one float either side of each, +-0, +-1, +-inf, NaN, and random."""
    pytest.importorskip("torchao")
    from torchao.optim import quant_utils as qu
    from torchao.optim import subclass_4bit, subclass_8bit
    sub = subclass_8bit if levels == 256 else subclass_4bit
    quantize = qu.quantize_8bit_with_qmap if levels == 256 else qu.quantize_4bit_with_qmap
    for qmap_list in (sub.get_qmap_signed(), sub.get_qmap_unsigned()):
        qmap = torch.tensor(qmap_list, dtype=torch.float32)
        mids = (qmap[1:] + qmap[:-1]) * 0.5
        base = torch.cat([qmap, mids, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
        inf = torch.tensor(float("inf"))
        x = torch.cat([base, torch.nextafter(base, inf), torch.nextafter(base, -inf),
                       torch.rand(100_000) * 2 - 1, torch.tensor([float("inf"), -float("inf"), float("nan")])])
        got = torch.ops.revengine.qmap_codes(x, qmap)
        assert torch.equal(got, quantize(x, qmap)), (levels, (got != quantize(x, qmap)).sum())


def test_fused_stochastic_rounding_is_unbiased_and_thread_independent(monkeypatch):
    """bf16 weights: the kernel rounds the fp32 update up or down to a neighbouring bf16 value, on average
    to the fp32 result (over 64 seeds); and its result does not depend on the number of threads."""
    pytest.importorskip("torchao")
    from revengine import optim
    cls, kw = optim.optimizer_class("adamw8bit", weights="bf16")
    fused = _record_fused_steps(monkeypatch)
    torch.manual_seed(0)
    p0 = torch.randn(64, 256).bfloat16()
    g = torch.randn(64, 256).bfloat16()

    def one_step(weights_dtype, seed, threads=None):
        p = nn.Parameter(p0.to(weights_dtype).clone())
        opt = cls([p], lr=1e-2, **kw)
        p.grad = g.to(weights_dtype).clone()
        torch.manual_seed(seed)
        old = torch.get_num_threads()
        torch.set_num_threads(threads or old)
        try:
            opt.step()
        finally:
            torch.set_num_threads(old)
        return p.detach().float()
    exact = one_step(torch.float32, 0)  # the same update without rounding
    runs = torch.stack([one_step(torch.bfloat16, s) for s in range(64)])
    toward = (exact.view(torch.int32) & -65536).view(torch.float32)  # the bf16 neighbour towards zero
    away = (toward.view(torch.int32) + 65536).view(torch.float32)
    assert ((runs == toward) | (runs == away)).all()
    q = (exact - toward) / (away - toward)  # the probability of rounding away
    bias = (runs == away).float().mean(0) - q
    assert abs(float(bias.mean())) < 0.01 and float(bias.abs().mean()) < 0.08, (bias.mean(), bias.abs().mean())
    assert torch.equal(one_step(torch.bfloat16, 7, threads=1), one_step(torch.bfloat16, 7, threads=2))
    assert fused == [True] * len(fused) and len(fused) == 67


class _RowsInMemory:
    """A row source (InBackwardOptimizer.set_row_source) that keeps each slice's state as it was written."""

    def __init__(self):
        self.rows, self.reads = {}, 0

    def read(self, rows):
        self.reads += 1
        return self.rows[rows.start]

    def write(self, rows, state):
        self.rows[rows.start] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


@pytest.mark.parametrize("name,weights", [("adamw8bit", "bf16"), ("adamw4bit", "fp32"), ("adamw8bit", "fp32"),
                                          ("adamw", "bf16")])
def test_low_bit_state_stepped_in_row_slices_equals_the_whole_step(name, weights, monkeypatch):
    """torchao's AdamW classes stepped a row slice at a time through a row source (as the offload store
    steps an embedding or a head) give the whole step's weights and state bit for bit over 4 steps: the
    slices fall on quantization blocks, the last short slice is quantized as the whole is, and bf16
    stochastic rounding uses the step's one seed with each slice's element offset."""
    pytest.importorskip("torchao")
    from revengine import optim
    monkeypatch.setattr(optim, "SLICE_ELEMENTS", 4096)
    cls, kw = optim.optimizer_class(name, weights=weights)
    dtype = optim.WEIGHT_DTYPES[weights]
    torch.manual_seed(0)
    p0 = torch.randn(100, 128).to(dtype)  # slices of 32 rows, the last of 4 (512 elements: under torchao's 4096)
    whole, sliced = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    ref = InBackwardOptimizer([whole], cls, lr=1e-2, weight_decay=0.1, **kw)
    opt = InBackwardOptimizer([sliced], cls, lr=1e-2, weight_decay=0.1, **kw)
    rows = opt.row_slices(sliced)
    assert [r.stop - r.start for r in rows] == [32, 32, 32, 4] and ref.row_slices(whole) == rows
    source = _RowsInMemory()
    opt.set_row_source(sliced, source)
    for step in range(4):
        g = (torch.randn_like(p0.float()) * (step + 1)).to(dtype)
        torch.manual_seed(step)
        (whole * g).sum().backward()
        torch.manual_seed(step)
        (sliced * g).sum().backward()
        assert torch.equal(sliced.detach(), whole.detach()), step
    assert source.reads == 3 * len(rows)
    st = ref.state[whole]
    assert int(opt.state[sliced]["step"]) == int(st["step"]) == 4
    quantized = name != "adamw"
    for key in ("exp_avg", "exp_avg_sq"):
        assert optim._is_subclass(st[key]) == quantized
        for r in rows:
            part = source.rows[r.start][key]
            assert type(part) is type(st[key])
            for u, v in zip(optim.inner_tensors(part), optim.inner_tensors(st[key][r])):
                assert torch.equal(u, v), (key, r)
