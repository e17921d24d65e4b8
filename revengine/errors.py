"""The errors revengine's executor raises, as one family under RuntimeError.

They subclass RuntimeError, the type these errors had before they had their own classes, so
``except RuntimeError`` keeps catching them. The C++ executor raises them: csrc/errors.h defines
C++ classes of the same names, and the Python binding turns those into these classes, also when
they are raised inside ``loss.backward()``. Imports nothing, so the binding can import it lazily.
"""

__all__ = ["ReversibleError", "ReconstructionError", "RecomputeError"]


class ReversibleError(RuntimeError):
    """Base class of the errors the reversible executor detects."""


class ReconstructionError(ReversibleError):
    """A layer's inverse did not give back its input.

    Raised in backward (and by ``Sequential.inverse``) when a reconstructed input holds NaN or
    Inf (with ``check_finite=True``), and, with ``debug=True``, when a reconstruction differs from
    the true input by more than the tolerance. The message names the layer.
    """


class RecomputeError(ReversibleError):
    """The backward of a reversible stack cannot recompute what it needs.

    Raised when an output of the stack was modified in place between forward and backward, when
    a second backward runs after the first freed the saved outputs (without
    ``retain_graph=True``), and for double backward (``create_graph=True``), which
    ``mode="reversible"`` does not support.
    """
