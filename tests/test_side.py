"""revengine.side: replayed records and side outputs (aux losses) through every mode."""
import gc
import weakref

import pytest
import torch
from torch import nn

import revengine as rev
from conftest import max_grad_err, mlp, rel_err

MODES = ["reversible", "checkpoint", "plain"]


class Routed(nn.Module):
    """A toy MoE-ish function: picks, per row, the top-1 of 3 linear maps and emits an aux loss."""

    def __init__(self, width, nudge_in_recompute=0.0, replay=True):
        super().__init__()
        self.router = nn.Linear(width, 3, dtype=torch.float64)
        self.experts = nn.Parameter(torch.randn(3, width, width, dtype=torch.float64) / width**0.5)
        self.nudge, self.use_replay = nudge_in_recompute, replay

    def forward(self, x):
        logits = self.router(x)
        # A stand-in for reconstruction error: the recompute sees the logits slightly off.
        off = self.nudge * torch.arange(3, dtype=logits.dtype) if rev.is_recomputing() else 0.0
        pick = lambda: (logits.detach() + off).argmax(-1)  # noqa: E731
        idx = rev.side.replay(self, pick) if self.use_replay else pick()
        gate = logits.softmax(-1).gather(-1, idx[..., None])
        y = torch.einsum("...i,...oi->...o", x, self.experts[idx]) * gate
        aux = (logits.logsumexp(-1) ** 2).mean()  # a z-loss
        return rev.side.attach_aux(torch.tanh(y), aux, self)


def make(mode, width=8, depth=4, **kw):
    torch.manual_seed(0)
    layers = [rev.AdditiveCoupling(mlp(width), Routed(width, **kw)) for _ in range(depth)]
    return rev.Sequential(*layers, mode=mode)


def step(seq, x, scale=0.37, aux_coef=0.1):
    for p in seq.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    with rev.side.collect_aux() as aux:
        y = seq(x)
    assert len(aux) == len(seq)
    loss = scale * ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + aux_coef * aux.total())
    loss.backward()
    return y.detach(), x.grad, [p.grad.clone() for p in seq.parameters()], torch.stack(list(aux)).detach()


@pytest.mark.parametrize("mode", MODES)
def test_aux_losses_get_exact_grads_under_any_loss_scale(mode):
    x = torch.randn(5, 16, dtype=torch.float64)
    ref, seq = make("plain"), make(mode)
    r0, r1 = step(ref, x), step(seq, x)
    assert rel_err(r1[3], r0[3]) < 1e-14
    assert max_grad_err(r1, r0) < 1e-10
    # The aux term reaches the parameters through the layers' backward: without it the grads differ.
    assert max_grad_err(step(seq, x, aux_coef=0.0), r1) > 1e-6


def test_aux_values_without_grad_and_outside_collect():
    seq = make("reversible")
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad(), rev.side.collect_aux() as aux:
        seq(x)
    assert len(aux) == 4 and all(a.grad_fn is None for a in aux)
    seq(x).sum().backward()  # no collector: the side outputs are simply unused


def test_replay_keeps_routing_when_the_recompute_is_perturbed():
    """The recompute's routing sees logits off by 0.05: without replay some rows switch expert
    and the grads diverge; with replay they equal plain."""
    x = torch.randn(64, 16, dtype=torch.float64)
    ref = make("plain")
    r0 = step(ref, x)
    errs = {}
    for replay in (True, False):
        seq = make("reversible", nudge_in_recompute=0.05, replay=replay)
        errs[replay] = max_grad_err(step(seq, x), r0)
    assert errs[True] < 1e-10 and errs[False] > 1e-3, errs


def test_replay_mismatch_is_a_clear_error():
    class Bad(nn.Module):
        def forward(self, x):
            if not rev.is_recomputing():
                rev.side.replay(self, lambda: x.argmax(-1))
            else:
                rev.side.replay(object(), lambda: x.argmax(-1))
            return x * 0.5

    seq = rev.Sequential(rev.AdditiveCoupling(mlp(4), Bad()))
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no record"):
        seq(x).sum().backward()


def test_records_pass_through_saved_tensor_hooks():
    """Between a layer's forward and its backward its records are packed by the saved-tensor hooks in
    force at the forward, like any tensor autograd saves (save_on_cpu moves them off a GPU): the
    executor keeps no reference of its own, the unpacked values replay, and the grads are those of a
    run without hooks, again after retain_graph."""
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = step(make("reversible"), x)

    packed, originals = {}, []

    def pack(t):
        originals.append(weakref.ref(t))
        packed[len(packed)] = t.clone()
        return len(packed) - 1

    seq = make("reversible")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda k: packed[k]):
        xg = x.clone().requires_grad_(True)
        with rev.side.collect_aux() as aux:
            y = seq(xg)
    records = [k for k, t in packed.items() if t.dtype == torch.int64]  # the routers' picks
    assert len(records) == len(seq)
    gc.collect()
    assert not any(originals[k]() is not None for k in records)  # only the hooks' copies hold them
    loss = 0.37 * ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + 0.1 * aux.total())
    grads = []
    for _ in range(2):
        for p in seq.parameters():
            p.grad = None
        loss.backward(retain_graph=True)
        grads.append([p.grad.clone() for p in seq.parameters()])
    for g in grads:
        assert all(torch.equal(a, b) for a, b in zip(g, ref[2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_save_on_cpu_moves_a_bdia_stacks_records_off_the_gpu():
    """BDIA's kept bits and the routing picks (uint8) leave the GPU through the hooks and come back for
    backward; the grads match a run without hooks (to fp32 rounding: the GPU's expert kernels add
    with atomics, so two runs need not agree bit for bit)."""
    from revengine.models import RevMoEConfig, RevMoEForCausalLM
    torch.manual_seed(0)
    cfg = RevMoEConfig.preset("tiny", num_hidden_layers=4, block_type="bdia")
    model = RevMoEForCausalLM(cfg).cuda().train()
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    torch.manual_seed(1)
    model(input_ids=ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    moved = []

    def pack(t):
        moved.append((t.device.type, t.dtype))
        return t.to("cpu")

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t.to("cuda")):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert moved.count(("cuda", torch.uint8)) >= 2 * cfg.num_hidden_layers  # kept bits + routing picks per layer
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)
