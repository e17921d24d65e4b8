import importlib.util
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import revengine as rev
from revengine.testing.strategies import MLP

# The folder the tested revengine was imported from (the installed package in CI, the source tree
# in a dev build): subprocesses must import the same one.
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rev.__file__)))


def child_env(**extra) -> dict:
    """os.environ for a subprocess that imports the revengine under test (PKG_ROOT first on PYTHONPATH)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([PKG_ROOT] + paths), **extra}


def run_python(args, env=None, timeout=300):
    """`python *args` importing the revengine under test: child_env(), and a working directory outside
    the checkout (`python -c` / `-m` put the cwd first on sys.path, where the source tree's unbuilt
    revengine/ would shadow the installed package)."""
    return subprocess.run([sys.executable, *args], env=env or child_env(), cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=timeout)


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    """benchmarks/<name> loaded as a module (its __name__ is not "__main__": main() is not run),
    with the benchmarks folder first on sys.path while it imports, as `python benchmarks/<name>`
    has it: the benchmarks import their shared helpers with `from _common import ...`."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], os.path.join(BENCHMARKS, name))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, BENCHMARKS)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(BENCHMARKS)
    return mod


def mlp(width, hidden=None, dropout=0.0, act="gelu", gain=1.0, dtype=torch.float64):
    return MLP(width, hidden or 4 * width, act=act, dropout=dropout, gain=gain).to(dtype)


class CtxMLP(torch.nn.Module):
    """A stream function using context: a per-feature scale tensor and a (cos, sin) pair."""

    def __init__(self, width, dtype=torch.float64):
        super().__init__()
        self.inner = mlp(width, dtype=dtype)

    def forward(self, x, scale=None, rope=None, flag=False):
        h = self.inner(x)
        if scale is not None:
            h = h * scale
        if rope is not None:
            cos, sin = rope
            h = h * cos + torch.roll(h, 1, -1) * sin
        return -h if flag else h


class UserCoupling(rev.Coupling):
    """A user-defined coupling through the documented protocol (forward + inverse)."""

    def __init__(self, width, dtype=torch.float64, ctx=False):
        super().__init__()
        self.f = CtxMLP(width, dtype) if ctx else mlp(width, dtype=dtype)
        self.g = CtxMLP(width, dtype) if ctx else mlp(width, dtype=dtype)

    def forward(self, x1, x2, **ctx):
        y1 = x1 + self.f(x2, **ctx)
        return y1, x2 + self.g(y1, **ctx)

    def inverse(self, y1, y2, **ctx):
        x2 = y2 - self.g(y1, **ctx)
        return y1 - self.f(x2, **ctx), x2


def make_layer(kind, width, dtype=torch.float64, dropout=0.0, ctx=False):
    fn = (lambda: CtxMLP(width, dtype)) if ctx else (lambda: mlp(width, dropout=dropout, dtype=dtype))
    # Log-scales of O(1) per layer multiply up to e^(2*depth) growth; keep them modest so that a
    # depth-16 affine stack stays well conditioned and float64 agreement measures the engine.
    small = (lambda: CtxMLP(width, dtype)) if ctx else (lambda: mlp(width, dropout=dropout, dtype=dtype, gain=0.2))
    if kind == "additive":
        return rev.AdditiveCoupling(fn(), fn())
    if kind == "meft":
        return rev.AdditiveCoupling(fn(), fn(), lam=0.8, beta=1.25)
    if kind == "affine":
        return rev.AffineCoupling(small(), fn(), small(), fn())
    if kind == "user":
        # The generic protocol calls the user's inverse without RNG replay: no dropout there.
        return UserCoupling(width, dtype, ctx=ctx)
    raise ValueError(kind)


KINDS = ["additive", "meft", "affine", "user"]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def run_step(seq, x, seed=0, **ctx):
    """One forward+backward under a fixed seed; returns output, input grad and param grads."""
    for p in seq.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = seq(x, **ctx)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
    (y * w).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() if p.grad is not None else None for p in seq.parameters()]


def max_grad_err(a, b):
    errs = [rel_err(a[1], b[1])]
    for ga, gb in zip(a[2], b[2]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            errs.append(rel_err(ga, gb))
    return max(errs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


class NotInvertible(rev.Coupling):
    """A coupling whose inverse is wrong (sign error)."""

    def __init__(self):
        super().__init__()
        self.f = mlp(4)

    def forward(self, x1, x2):
        return x1 + self.f(x2), x2

    def inverse(self, y1, y2):
        return y1 + self.f(y2), y2
