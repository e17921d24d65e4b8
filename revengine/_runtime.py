"""Small Python helpers the C++ executor calls back into."""
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
