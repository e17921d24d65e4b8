"""Gal et al.'s integrators as layers: grads equal plain, inverses invert, exact=True is bit-exact."""
import pytest
import torch

import revengine as rev
from conftest import max_grad_err, mlp, rel_err, run_step

INTEGRATORS = ["midpoint", "leapfrog", "stochastic", "euler+midpoint", "hamiltonian"]


def make_stack(kind, width, depth, mode, dtype=torch.float64, dropout=0.0, exact=False, h=0.5):
    torch.manual_seed(0)
    f = lambda: mlp(width, dropout=dropout, dtype=dtype, gain=0.5)  # noqa: E731
    layers = []
    if kind == "euler+midpoint":
        layers.append(rev.EulerStart(f(), h=h))
    for i in range(depth):
        if kind in ("midpoint", "euler+midpoint"):
            layers.append(rev.Midpoint(f(), h=h))
        elif kind == "leapfrog":
            layers.append(rev.Leapfrog(f(), h=h))
        elif kind == "stochastic":
            layers.append(rev.StochasticMidpoint(f(), h=h, gamma=0.75 + 0.2 * (i % 2)))
        elif kind == "hamiltonian":
            layers.append(rev.Hamiltonian(f(), f(), h=h))
    merge = "mean" if kind == "hamiltonian" else "last"
    return rev.Sequential(*layers, split="duplicate", merge=merge, mode=mode, exact=exact)


@pytest.mark.parametrize("kind", INTEGRATORS)
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_integrator_grads_equal_plain_float64(kind, mode, dropout):
    x = torch.randn(6, 5, 16, dtype=torch.float64)
    ref = make_stack(kind, 16, 8, "plain", dropout=dropout)
    seq = make_stack(kind, 16, 8, mode, dropout=dropout)
    seq.load_state_dict(ref.state_dict())
    r0, r1 = run_step(ref, x), run_step(seq, x)
    assert rel_err(r1[0], r0[0]) < 1e-12
    assert max_grad_err(r1, r0) < 1e-10


@pytest.mark.parametrize("kind", INTEGRATORS)
def test_integrator_inverse_round_trip(kind):
    seq = make_stack(kind, 8, 6, "reversible")
    seq.merge = None
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        y = seq(x)
        x1, x2 = seq.inverse(y)
    assert rel_err(x1, x) < 1e-12 and rel_err(x2, x) < 1e-12


def test_stochastic_midpoint_error_grows_like_one_over_gamma():
    x = torch.randn(4, 8, dtype=torch.float64)
    errs = {}
    for gamma in (1.0, 0.25):
        torch.manual_seed(0)
        seq = rev.Sequential(*[rev.StochasticMidpoint(mlp(8, dtype=torch.float32), gamma=gamma, h=0.1) for _ in range(6)],
                             split="duplicate", merge=None)
        with torch.no_grad():
            y = seq(x.float())
            x1, _ = seq.inverse(y)
        errs[gamma] = float((x1.double() - x).abs().max())
    assert errs[0.25] > 10 * max(errs[1.0], 1e-7)


@pytest.mark.parametrize("kind", ["midpoint", "leapfrog", "euler+midpoint", "hamiltonian"])
def test_exact_integrators_bit_exact_with_bf16_autocast(kind):
    seq = make_stack(kind, 16, 48, "reversible", dtype=torch.float32, exact=True, h=0.25)
    seq.merge = None
    x = torch.randn(8, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x)
        x1, x2 = seq.inverse(y)
    xq = rev.couplings.quantize_ste(x, 16)
    assert torch.equal(x1, xq) and torch.equal(x2, xq)


@pytest.mark.parametrize("kind", ["midpoint", "leapfrog"])
def test_exact_integrator_grads_match_plain_exact(kind):
    x = torch.randn(4, 16)
    ref = make_stack(kind, 16, 8, "plain", dtype=torch.float32, exact=True)
    seq = make_stack(kind, 16, 8, "reversible", dtype=torch.float32, exact=True)
    seq.load_state_dict(ref.state_dict())
    r0, r1 = run_step(ref, x), run_step(seq, x)
    assert torch.equal(r0[0], r1[0])
    assert max_grad_err(r1, r0) < 1e-5


def test_stochastic_midpoint_refuses_exact_and_zero_gamma():
    with pytest.raises(ValueError, match="exact"):
        rev.Sequential(rev.StochasticMidpoint(mlp(4), gamma=0.5), split="duplicate", exact=True)
    with pytest.raises(ValueError, match="Euler"):
        rev.StochasticMidpoint(mlp(4), gamma=0.0)
