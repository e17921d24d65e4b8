"""revengine: a reversible-autograd engine for PyTorch.

    import revengine as rev
    stack = rev.Sequential(rev.AdditiveCoupling(f, g), ..., mode="reversible")
    y = stack(x, attention_mask=mask)   # backward reconstructs activations instead of storing them
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ext  # noqa: F401  (loads and checks the C++ extension)
from .couplings import AdditiveCoupling, AffineCoupling, Coupling
from .integrators import EulerStart, Hamiltonian, Leapfrog, Midpoint, StochasticMidpoint
from .recompute import is_recomputing
from .sequential import Sequential
from . import memory, side, testing  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "EulerStart",
    "Hamiltonian",
    "Leapfrog",
    "Midpoint",
    "StochasticMidpoint",
    "Sequential",
    "is_recomputing",
    "memory",
    "side",
    "testing",
]
