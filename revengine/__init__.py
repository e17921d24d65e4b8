"""revengine: a reversible-autograd engine for PyTorch.

    import revengine as rev
    stack = rev.Sequential(rev.AdditiveCoupling(f, g), ..., mode="reversible")
    y = stack(x, attention_mask=mask)   # backward reconstructs activations instead of storing them
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ext  # noqa: F401  (loads and checks the C++ extension)
from .couplings import AdditiveCoupling, AffineCoupling, Coupling
from .errors import RecomputeError, ReconstructionError, ReversibleError
from .integrators import BDIA, EulerStart, Hamiltonian, Leapfrog, Midpoint, StochasticMidpoint
from .recompute import is_recomputing
from .sequential import MODES, Sequential
from . import memory, moe, offload, ops, optim, side, testing  # noqa: E402

memory.bound_onednn_caches()  # before the first bfloat16 matmul on CPU (see memory.ONEDNN_CACHE_ENV)

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "BDIA",
    "Coupling",
    "EulerStart",
    "Hamiltonian",
    "Leapfrog",
    "Midpoint",
    "RecomputeError",
    "ReconstructionError",
    "ReversibleError",
    "StochasticMidpoint",
    "MODES",
    "Sequential",
    "is_recomputing",
    "memory",
    "moe",
    "offload",
    "ops",
    "optim",
    "side",
    "testing",
]

