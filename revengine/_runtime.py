"""Small Python helpers the C++ executor calls back into."""
import contextlib
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


def flatten_context(kwargs: Dict[str, Any]) -> Tuple[List[torch.Tensor], Callable[[List[torch.Tensor]], Dict[str, Any]]]:
    """Splits context kwargs into their tensors and a builder that puts (replacement) tensors back.

    Tensors become explicit inputs of every layer's autograd node, so grads reach those that
    require grad; the rest of the structure ((cos, sin) tuples, flags, ...) is kept as is.
    """
    if not kwargs:
        return [], None
    leaves, spec = tree_flatten(kwargs)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in positions]
    template = list(leaves)
    for i in positions:
        template[i] = None  # no reference to the tensors themselves: they travel separately

    def build(ts: List[torch.Tensor]) -> Dict[str, Any]:
        filled = list(template)
        for i, t in zip(positions, ts):
            filled[i] = t
        return tree_unflatten(filled, spec)

    return tensors, build


def recompute_call(fn: Callable, args: tuple, kwargs: Dict[str, Any], module: Any = None):
    """Calls fn during a backward recompute without letting it change module buffers.

    A BatchNorm in train mode updates its running statistics on every call; the forward already
    did. During the recompute each buffer is swapped for a copy (which the recompute's graph may
    save and update), and the real buffers are put back untouched afterwards.
    """
    owner = fn if module is None else module
    if not isinstance(owner, nn.Module):
        return fn(*args, **kwargs)
    swapped = []
    for m in owner.modules():
        for name, buf in m._buffers.items():
            if buf is not None:
                swapped.append((m, name, buf))
                m._buffers[name] = buf.clone()
    try:
        return fn(*args, **kwargs)
    finally:
        for m, name, buf in swapped:
            m._buffers[name] = buf


# -- layers managed by module-hook wrappers (FSDP2's fully_shard) ------------------------------
# The executor runs a built-in layer's f and g itself, so hooks on the layer module would never
# fire. HookedLayer (csrc/python.cpp) runs each forward / backward / inverse of such a layer
# inside a call of the module instead, with `body` standing in for its forward.

_MISSING = object()


class _Body:
    """What a hooked layer's module runs in place of its forward (marks the call as ours)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def coupling_forward(module: nn.Module) -> Callable:
    """What PyCoupling calls as the module's forward: the module itself (its hooks run), or,
    inside a hooked call of that module (whose hooks already ran), its class's forward."""
    if isinstance(module.__dict__.get("forward"), _Body):
        return type(module).forward.__get__(module)
    return module


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, body: Callable):
    """Within the block, calling module(*args) runs its hooks around `body` instead of its forward."""
    previous = module.__dict__.get("forward", _MISSING)
    module.__dict__["forward"] = _Body(body)
    try:
        yield
    finally:
        if previous is _MISSING:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = previous


def hooked_forward(module: nn.Module, body: Callable) -> None:
    with _forward_replaced(module, lambda: body()):
        module()


class _HookedStep(torch.autograd.Function):
    """A scalar whose backward is the layer's fused backward (`run`), returning the grads of the
    parameters the module held when it was called (FSDP2: the unsharded ones)."""

    @staticmethod
    def forward(ctx, run, anchor, *params):
        ctx.run = run
        ctx.anchor = (anchor.dtype, anchor.device)
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        dparams = ctx.run()
        # The anchor's grad flows on into the module's input hooks (FSDP's post-backward).
        dtype, device = ctx.anchor
        return (None, torch.zeros((), dtype=dtype, device=device)) + tuple(dparams)


def hooked_backward(module: nn.Module, params_fn: Callable, run: Callable) -> None:
    # FSDP2 registers its post-backward (reduce-scatter, reshard) on the module call's inputs
    # and its pre-backward on the outputs: an anchor input and the step's scalar output carry them.
    # The replacement stays for the backward too: a Python coupling re-run there calls its class's
    # forward (see coupling_forward), not the module with its hooks a second time.
    anchor = torch.zeros((), requires_grad=True)
    with _forward_replaced(module, lambda a: _HookedStep.apply(run, a, *params_fn())):
        out = module(anchor)
        torch.autograd.backward(out)


def hooked_inverse(module: nn.Module, body: Callable) -> None:
    unshard = getattr(module, "unshard", None)
    if unshard is None:
        body()
        return
    unshard()
    try:
        body()
    finally:
        module.reshard()
