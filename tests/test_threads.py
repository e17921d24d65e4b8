"""Concurrency: threads training their own stacks at once must not corrupt each other's recompute,
and a recompute must not run on parameters changed since its forward."""
import threading

import pytest
import torch
from torch import nn

import revengine as rev
from revengine.errors import RecomputeError

THREADS, STEPS, DEPTH, WIDTH = 4, 10, 4, 48


class MaskCheckingDropout(nn.Module):
    """Dropout that keeps the mask its forward drew and counts recomputes that drew another one."""

    def __init__(self, p):
        super().__init__()
        self.p, self.mask, self.mismatches, self.recomputes = p, None, 0, 0

    def forward(self, x):
        mask = (torch.rand_like(x) >= self.p).to(x.dtype)
        if rev.is_recomputing():
            self.recomputes += 1
            self.mismatches += int(not torch.equal(mask, self.mask))
        else:
            self.mask = mask
        return x * mask / (1 - self.p)


def _branch(d, p=0.2):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), MaskCheckingDropout(p), nn.Linear(2 * d, d))


class PythonCoupling(rev.Coupling):
    """A coupling written in Python (the executor's other layer kind; its inverse gets no RNG
    replay, so no dropout inside): its calls take the GIL inside the RNG section."""

    def __init__(self, d):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))
        self.g = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))

    def forward(self, x1, x2):
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)

    def inverse(self, y1, y2):
        x2 = y2 - self.g(y1)
        return y1 - self.f(x2), x2


def _stack(mode, seed, python_layer):
    torch.manual_seed(seed)
    layers = [rev.AdditiveCoupling(_branch(WIDTH // 2), _branch(WIDTH // 2)) for _ in range(DEPTH - 1)]
    layers.append(PythonCoupling(WIDTH // 2) if python_layer else rev.AdditiveCoupling(_branch(WIDTH // 2), _branch(WIDTH // 2)))
    return rev.Sequential(*layers, mode=mode, debug=(mode == "reversible")).double()


def _train_concurrently(mode):
    stacks = [_stack(mode, seed, python_layer=(seed % 2 == 1)) for seed in range(THREADS)]
    inputs = [torch.randn(16, 32, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + k))
              for k in range(THREADS)]
    barrier, errors = threading.Barrier(THREADS), []

    def train(k):
        try:
            opt = torch.optim.SGD(stacks[k].parameters(), lr=1e-3)
            barrier.wait()
            for _ in range(STEPS):
                stacks[k](inputs[k]).square().mean().backward()
                opt.step()
                opt.zero_grad()
        except Exception as e:  # reported by the main thread
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=train, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock between the RNG section and the GIL?)"
    drops = [m for s in stacks for m in s.modules() if isinstance(m, MaskCheckingDropout)]
    return errors, drops


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_threads_with_dropout_replay_their_own_masks(mode):
    """Four threads each train their own stack with dropout, 10 steps at once: every recompute
    draws exactly the mask its forward drew (reversible mode also checks each reconstruction
    against the true input, debug=True), whatever the other threads drew meanwhile."""
    errors, drops = _train_concurrently(mode)
    assert errors == []
    assert all(m.recomputes == STEPS for m in drops)
    assert sum(m.mismatches for m in drops) == 0


def test_backward_leaves_the_callers_rng_where_it_was_with_threads_idle():
    stack = _stack("reversible", 0, python_layer=True)
    x = torch.randn(4, 8, WIDTH, dtype=torch.float64)
    y = stack(x)
    state = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
@pytest.mark.parametrize("python_layer", [False, True])
def test_parameter_changed_in_place_before_backward_is_refused(mode, python_layer):
    stack = _stack(mode, 0, python_layer)
    x = torch.randn(4, 8, WIDTH, dtype=torch.float64)
    loss = stack(x).square().mean()
    weight = stack[DEPTH - 1].g[0].weight  # the top layer: the first to run its backward
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    with pytest.raises(RecomputeError, match=rf"layer {DEPTH - 1} .*modified in place between the forward and the backward"):
        loss.backward()
    assert torch.equal(weight.detach(), before + 1.0)  # nothing else touched


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_parameter_changed_after_backward_is_fine(mode):
    """The normal loop (forward, backward, step, forward, ...) never trips the check."""
    stack = _stack(mode, 0, python_layer=False)
    opt = torch.optim.SGD(stack.parameters(), lr=1e-2)
    x = torch.randn(4, 8, WIDTH, dtype=torch.float64)
    for _ in range(3):
        stack(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
