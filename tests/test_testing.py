"""revengine.testing: check_layer's numbers and the hypothesis strategies users fuzz with."""
import math

import torch
from hypothesis import given, settings

import revengine as rev
from revengine.testing import strategies as rst
from conftest import NotInvertible, mlp


def test_check_layer_reports_numbers_for_a_good_layer():
    layer = rev.AdditiveCoupling(mlp(4, dropout=0.3), mlp(4, dropout=0.3), lam=0.9)
    x = torch.randn(6, 8, dtype=torch.float64)
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    report = rev.testing.check_layer(layer, x)
    assert report.ok()
    assert 0 <= report.reconstruction_error < 1e-12
    assert report.grad_error < 1e-12 and report.output_error < 1e-12
    assert set(report.grad_errors) == {"x1", "x2"} | set(params)
    # Leaves the layer as it was: parameters and grads.
    assert all(torch.equal(p, params[n]) for n, p in layer.named_parameters())
    assert all(p.grad is None for p in layer.parameters())


def test_check_layer_float32_reports_rounding():
    layer = rev.AdditiveCoupling(mlp(8, dtype=torch.float32), mlp(8, dtype=torch.float32), lam=0.5, beta=0.5)
    report = rev.testing.check_layer(layer, torch.randn(32, 16))
    assert 0 < report.reconstruction_error < 1e-4  # not zero: float32 rounding, amplified by 1/lam
    assert report.dtype == torch.float32


def test_check_layer_runs_bdia_with_its_own_inverse():
    # BDIA draws signs per forward (Sequential.inverse refuses it): check_layer inverts through the
    # layer's own inverse, which reads the signs of its last forward
    x = torch.randn(6, 8, dtype=torch.float64)
    report = rev.testing.check_layer(rev.BDIA(mlp(8, dropout=0.2), 0.5), x, x)
    assert report.ok()
    assert report.reconstruction_error < 1e-12 and report.inverse_error < 1e-12 and report.grad_error < 1e-12
    exact = rev.testing.check_layer(rev.BDIA(mlp(8, dtype=torch.float32), 0.25), x.float(), x.float(), exact=True)
    assert exact.reconstruction_error == 0.0


def test_check_layer_flags_a_wrong_inverse():
    report = rev.testing.check_layer(NotInvertible(), torch.randn(4, 8, dtype=torch.float64))
    assert report.reconstruction_error > 1e-2 and report.inverse_error > 1e-2
    assert not report.ok()


def test_check_layer_restores_batchnorm_buffers():
    f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).double()
    layer = rev.AdditiveCoupling(f, mlp(4))
    before = {k: v.clone() for k, v in f.state_dict().items()}
    rev.testing.check_layer(layer, torch.randn(16, 8, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in f.state_dict().items())


@settings(max_examples=10, deadline=None)
@given(seq=rst.stacks(width=3, max_depth=4), x=rst.inputs(width=6))
def test_strategies_build_stacks_users_can_fuzz(seq, x):
    assert isinstance(seq, rev.Sequential) and 1 <= len(seq) <= 4
    y = seq(x.requires_grad_(True))
    assert y.shape == x.shape and y.grad_fn is not None
    with torch.no_grad():
        assert float((seq.inverse(y.detach()) - x).abs().max()) < 1e-9


@settings(max_examples=20, deadline=None)
@given(shape=rst.stream_shapes(), lam=rst.scales(), dt=rst.float_dtypes())
def test_strategy_values_are_in_range(shape, lam, dt):
    assert shape[-1] % 2 == 0 and all(s >= 1 for s in shape)
    assert 0.5 <= lam <= 2.0 and math.isfinite(lam)
    assert dt in (torch.float32, torch.float64)
