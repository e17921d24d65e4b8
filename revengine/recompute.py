"""`is_recomputing()`: lets a module tell a backward recompute from the real forward."""
import contextlib
import threading

from . import _ext

_local = threading.local()


def is_recomputing() -> bool:
    """True while revengine re-runs a layer inside backward (reversible and checkpoint modes).

    Modules with side effects (running statistics, caches, counters) can skip them then.
    """
    return _ext._C.is_recomputing() or getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def recomputing():
    """Marks a Python-driven recompute (checkpoint mode) for is_recomputing()."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
