"""The optimizer step inside backward: each parameter is updated as soon as its gradient is
complete, and the gradient is freed right away, so the whole model's gradients never exist at once.

With a reversible stack the executor finishes one layer at a time in backward, so a layer's
parameters are stepped while the layers below it have not been reached yet; what is left of a
training step's peak is weights + optimizer state + one layer's working set (LOMO/AdaLomo and
revlib's fused optimizer do the same).

    opt = rev.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4, weight_decay=0.1)
    loss = model(x, labels=x).loss
    loss.backward()                      # every parameter is stepped inside this call; .grad stays None
    opt.state_dict() / opt.load_state_dict(sd)   # checkpoint and resume
    opt.set_lr(3e-5)                     # schedules

Semantics are torch.optim's: one optimizer instance per parameter (AdamW, SGD, ... any optimizer
whose update of a parameter reads only that parameter's gradient and state), so the updated
weights equal those of the unfused optimizer (tests: float64, 1e-12).

Gradient clipping (`max_grad_norm`), by `clip`:
  - "per_tensor": each parameter's gradient is scaled to norm <= max_grad_norm on its own (the
    cheap choice; not the same as torch's global clipping);
  - "global": the exact torch.nn.utils.clip_grad_norm_ semantics with two passes: call
    `opt.step_two_pass(closure)`, where closure() runs forward and returns the loss. Pass 1 runs
    forward + backward and only accumulates the squared norms (grads freed as they come); pass 2
    replays the RNG state and steps with the global scale. It costs one more forward + backward.

Gradient accumulation is refused (`grad_accumulation` > 1 is a ValueError): every backward is an
optimizer step, so summing micro-batch gradients would need the full set of gradients this
optimizer exists to avoid.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

CLIP_MODES = ("per_tensor", "global")


class InBackwardOptimizer:
    """Steps every parameter inside backward, as soon as its gradient is complete, then frees it.

    Args:
        params: the parameters to train (those that do not require grad are skipped; param
            groups are refused: there is one optimizer per parameter).
        optimizer_cls: a torch.optim class whose update of a parameter reads only that
            parameter's gradient and state (AdamW, Adam, SGD, torchao's low-bit AdamW, ...).
        max_grad_norm: clip gradients to this norm (None: no clipping).
        clip: "per_tensor" (each gradient on its own, inside backward) or "global" (exactly
            `clip_grad_norm_`, with `step_two_pass`: one more forward + backward).
        grad_accumulation: must be 1 (every backward is a step).
        **optimizer_kwargs: passed to every optimizer_cls instance (lr, weight_decay, ...).

    Raises:
        ValueError: grad_accumulation != 1, no parameter requires grad, an unknown clip mode,
            max_grad_norm <= 0, or parameters that already hold gradients.
        TypeError: param groups (dicts) instead of parameters.

    Example::

        >>> opt = rev.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4)
        >>> model(ids, labels=ids).loss.backward()   # every parameter stepped; .grad stays None
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer_cls=torch.optim.AdamW, *,
                 max_grad_norm: Optional[float] = None, clip: str = "per_tensor", grad_accumulation: int = 1,
                 **optimizer_kwargs):
        if grad_accumulation != 1:
            raise ValueError(f"InBackwardOptimizer: grad_accumulation={grad_accumulation} is not supported: every backward "
                             "is an optimizer step, and summing micro-batch gradients needs the whole model's gradients "
                             "at once, which this optimizer exists to avoid (use a larger batch, or a plain optimizer)")
        self.params: List[torch.nn.Parameter] = []
        seen = set()
        for p in params:
            if isinstance(p, dict):
                raise TypeError("InBackwardOptimizer takes parameters, not param groups (one optimizer per parameter)")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("InBackwardOptimizer: no parameters that require grad")
        if clip not in CLIP_MODES:
            raise ValueError(f"InBackwardOptimizer: clip must be one of {CLIP_MODES}, got {clip!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"InBackwardOptimizer: max_grad_norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm, self.clip = max_grad_norm, clip
        self.optimizers = [optimizer_cls([p], **optimizer_kwargs) for p in self.params]
        self._pass = "step"  # "step" | "norm" (pass 1 of the global clipping) | "off"
        self._sq_norm = 0.0
        self._scale = 1.0
        self.steps_taken = 0  # parameter updates in the last backward
        self._handles = []
        self.attach()
        for p in self.params:
            if p.grad is not None:
                raise ValueError("InBackwardOptimizer: parameters already hold gradients; set them to None first "
                                 "(gradient accumulation is not supported)")

    # -- the hook ------------------------------------------------------------------------------

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self._pass == "off":
                return
            g = p.grad
            if self._pass == "norm":
                self._sq_norm += float(g.detach().double().pow(2).sum())
                p.grad = None
                return
            if self.max_grad_norm is not None:
                if self.clip == "per_tensor":
                    n = float(g.detach().norm())
                    if n > self.max_grad_norm:
                        g.mul_(self.max_grad_norm / (n + 1e-6))
                elif self._scale != 1.0:
                    g.mul_(self._scale)
            self.optimizers[i].step()
            p.grad = None
            self.steps_taken += 1
        return hook

    # -- API ------------------------------------------------------------------------------------

    def step_two_pass(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One step with torch's global-norm clipping (clip="global"): two forward + backward passes.

        closure() must run the forward and return the loss (no backward). The CPU RNG (and CUDA's,
        when initialised) is replayed for pass 2, so dropout masks match. Returns the loss of pass 2.
        """
        if self.clip != "global" or self.max_grad_norm is None:
            raise RuntimeError("step_two_pass is for clip='global' with a max_grad_norm; otherwise call backward()")
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._pass, self._sq_norm = "norm", 0.0
        try:
            closure().backward()
        finally:
            self._pass = "step"
        total = math.sqrt(self._sq_norm)
        self._scale = min(1.0, self.max_grad_norm / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
        self.last_grad_norm = total
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        try:
            loss = closure()
            self.steps_taken = 0
            loss.backward()
        finally:
            self._scale = 1.0
        return loss

    @property
    def state(self) -> Dict[torch.Tensor, Dict[str, Any]]:
        """Every parameter's optimizer state (as torch.optim.Optimizer.state; memory.breakdown reads it)."""
        return {p: st for opt in self.optimizers for p, st in opt.state.items()}

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers], "n": len(self.optimizers)}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("n") != len(self.optimizers):
            raise ValueError(f"InBackwardOptimizer.load_state_dict: state for {sd.get('n')} parameters, "
                             f"this optimizer has {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, sd["per_parameter"]):
            opt.load_state_dict(s)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Grads are freed in backward already; clears any left by code outside this optimizer."""
        for p in self.params:
            p.grad = None

    def remove(self) -> None:
        """Unhooks the parameters (the optimizer state is kept); `attach()` hooks them again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def attach(self) -> None:
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]
