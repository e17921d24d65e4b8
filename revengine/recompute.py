"""`is_recomputing()`: lets a module tell a backward recompute from the real forward."""
import contextlib
import threading

import torch

from . import _ext

_local = threading.local()


def is_recomputing() -> bool:
    r"""Whether revengine is re-running a layer inside backward (reversible and checkpoint modes).

    In those modes backward runs each layer's stream functions a second time. Modules with side
    effects (counters, caches) can check this to do them once. (The buffers of re-run modules,
    such as BatchNorm's running statistics, are already protected: the re-run updates copies.)

    Returns:
        True during that re-run (on the thread running it), False otherwise, including during
        the forward and in ``mode="plain"``.

    Example::

        >>> import torch, revengine as rev
        >>> class Counted(torch.nn.Linear):
        ...     calls = 0
        ...     def forward(self, x):
        ...         if not rev.is_recomputing():
        ...             Counted.calls += 1
        ...         return super().forward(x)
        >>> stack = rev.Sequential(rev.AdditiveCoupling(Counted(4, 4), Counted(4, 4)))
        >>> stack(torch.randn(2, 8, requires_grad=True)).sum().backward()
        >>> Counted.calls  # f and g once each, not again in backward
        2
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


def rng_state(device: torch.device):
    """The CPU RNG state and, on a CUDA device, that device's: what replayed_rng puts back."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(state, device: torch.device):
    """Within the block the RNG is as rng_state(device) captured it; the caller's is restored after."""
    cpu_state, dev_state = state
    with torch.random.fork_rng(devices=[device] if dev_state is not None else []):
        torch.set_rng_state(cpu_state)
        if dev_state is not None:
            torch.cuda.set_rng_state(dev_state, device)
        yield
