"""Gal et al.'s integrators as layers: grads equal plain, inverses invert, exact=True is bit-exact."""
import pytest
import torch

import revengine as rev
from conftest import max_grad_err, mlp, rel_err, run_step

INTEGRATORS = ["midpoint", "leapfrog", "stochastic", "euler+midpoint", "hamiltonian", "bdia"]


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
        elif kind == "bdia":
            layers.append(rev.BDIA(f(), gamma=0.5 if exact else 0.75))
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


@pytest.mark.parametrize("kind", [k for k in INTEGRATORS if k != "bdia"])  # BDIA: inverse only in backward
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


# --- BDIA: random signs per sample and forward, g = 0 in eval -----------------------------------


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bdia_grads_equal_plain(mode, exact, training, dropout):
    # float64; exact=True at depth 24 (bit-exact reconstruction), floating point at depth 8
    # (its reconstruction error doubles per layer at gamma = 1/2)
    depth = 24 if exact else 8
    x = torch.randn(5, 7, 16, dtype=torch.float64)
    ref = make_stack("bdia", 16, depth, "plain", dropout=dropout, exact=exact).train(training)
    seq = make_stack("bdia", 16, depth, mode, dropout=dropout, exact=exact).train(training)
    seq.load_state_dict(ref.state_dict())
    r0, r1 = run_step(ref, x), run_step(seq, x)
    assert rel_err(r1[0], r0[0]) < 1e-12
    assert max_grad_err(r1, r0) < 1e-10


def test_bdia_exact_reconstruction_is_bit_exact_at_depth_64_with_bf16_autocast():
    seq = make_stack("bdia", 16, 64, "reversible", dtype=torch.float32, exact=True)
    seq.debug = True
    x = torch.randn(8, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x)
    y.float().sum().backward()
    errs = seq.last_report.reconstruction_errors
    assert len(errs) == 64 and max(errs) == 0.0
    assert torch.isfinite(x.grad).all()


def test_bdia_floating_point_reconstruction_error_doubles_per_layer():
    # the documented reason for exact=True: the inverse divides by g = +-1/2
    errs = {}
    for depth in (4, 12):
        torch.manual_seed(0)
        seq = rev.Sequential(*[rev.BDIA(mlp(16, dtype=torch.float32, gain=0.5), 0.5) for _ in range(depth)],
                             split="duplicate", merge="last", debug=True, debug_tol=1e30)
        x = torch.randn(8, 16, requires_grad=True)
        seq(x).sum().backward()
        errs[depth] = seq.last_report.reconstruction_errors[0]  # the first layer: reconstructed last
    assert errs[12] > 30 * max(errs[4], 1e-9)


def test_bdia_eval_is_the_residual_network():
    seq = make_stack("bdia", 16, 6, "reversible", dtype=torch.float32).eval()
    x = torch.randn(3, 4, 16)
    h = x
    for layer in seq.layers:
        h = h + layer.f(h)
    with torch.no_grad():
        assert torch.equal(seq(x), h)
    # with grad in eval mode the layers keep their inputs: grads still equal plain
    ref = make_stack("bdia", 16, 6, "plain", dtype=torch.float64).eval()
    rv = make_stack("bdia", 16, 6, "reversible", dtype=torch.float64).eval()
    xd = x.double()
    assert max_grad_err(run_step(rv, xd), run_step(ref, xd)) < 1e-12


def test_bdia_signs_are_per_sample_and_per_forward():
    torch.manual_seed(0)
    layer = rev.BDIA(mlp(4, dtype=torch.float64), 0.5)
    x = torch.randn(64, 4, dtype=torch.float64)
    seen = []
    for _ in range(3):
        with torch.no_grad():
            _, y = layer(x, x)
        s = layer.last_signs
        assert s.shape == (64,) and set(s.tolist()) == {-1, 1}
        g = 0.5 * s.double()[:, None]
        with torch.no_grad():
            assert torch.allclose(y, x + (1 + g) * layer.f(x))  # p_prev = p: g p + (1-g) p = p
        seen.append(s.clone())
    assert not torch.equal(seen[0], seen[1])
    with torch.no_grad():
        x1, x2 = layer.inverse(x, y)
        assert torch.allclose(y, x + (1 + 0.5 * seen[-1].double()[:, None]) * layer.f(x))
    assert rel_err(x1, x) < 1e-12


def test_bdia_refuses_bad_gamma_inverse_and_inexact_gamma():
    with pytest.raises(ValueError, match="gamma must be in"):
        rev.BDIA(mlp(4), gamma=0.0)
    with pytest.raises(ValueError, match="gamma must be in"):
        rev.BDIA(mlp(4), gamma=1.5)
    with pytest.raises(ValueError, match="exact"):
        rev.Sequential(rev.BDIA(mlp(4), gamma=0.3), split="duplicate", exact=True)
    seq = rev.Sequential(rev.BDIA(mlp(4), 0.5), split="duplicate", merge=None)
    with torch.no_grad():
        y = seq(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="Sequential.inverse cannot undo it"):
        seq.inverse(y)
    seq.layers[0].eval()
    with pytest.raises(ValueError, match="not invertible"):
        seq.layers[0].inverse(*y)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_bdia_exact_for_every_gamma_power_of_two(k):
    # the dropped bits are packed 8/k to a byte (k = 1, 2, 4), or one per byte; 105 elements per
    # stream: not a multiple of any packing
    torch.manual_seed(0)
    seq = rev.Sequential(*[rev.BDIA(mlp(7, dtype=torch.float32, gain=0.5), 2.0 ** -k) for _ in range(16)],
                         split="duplicate", merge="last", exact=True, debug=True)
    x = torch.randn(3, 5, 7, requires_grad=True)
    seq(x).sum().backward()
    assert max(seq.last_report.reconstruction_errors) == 0.0
