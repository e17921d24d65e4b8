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
from .sequential import Sequential
from . import memory, moe, optim, side, testing  # noqa: E402

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
    "Sequential",
    "is_recomputing",
    "memory",
    "moe",
    "optim",
    "side",
    "testing",
]


def _source_tree_models():
    """Running from a source checkout (in-place build): models/ is installed as revengine.models
    by pip; make the same name work here."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if "revengine.models" in sys.modules or os.path.isdir(os.path.join(here, "models")):
        return
    src = os.path.join(os.path.dirname(here), "models")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location("revengine.models", os.path.join(src, "__init__.py"),
                                                  submodule_search_locations=[src])
    module = importlib.util.module_from_spec(spec)
    sys.modules["revengine.models"] = module
    spec.loader.exec_module(module)


_source_tree_models()
