"""torch.compile with the reversible executor: compiled F/G blocks inside it (fullgraph), and
torch.compile of a whole model (one deliberate graph break at the executor), for every mode."""
import copy

import pytest
import torch
from torch import nn

import revengine as rev

MODES = ("reversible", "checkpoint", "plain")


def block(d=8):
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


def model(mode, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), rev.Sequential(*[rev.AdditiveCoupling(block(), block()) for _ in range(3)],
                                                          mode=mode), nn.Linear(16, 1)).to(dtype)


def grads(m, x):
    for p in m.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.square().mean().backward()
    return y.detach(), [x.grad] + [p.grad for p in m.parameters()]


def close(a, b, tol):
    return max(float((u - v).abs().max()) for u, v in zip(a, b)) <= tol


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
def test_compiled_blocks_inside_the_executor(mode):
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eager = model(mode)
    compiled = copy.deepcopy(eager)
    compiled[1].compile_blocks(fullgraph=True)
    assert [k for k, _ in compiled.named_parameters()] == [k for k, _ in eager.named_parameters()]
    y0, g0 = grads(eager, x)
    y1, g1 = grads(compiled, x)
    assert torch.allclose(y0, y1, rtol=0, atol=1e-12) and close(g0, g1, 1e-12)
    assert "forward" in vars(compiled[1].layers[0].f)  # replaced by the compiled one


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_of_the_whole_model(mode):
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eager = model(mode)
    compiled = torch.compile(copy.deepcopy(eager))
    y0, g0 = grads(eager, x)
    y1, g1 = grads(compiled, x)
    assert torch.allclose(y0, y1, rtol=0, atol=1e-12) and close(g0, g1, 1e-12)
    y2, g2 = grads(compiled, x + 1)  # a second call reuses the compiled graphs
    assert torch.isfinite(y2).all()


def test_whole_model_graph_break_is_only_the_executor():
    explain = torch._dynamo.explain(model("reversible"))(torch.randn(5, 6, dtype=torch.float64))
    # the executor call is skipped (compiler.disable): graphs before and after it, nothing else breaks
    assert explain.graph_break_count <= 1, explain.break_reasons
    assert explain.graph_count <= 2
