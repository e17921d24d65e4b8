"""check_layer: reconstruction and gradient errors of one reversible layer, as numbers."""
import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..couplings import Coupling
from ..sequential import Sequential

Tensor = torch.Tensor


@dataclass
class Report:
    """What check_layer measured. Errors are max-abs (reconstruction) or max relative (grads)."""

    dtype: torch.dtype
    reconstruction_error: float   # |x - reconstruction| in the reversible backward (RNG replayed)
    inverse_error: float          # |x - layer.inverse(layer(x))| via Sequential.inverse (no RNG replay)
    output_error: float           # reversible forward vs plain forward, relative
    grad_error: float             # worst relative grad error vs mode="plain" (inputs and parameters)
    grad_errors: Dict[str, float] = field(default_factory=dict)
    scale: float = 1.0            # max |x|, for relative reading of the absolute errors

    def tolerances(self) -> Tuple[float, float]:
        """Default (reconstruction, grad) tolerances for the dtype."""
        if self.dtype == torch.float64:
            return 1e-9, 1e-9
        if self.dtype == torch.float32:
            return 1e-4, 1e-3
        return 5e-2, 5e-2

    def ok(self, reconstruction_tol: Optional[float] = None, grad_tol: Optional[float] = None) -> bool:
        rt, gt = self.tolerances()
        rt = rt if reconstruction_tol is None else reconstruction_tol
        gt = gt if grad_tol is None else grad_tol
        scale = max(1.0, self.scale)
        return (
            math.isfinite(self.reconstruction_error)
            and self.reconstruction_error <= rt * scale
            and math.isfinite(self.grad_error)
            and self.grad_error <= gt
        )

    def assert_ok(self, reconstruction_tol: Optional[float] = None, grad_tol: Optional[float] = None) -> None:
        if not self.ok(reconstruction_tol, grad_tol):
            raise AssertionError(f"reversible layer check failed: {self}")


def _rel(a: Optional[Tensor], b: Optional[Tensor]) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        # One side has a grad the other lacks: only fine if it is all zeros.
        t = a if a is not None else b
        return 0.0 if float(t.abs().max()) == 0.0 else math.inf
    denom = float(b.abs().max())
    diff = float((a - b).abs().max())
    if not math.isfinite(diff):
        return math.inf
    return diff / denom if denom > 0 else diff


def check_layer(layer: Coupling, *inputs: Tensor, seed: int = 0, exact: bool = False, **ctx) -> Report:
    """Runs `layer` reversibly and plainly on the same inputs and RNG, and compares.

    inputs: one tensor (split in two halves on the last dim) or the two streams. ctx kwargs are
    passed to the layer. The layer's parameters, grads and buffers, and the inputs, are left as
    they were. Works in the inputs' dtype: use float64 to check the maths (~1e-12), float32/bf16
    to see the rounding you will train with.
    """
    if not isinstance(layer, Coupling):
        raise TypeError(f"check_layer: expected a revengine.Coupling, got {type(layer).__name__}")
    if len(inputs) == 1:
        x = inputs[0]
        if x.shape[-1] % 2:
            raise ValueError(f"check_layer: the input's last dim must be even to split it, got shape {tuple(x.shape)}")
        x1, x2 = x.detach().chunk(2, dim=-1)
    elif len(inputs) == 2:
        x1, x2 = (t.detach() for t in inputs)
    else:
        raise ValueError(f"check_layer: pass one tensor or two streams, got {len(inputs)}")
    x1, x2 = x1.clone(), x2.clone()
    params = list(layer.parameters())
    saved_grads = [p.grad for p in params]
    saved_buffers = copy.deepcopy({k: v for k, v in layer.state_dict().items() if k in dict(layer.named_buffers())})
    gen = torch.Generator().manual_seed(seed + 1)
    w1 = torch.randn(x1.shape, generator=gen, dtype=torch.float64).to(x1)
    w2 = torch.randn(x2.shape, generator=gen, dtype=torch.float64).to(x2)

    def run(mode: str) -> Tuple[Tensor, Tensor, List[Optional[Tensor]], Optional[float]]:
        seq = Sequential(layer, mode=mode, merge=None, exact=exact, debug=(mode == "reversible"),
                         debug_tol=math.inf)
        a = x1.clone().requires_grad_(True)
        b = x2.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        layer.load_state_dict(saved_buffers, strict=False)
        torch.manual_seed(seed)
        y1, y2 = seq((a, b), **ctx)
        loss = (y1 * w1).sum() + (y2 * w2).sum()
        loss.backward()
        recon = seq.last_report.reconstruction_errors[0] if mode == "reversible" else None
        return y1.detach(), y2.detach(), [a.grad, b.grad] + [p.grad for p in params], recon

    try:
        p1, p2, pgrads, _ = run("plain")
        r1, r2, rgrads, recon = run("reversible")
        layer.load_state_dict(saved_buffers, strict=False)
        with torch.no_grad():
            torch.manual_seed(seed)
            # BDIA draws its signs per forward: Sequential.inverse cannot undo it, its own inverse
            # reads the signs of its last (Python) forward
            own = getattr(layer, "inverse_needs_its_forward", False)
            seq = Sequential(layer, merge=None, exact=exact, mode="plain" if own else "reversible")
            y1, y2 = seq((x1, x2), **ctx)
            b1, b2 = layer.inverse(y1, y2, **ctx) if own else seq.inverse((y1, y2), **ctx)
            inverse_error = float(torch.maximum((b1 - x1).abs().max(), (b2 - x2).abs().max()))
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        layer.load_state_dict(saved_buffers, strict=False)

    names = ["x1", "x2"] + [n for n, _ in layer.named_parameters()]
    grad_errors = {n: _rel(r, p) for n, r, p in zip(names, rgrads, pgrads)}
    output_error = max(_rel(r1, p1), _rel(r2, p2))
    return Report(
        dtype=x1.dtype,
        reconstruction_error=float(recon) if recon is not None and recon >= 0 else math.nan,
        inverse_error=inverse_error,
        output_error=output_error,
        grad_error=max(grad_errors.values()) if grad_errors else 0.0,
        grad_errors=grad_errors,
        scale=float(torch.maximum(x1.abs().max(), x2.abs().max())),
    )
