"""The side channel between revengine's executor and the functions it runs.

Two things a layer's stream function may need beyond "tensor in, tensor out":

* `replay(owner, compute)`: a discrete decision (MoE top-k indices, a sampled mask) computed in
  forward and replayed, not recomputed, when backward re-runs the layer from a reconstructed
  input. A reconstruction off by one ulp can flip a top-k choice; replay makes the recompute take
  the forward's decision.
* `attach_aux(y, aux, owner)`: a scalar side output (a load-balancing or z-loss) computed inside
  the layer. In reversible mode it becomes an extra output of the layer's autograd node, so the
  grad the loss sends it reaches the layer's parameters exactly, however the loss is scaled.
  Collect the values with `collect_aux()`:

      with revengine.side.collect_aux() as aux:
          y = stack(x)
      loss = task_loss + 0.01 * sum(aux)

* `save(owner, value)` / `load(owner)`: a tensor a layer keeps from its forward for its own
  backward (a layer that cannot invert keeps its input), with `is_recording()` (a reversible
  forward is running the layer) and `is_replaying()` (backward is reconstructing or re-running it).

Outside a reversible stack both are plain: `replay` calls `compute`, `attach_aux` collects
`aux` (with its graph) and returns `y`.
"""
import contextlib
import threading
from typing import Callable, List

import torch

from . import _ext
from .recompute import is_recomputing

_local = threading.local()

_NONE, _RECORD, _REPLAY = 0, 1, 2


def _base(owner) -> str:
    return f"{type(owner).__name__}@{id(owner):x}"


def is_recording() -> bool:
    """True while a reversible forward runs a layer (what it saves or replays is being recorded)."""
    return _ext._C.side_mode() == _RECORD


def is_replaying() -> bool:
    """True while backward reconstructs or re-runs a layer (the forward's records are readable)."""
    return _ext._C.side_mode() == _REPLAY


def save(owner, value: torch.Tensor, name: str = "saved") -> None:
    """Keeps `value` from this forward call of the running layer for its backward (`load`).
    Only while `is_recording()`; the executor frees it when the layer's backward is done."""
    _ext._C.side_save(_ext._C.side_tag(f"{_base(owner)}-{name}"), value)


def load(owner, name: str = "saved"):
    """The tensor `save(owner, ..., name)` kept in the forward of the layer being replayed, or None."""
    return _ext._C.side_load(_ext._C.side_tag(f"{_base(owner)}-{name}"))


def replay(owner, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """compute() in forward (its result recorded), the recorded result in the backward recompute.

    `owner` identifies the call site (usually the module calling this); the n-th call by the same
    owner within one stream-function call is matched with the n-th call of the recompute.
    """
    mode = _ext._C.side_mode()
    if mode == _NONE:
        return compute()
    tag = _ext._C.side_tag(_base(owner))
    if mode == _REPLAY:
        saved = _ext._C.side_load(tag)
        if saved is not None:
            return saved
        raise RuntimeError(
            f"revengine: no record '{tag}' to replay: the recompute of this layer called "
            "revengine.side.replay() in a way its forward did not (forward and recompute must make "
            "the same calls in the same order)"
        )
    value = compute()
    _ext._C.side_save(tag, value)
    return value


class _AttachAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, aux, grad):
        ctx.save_for_backward(grad)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        (grad,) = ctx.saved_tensors
        return grad_y, grad, None


def attach_aux(y: torch.Tensor, aux: torch.Tensor, owner) -> torch.Tensor:
    """Emits the scalar `aux` as a side output of the running layer; returns y (unchanged).

    The gradient the loss sends `aux` flows into the layer's backward through y's computation.
    """
    mode = _ext._C.side_mode()
    if mode == _RECORD:
        _ext._C.side_emit(_ext._C.side_tag(_base(owner)), aux.detach())
        return y
    if mode == _REPLAY:
        grad = _ext._C.side_grad(_ext._C.side_tag(_base(owner)))
        if grad is None or not torch.is_grad_enabled() or not aux.requires_grad:
            return y
        return _AttachAux.apply(y, aux, grad.to(aux.dtype).reshape(aux.shape))
    if not is_recomputing():  # a checkpoint recompute re-emits nothing: the forward's aux holds the graph
        collect([aux])
    return y


class AuxList(list):
    """The side outputs collected by `collect_aux`, in layer order."""

    def total(self) -> torch.Tensor:
        if not self:
            return torch.zeros(())
        out = self[0]
        for t in self[1:]:
            out = out + t
        return out


@contextlib.contextmanager
def collect_aux():
    """Collects the side outputs emitted inside the block (nested collectors each get their own)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    out = AuxList()
    stack.append(out)
    try:
        yield out
    finally:
        stack.pop()


def collect(values: List[torch.Tensor]) -> None:
    """Adds side outputs to the innermost `collect_aux()` (Sequential's plain and checkpoint
    modes emit theirs this way)."""
    stack = getattr(_local, "stack", None)
    if stack:
        stack[-1].extend(values)
