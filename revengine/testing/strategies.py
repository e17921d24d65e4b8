"""Hypothesis strategies for fuzzing reversible layers and stacks.

Each function returns a hypothesis strategy. Layers are built with torch's default init under a
seed drawn by hypothesis, so failures shrink and replay.

    from hypothesis import given
    from revengine.testing import strategies as rst, check_layer

    @given(layer=rst.couplings(width=8, dtype=torch.float64), x=rst.inputs(width=16, dtype=torch.float64))
    def test_layer(layer, x):
        check_layer(layer, x).assert_ok()
"""
from typing import Callable, Optional, Sequence

import torch
from torch import nn

try:
    from hypothesis import strategies as st
except ImportError as e:
    raise ImportError("revengine.testing.strategies needs hypothesis: pip install hypothesis "
                      "(or pip install 'revengine[test]')") from e

from ..couplings import AdditiveCoupling, AffineCoupling
from ..sequential import Sequential

FLOAT_DTYPES = (torch.float32, torch.float64)


def float_dtypes(dtypes: Sequence[torch.dtype] = FLOAT_DTYPES):
    return st.sampled_from(list(dtypes))


def half_widths(min_value: int = 1, max_value: int = 16):
    return st.integers(min_value, max_value)


def stream_shapes(width: Optional[int] = None, max_batch_dims: int = 2, max_batch: int = 5, max_half_width: int = 16):
    """Shapes (*batch, 2*half) of a stack's input: the last dim is even so it splits in halves."""
    last = st.just(width) if width is not None else half_widths(1, max_half_width).map(lambda h: 2 * h)
    batch = st.lists(st.integers(1, max_batch), min_size=1, max_size=max_batch_dims)
    return st.tuples(batch, last).map(lambda bl: tuple(bl[0]) + (bl[1],))


def scales(min_value: float = 0.5, max_value: float = 2.0):
    """MEFT-style stream scales lam / beta (bounded away from 0: 1/scale amplifies error)."""
    return st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)


def depths(min_value: int = 1, max_value: int = 16):
    return st.integers(min_value, max_value)


def inputs(shape=None, width: Optional[int] = None, dtype: torch.dtype = torch.float64, scale: float = 1.0):
    """Random input tensors (from a drawn seed) of a given or drawn shape."""
    shapes = st.just(tuple(shape)) if shape is not None else stream_shapes(width=width)

    def make(args):
        shp, seed = args
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shp, generator=g, dtype=torch.float64) * scale).to(dtype)

    return st.tuples(shapes, st.integers(0, 2**31 - 1)).map(make)


class MLP(nn.Module):
    """A stream function f(x, **ctx): Linear-act-(dropout)-Linear, output scaled by `gain`."""

    def __init__(self, width: int, hidden: int, act: str = "gelu", dropout: float = 0.0, gain: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = {"gelu": nn.GELU(), "tanh": nn.Tanh(), "relu": nn.ReLU(), "silu": nn.SiLU()}[act]
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        self.gain = gain

    def forward(self, x, **ctx):
        return self.fc2(self.drop(self.act(self.fc1(x)))) * self.gain


def mlps(width: int, dtype: torch.dtype = torch.float64, dropout: bool = False):
    """Stream functions of a given width (hidden size, activation, optional dropout drawn)."""

    def make(args):
        hidden, act, p, seed = args
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return MLP(width, hidden, act, p).to(dtype)

    p = st.sampled_from([0.0, 0.1, 0.3]) if dropout else st.just(0.0)
    return st.tuples(st.integers(1, 4 * width), st.sampled_from(["gelu", "tanh", "relu", "silu"]), p,
                     st.integers(0, 2**31 - 1)).map(make)


def additive_couplings(width: int, dtype: torch.dtype = torch.float64, dropout: bool = False, meft_scales: bool = True):
    """AdditiveCoupling over streams of `width` (half the stack input), scales drawn when meft_scales."""
    sc = scales() if meft_scales else st.just(1.0)
    fn = mlps(width, dtype, dropout)
    return st.builds(AdditiveCoupling, fn, fn, sc, sc)


def affine_couplings(width: int, dtype: torch.dtype = torch.float64, dropout: bool = False):
    fn = mlps(width, dtype, dropout)
    return st.builds(AffineCoupling, fn, fn, fn, fn, st.floats(0.5, 3.0))


def couplings(width: int, dtype: torch.dtype = torch.float64, dropout: bool = False):
    """Any built-in coupling of stream width `width`."""
    return st.one_of(additive_couplings(width, dtype, dropout), affine_couplings(width, dtype, dropout))


def stacks(width: int, dtype: torch.dtype = torch.float64, max_depth: int = 8, mode: str = "reversible",
           layer_strategy: Optional[Callable[[int, torch.dtype], st.SearchStrategy]] = None):
    """revengine.Sequential stacks of drawn depth over an input of last dim 2*width."""
    make_layer = layer_strategy or (lambda w, dt: couplings(w, dt))
    return st.lists(make_layer(width, dtype), min_size=1, max_size=max_depth).map(
        lambda ls: Sequential(*ls, mode=mode)
    )


__all__ = [
    "FLOAT_DTYPES", "MLP", "additive_couplings", "affine_couplings", "couplings", "depths", "float_dtypes",
    "half_widths", "inputs", "mlps", "scales", "stacks", "stream_shapes",
]
