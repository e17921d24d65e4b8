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

Large parameters are stepped in row slices (`row_slices`: torch's Adam, AdamW and SGD, whose update
of an element reads only that element's state, above SLICE_ELEMENTS elements), each slice by an
optimizer of the same class and hyperparameters over views of the parameter, its gradient and its
state: the same result bit for bit, with the update's temporaries bounded by one slice (torch's
per-op AdamW loop, foreach=False, holds two fp32 copies of what it updates: 2.3 GiB for a
151936 x 2048 head at once, 8 MiB in slices; the fused kernel, the default, makes none).
`set_row_source(p, source)` hands the slices' state to another owner (the offload store reads and
writes a stored embedding's or head's state rows from its file, so that state is never whole; then
torchao's AdamW classes step in the same slices too: slices start on whole quantization blocks, a
quantized state moves its codes' and scales' parts (`state_rows`), and bf16 stochastic rounding uses
the step's one seed with each slice's element offset, so the result is the whole step's bit for bit), and
`stream_rows(p, source)` the weight's rows too: a loss that finds `streamed(weight)` reads the weight
through it a slice at a time and hands each slice's gradient back (`RowStream`), to be clipped and
stepped as the whole gradient would be (the offload store's LM head: its weight and gradient never
exist whole). A gradient's norm is taken over the same row slices (`grad_norm`), so that a gradient
that arrives whole and one that arrives a slice at a time clip alike, bit for bit.

Gradient accumulation is refused (`grad_accumulation` > 1 is a ValueError): every backward is an
optimizer step, so summing micro-batch gradients would need the full set of gradients this
optimizer exists to avoid.

Optimizer state off the device (`state_device="cpu"`): each parameter's state lives in host memory
(pinned when CUDA is available) and is copied to the parameter's device inside that parameter's
hook, stepped there and copied back, so the device holds the state of one parameter at a time.
The copies are issued non-blocking on the current stream: they are ordered with the compute (the
step waits for its state to arrive) but not overlapped with it; prefetching the next layer's state
on a side stream is what would hide them. When the parameter is already on `state_device` (CPU
training) nothing moves and the step is the ordinary one.

Low-memory state by name (`optimizer_class`): "adamw" (torch's, fp32 state), "adamw8bit" and
"adamw4bit" (torchao's block-quantized state, `pip install torchao`); with bf16 weights every name
maps to a torchao class that updates the weights with stochastic rounding (no fp32 master copy).
On CPU their update is revengine's fused kernel (`torch.ops.revengine.adam_step_`): torchao's
arithmetic and state layout in one pass over the parameter, where torchao's eager update makes
about forty passes over fp32 temporaries and its compiled one costs 20-60 s of compile per
parameter shape. It gives torchao's codes and scales and its weights up to float rounding; bf16
stochastic rounding draws its bits from a counter-based hash seeded from torch's generator.
`save_state_dict` / `load_state_dict_file` write and read any optimizer state dict (torchao's
quantized state tensors included) as safetensors plus JSON: no pickle.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch

CLIP_MODES = ("per_tensor", "global")
# updates that read only each element's own gradient and state: steppable in row slices
SLICED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
SLICE_ELEMENTS = 1 << 20  # a larger parameter of those is stepped in row slices of about this many elements
SLICE_ALIGN = 256  # slices start on multiples of this many elements: whole vector units of every kernel and
# whole quantization blocks of torchao's 8- and 4-bit state (256 and 128 elements by default)
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "adamw4bit")
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TORCHAO_HINT = "pip install 'torchao>=0.18' (or the revengine[lowbit] extra)"


def torchao_available() -> bool:
    """Whether torchao's optimizers can be imported (without importing them)."""
    return importlib.util.find_spec("torchao") is not None


def needs_torchao(name: str, weights: str = "fp32") -> bool:
    """Whether optimizer_class(name, weights=weights) takes its class from torchao: every setting
    but fp32 AdamW."""
    return not (name == "adamw" and weights == "fp32")


def optimizer_class(name: str, *, weights: str = "fp32", compile: bool = False) -> Tuple[type, Dict[str, Any]]:
    """(optimizer class, extra keyword arguments) for an optimizer name and weight dtype.

    Args:
        name: "adamw" (fp32 weights: torch.optim.AdamW), "adamw8bit" or "adamw4bit" (torchao's
            AdamW8bit / AdamW4bit: first and second moments block-quantized to 8 or 4 bits; tensors
            under 4096 elements keep them unquantized, as bitsandbytes does).
        weights: "fp32" or "bf16". With bf16 weights there is no fp32 master copy: the update is
            computed in fp32 and rounded stochastically to bf16 (torchao's bf16_stochastic_round);
            "adamw" then means torchao's _AdamW, whose moments have the weights' dtype (bf16).
        compile: torchao's classes as they are, which torch.compile their update once per
            parameter shape (fast steps after a slow first one: the choice on a GPU); False
            (default) steps CPU parameters with revengine's fused kernel (one pass, no
            temporaries, no compile time) and others with torchao's update run eagerly.

    Raises:
        ValueError: an unknown name or weight dtype.
        ImportError: torchao is needed and not installed (the message says how to install it).
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"revengine.optim: unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"revengine.optim: weights must be one of {tuple(WEIGHT_DTYPES)}, got {weights!r}")
    if not needs_torchao(name, weights):
        return torch.optim.AdamW, {}
    try:
        ao = importlib.import_module("torchao.optim")
    except ImportError as e:
        what = f"optimizer {name!r}" if name != "adamw" else "bf16 weights (stochastic rounding)"
        raise ImportError(f"revengine.optim: {what} needs torchao: {TORCHAO_HINT} ({e})") from None
    cls = getattr(ao, {"adamw": "_AdamW", "adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit"}[name])
    return (cls if compile else _eager_class(cls)), {"bf16_stochastic_round": weights == "bf16"}


def fused_default(optimizer_cls: type, params: List[torch.Tensor], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`kwargs` with fused=True added for torch's Adam/AdamW when the caller chose neither fused nor
    foreach and every parameter is a floating-point CPU or CUDA tensor: one kernel per parameter
    instead of the loop of small ops torch runs on CPU by default (6.5x faster there), as
    transformers' Trainer defaults to (adamw_torch_fused)."""
    if optimizer_cls not in (torch.optim.Adam, torch.optim.AdamW) or "fused" in kwargs or "foreach" in kwargs \
            or kwargs.get("differentiable"):
        return kwargs
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {**kwargs, "fused": True}
    return kwargs


def create(optimizer_cls: type, params: Iterable[torch.Tensor], **kwargs) -> torch.optim.Optimizer:
    """`optimizer_cls(params, **kwargs)` with the fused kernel as default (see fused_default); what
    InBackwardOptimizer does per parameter, for the plain (step after backward) path."""
    params = list(params)
    return optimizer_cls(params, **fused_default(optimizer_cls, params, kwargs))


_EAGER: Dict[type, type] = {}


EAGER_UPDATE_ELEMENTS = 1 << 22  # a larger parameter is updated in slices of about this many elements


def _update_rows(p: torch.Tensor, moments) -> Iterator[Optional[slice]]:
    """Row slices (dim 0) of a parameter to update one at a time: the eager update holds about ten fp32
    temporaries of what it updates (1.2 GB for a 49152 x 576 embedding at once, 170 MB in slices).
    Slices start and end on the quantized moments' block boundaries, so the result is the same. None:
    the whole parameter (small ones, scalars)."""
    if p.dim() == 0 or p.numel() <= EAGER_UPDATE_ELEMENTS:
        yield None
        return
    block = max((getattr(t, "block_size", 1) for t in moments if t is not None), default=1)
    yield from _rows(p, EAGER_UPDATE_ELEMENTS, block)


def _rows(p: torch.Tensor, elements: int, align: int) -> List[slice]:
    """Row slices (dim 0) of p of about `elements` elements each, every one starting on a multiple
    of `align` elements (the last one ends with p)."""
    n, stride = p.shape[0], p.numel() // p.shape[0]
    unit = align // math.gcd(stride, align)  # rows per whole number of aligned units
    step = max(unit, elements // stride // unit * unit)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def row_slices_of(t: torch.Tensor) -> List[slice]:
    """The row slices (dim 0) a tensor of more than SLICE_ELEMENTS elements is worked on in: its
    in-backward step (torch's Adam, AdamW, SGD), its gradient's norm, and, for an output head, the
    cross-entropy's vocabulary slices. From the shape alone, so that every path that meets the same
    tensor slices it alike. One slice (the whole tensor) for small or single-row tensors."""
    if t.dim() < 1 or t.shape[0] < 2 or t.numel() <= SLICE_ELEMENTS:
        return [slice(0, t.shape[0] if t.dim() else 1)]
    return _rows(t, SLICE_ELEMENTS, SLICE_ALIGN)


def _slice_norm(g: torch.Tensor) -> float:
    # in the gradient's own dtype (at least fp32), as clip_grad_norm_ takes it: no float64 copy
    wide = g.dtype in (torch.float32, torch.float64)
    return float(torch.linalg.vector_norm(g, dtype=None if wide else torch.float32))


def combine_norms(norms: List[float]) -> float:
    """The 2-norm of a tensor from the norms of its row slices (one slice: that norm as it is)."""
    return norms[0] if len(norms) == 1 else math.sqrt(sum(n * n for n in norms))


def grad_norm(g: torch.Tensor) -> float:
    """A gradient's 2-norm, taken over `row_slices_of(g)` and combined: the same number whether the
    gradient exists whole or arrives one row slice at a time (a streamed output head's)."""
    g = g.detach()
    if g.dim() == 0:
        return _slice_norm(g)
    return combine_norms([_slice_norm(g[r]) for r in row_slices_of(g)])


FUSED_CPU_STEP = True  # False: torchao's own update on CPU too (what runs on other devices)


def _draw_seed() -> int:
    return int(torch.randint(0, 1 << 62, ()))  # from torch's generator: resumable


def _fused_step(p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any], is_adamw: bool,
                stochastic_round: bool, part: Optional["_Part"] = None) -> bool:
    """torchao's update of one CPU parameter by revengine's fused kernel (`torch.ops.revengine.adam_step_`:
    one pass, no temporaries, the state left in torchao's layout). Returns False, having done nothing,
    where the kernel does not apply (another device, amsgrad, moments or dtypes it does not read).
    part: p is a row slice of a parameter stepped a slice at a time; stochastic rounding then takes the
    whole step's seed and counts elements from the slice's first, as the whole step would."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if not FUSED_CPU_STEP or p.device.type != "cpu" or group["amsgrad"] or p.dtype not in WEIGHT_DTYPES.values() \
            or p.grad.dtype not in WEIGHT_DTYPES.values() or not p.is_contiguous() or not p.grad.is_contiguous():
        return False
    if _is_subclass(m):
        bits = {"OptimState8bit": 8, "OptimState4bit": 4}.get(type(m).__name__)
        if bits is None or type(v) is not type(m):
            return False
        moments = (m.codes, m.scale, m.qmap, v.codes, v.scale, v.qmap, bits, m.block_size)
    elif _is_subclass(v) or m.dtype not in WEIGHT_DTYPES.values() or not (m.is_contiguous() and v.is_contiguous()):
        return False
    else:
        moments = (m, None, None, v, None, None, 0, 0)
    beta1, beta2 = group["betas"]
    lr, step, wd = group["lr"], state["step"], group["weight_decay"]
    # the scalar coefficients as torchao's single_param_adam computes them (float32 tensor arithmetic)
    lr_t = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float32)
    bias_correction1 = float(1 - beta1 ** step)
    bias_correction2_sqrt = float((1 - beta2 ** step).sqrt())
    seed = -1 if not stochastic_round else part.seed() if part is not None else _draw_seed()
    torch.ops.revengine.adam_step_(p.detach(), p.grad, *moments, float(lr_t), float(lr_t * wd), beta1, beta2,
                                   wd, group["eps"], bias_correction1, bias_correction2_sqrt, is_adamw, seed,
                                   part.offset if part is not None else 0)
    return True


def _eager_class(cls: type) -> type:
    """torchao's optimizer class with its per-parameter update run without torch.compile (same state
    layout and state dicts): on CPU by revengine's fused kernel, elsewhere by torchao's own update
    function, eagerly."""
    if cls not in _EAGER:
        from torchao.optim.adam import single_param_adam

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if len(state) == 0:  # as torchao's step initialises it
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                        if group["amsgrad"]:
                            state["max_exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    sr = self.bf16_stochastic_round and p.dtype is torch.bfloat16
                    if _fused_step(p, state, group, self.is_adamw, sr, getattr(self, "part", None)):
                        continue
                    moments = [state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq")]
                    for rows in _update_rows(p, moments):
                        m, v, vmax = (t if t is None or rows is None else t[rows] for t in moments)
                        single_param_adam(p.detach() if rows is None else p.detach()[rows],
                                          p.grad if rows is None else p.grad[rows], state["step"], m, v, vmax,
                                          group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                          group["eps"], self.is_adamw, sr)
            return loss

        _EAGER[cls] = type(cls.__name__, (cls,), {"step": step, "__module__": __name__,
                                                 "__doc__": f"torchao's {cls.__name__}, stepped without compile."})
    return _EAGER[cls]


def set_lr(optimizer, lr: float) -> None:
    """Sets every param group's learning rate (torchao keeps it as a tensor: filled in place)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


# -- tensors that may be subclasses (torchao's quantized optimizer state) -------------------------

def _is_subclass(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) and \
        hasattr(t, "__tensor_flatten__")


def map_inner(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn applied to a plain tensor, or to each inner tensor of a subclass (rebuilt around the results)."""
    if not _is_subclass(t):
        return fn(t)
    names, ctx = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({n: map_inner(getattr(t, n), fn) for n in names}, ctx, t.size(), t.stride())


def inner_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a subclass's inner tensors (torchao's
    quantized state: codes, scales, lookup table), depth first."""
    if _is_subclass(t):
        for n in t.__tensor_flatten__()[0]:
            yield from inner_tensors(getattr(t, n))
    else:
        yield t


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    return map_inner(t, lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"))


def state_rows(v: torch.Tensor, rows: slice) -> List[Optional[slice]]:
    """For a state tensor of a parameter's shape (plain, or torchao's quantized state), what rows
    `rows` of the parameter cover in each of its `inner_tensors`: a flat element range, or None for
    an inner tensor every row shares (a quantization table). As the tensor's own row slicing takes
    them (`v[rows]`), worked out on the meta device: v needs no memory."""
    whole = _on_meta(v)
    part = whole[rows]
    return [slice(t.storage_offset(), t.storage_offset() + t.numel()) if _same_storage(t, w) else None
            for w, t in zip(inner_tensors(whole), inner_tensors(part))]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # (a view made inside a subclass's __torch_dispatch__ has no _base: compare the storages)
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def state_of_rows(v: torch.Tensor, rows: slice, inner: List[torch.Tensor]) -> torch.Tensor:
    """The state tensor of rows `rows` of v (a state tensor of the parameter's shape) made of the
    given inner tensors (flat, in `inner_tensors` order; as `state_rows` names their parts)."""
    part = _on_meta(v)[rows]
    if not _is_subclass(part):
        return inner[0].view(part.shape)
    names, ctx = part.__tensor_flatten__()
    shaped = {n: t.view(getattr(part, n).shape) for n, t in zip(names, inner)}
    return type(part).__tensor_unflatten__(shaped, ctx, part.size(), part.stride())


def state_template(v: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A state tensor of a whole parameter's shape laid out as v, a row slice's state, is: the inner
    tensors that hold rows have no memory (a row source reads and writes their rows elsewhere), the
    shared ones (a quantization table) are v's own."""
    def memoryless(dtype, size):
        t = torch.empty(size, dtype=dtype, device=v.device)
        t.untyped_storage().resize_(0)
        return t
    if not _is_subclass(v):
        return memoryless(v.dtype, shape)
    # torchao's OptimState8bit / OptimState4bit: the whole's layout from its own constructor
    whole = type(v).zeros(shape, signed=v.signed, block_size=v.block_size, device="meta")
    names, ctx = whole.__tensor_flatten__()
    held = state_rows(whole, slice(0, shape[0]))
    inner = {n: memoryless(getattr(whole, n).dtype, getattr(whole, n).shape) if r is not None else getattr(v, n)
             for n, r in zip(names, held)}
    return type(whole).__tensor_unflatten__(inner, ctx, whole.size(), whole.stride())


def _copy_inner(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
    for d, s in zip(inner_tensors(dst), inner_tensors(src)):
        d.copy_(s, non_blocking=non_blocking)


def _lowbit(opt: torch.optim.Optimizer) -> bool:
    """A torchao AdamW class as optimizer_class gives it by default (run eagerly; on CPU the fused kernel)."""
    return type(opt) in _EAGER.values()


def _steps_in_rows(opt: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    """Whether opt's update of p can run a row slice at a time with the whole step's result bit for
    bit: torch's Adam, AdamW and SGD (each element reads only its own state); torchao's AdamW classes
    run eagerly, whose slices start on whole quantization blocks (SLICE_ALIGN), unless they round bf16
    weights stochastically where the fused kernel does not run (torchao's own rounding draws its
    random bits per call, so slices would round differently from the whole)."""
    if type(opt) in SLICED_OPTIMIZERS:
        return True
    if not _lowbit(opt) or opt.param_groups[0]["amsgrad"]:
        return False
    if math.isfinite(opt.block_size) and SLICE_ALIGN % opt.block_size:  # (_AdamW's plain moments: no blocks)
        return False
    return (FUSED_CPU_STEP and p.device.type == "cpu") or not (opt.bf16_stochastic_round and p.dtype is torch.bfloat16)


def _slice_buffer(opt: torch.optim.Optimizer, p: torch.Tensor, view: torch.Tensor, signed: bool) -> torch.Tensor:
    """torchao's zeroed state for a row slice `view` of p, quantized or not as p's whole state is
    (torchao quantizes tensors of at least 4096 elements: a short last slice is quantized all the same)."""
    whole = opt._new_buffer(torch.empty(p.shape, dtype=p.dtype, device="meta"), signed)
    return opt._subclass_zeros(view, signed, opt.block_size) if _is_subclass(whole) else torch.zeros_like(view)


class _Part(NamedTuple):
    """A row slice stepped as part of its parameter's step: the step's stochastic-rounding seed (one
    draw for all its slices, as the whole step makes) and the slice's first element."""
    seed: Callable[[], int]
    offset: int


class _SliceSteps:
    """One parameter's step, a row slice at a time: each slice by an optimizer of the same class and
    hyperparameters over the slice's weight, gradient and state (views of the whole parameter's, or
    rows read from a row source), so that the result is the whole step's bit for bit."""

    def __init__(self, opt: torch.optim.Optimizer, p: torch.Tensor, source):
        self.opt, self.p, self.source = opt, p, source
        self.st = opt.state[p]
        self.scalars = {k: v for k, v in self.st.items() if not self._per_row(v, p.shape)}
        self.started = len(self.st) > 0  # (a source's state keeps only the scalars in the state dict)
        self.hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        self.new: Dict[str, Any] = {}
        self._seed: Optional[int] = None

    def seed(self) -> int:
        if self._seed is None:
            self._seed = _draw_seed()
        return self._seed

    def _optimizer(self, r: slice, view: torch.Tensor) -> torch.optim.Optimizer:
        sliced = type(self.opt)([dict(self.hyper, params=[view])])
        if _lowbit(self.opt):  # torchao keeps these settings on the optimizer, not in its param group
            sliced.block_size, sliced.bf16_stochastic_round = self.opt.block_size, self.opt.bf16_stochastic_round
            sliced.part = _Part(self.seed, r.start * view[0].numel())
            sliced._new_buffer = functools.partial(_slice_buffer, self.opt, self.p)
        return sliced

    @staticmethod
    def _per_row(v, shape) -> bool:  # a state tensor of the parameter's (or the slice's) shape
        return isinstance(v, torch.Tensor) and v.shape == shape

    def step(self, r: slice, view: torch.Tensor, grad: torch.Tensor, weight_out: bool = False) -> None:
        """Steps rows r: `view` is their weight (updated in place), `grad` their gradient.
        weight_out: the source also takes the new weight rows (a streamed weight)."""
        st, source = self.st, self.source
        view.grad = grad
        sliced = self._optimizer(r, view)
        if self.started:
            rows_state = source.read(r) if source is not None else \
                {k: v[r] for k, v in st.items() if k not in self.scalars}
            scalars = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.scalars.items()}
            sliced.state[view] = {**scalars, **rows_state}
        sliced.step()
        new = self.new = sliced.state[view]
        if source is not None:
            if weight_out:
                source.write(r, new, weight=view.detach())
            else:
                source.write(r, new)
        elif not self.started:  # the first step: the whole state, filled slice by slice
            for k, v in new.items():
                if self._per_row(v, view.shape):
                    if k not in st:
                        st[k] = torch.empty(self.p.shape, dtype=v.dtype, device=v.device)
                    st[k][r] = v
        view.grad = None
        self.shape = view.shape

    def finish(self) -> None:
        for k, v in self.new.items():  # the scalars (step counters) advanced as every slice's did
            if not self._per_row(v, self.shape):
                self.st[k] = v


# parameters whose weight a row source holds (InBackwardOptimizer.stream_rows): id -> (parameter, optimizer)
_STREAMED: Dict[int, Tuple[torch.Tensor, "InBackwardOptimizer"]] = {}


def streamed(p: torch.Tensor) -> Optional["RowStream"]:
    """The `RowStream` of a parameter whose weight lives in an offload store (read and stepped a row
    slice at a time by the loss that uses it), or None: an ordinary parameter."""
    entry = _STREAMED.get(id(p))
    if entry is None or entry[0] is not p or not entry[1]._handles:
        return None
    if not entry[1]._row_sources[id(p)].start_streaming():
        return None
    return RowStream(entry[1], p)


class RowStream:
    """A weight read, and its gradient consumed, one row slice (`slices`) at a time, for a loss whose
    gradient of a slice of the weight can be computed on its own (an output head's cross-entropy,
    over vocabulary slices). The slices' gradients go through the optimizer as the whole gradient
    would (clipped, measured or stepped), with the same result bit for bit.

    In backward, for each sweep in `sweeps()` (two with per-tensor clipping: "norm" measures the
    gradient's norm first, "step" then steps), for each slice: `consume(sweep, rows, weight, grad)`;
    then `finish()`."""

    def __init__(self, opt: "InBackwardOptimizer", p: torch.Tensor):
        self.opt, self.p = opt, p
        self.slices = row_slices_of(p)
        self.source = opt._row_sources[id(p)]
        self._norms: List[float] = []
        self._steps: Optional[_SliceSteps] = None

    def read(self, rows: slice) -> torch.Tensor:
        """The weight's rows (a tensor of their own)."""
        return self.source.read_weight(rows)

    def grad_buffer(self, rows: slice, device) -> torch.Tensor:
        """A zeroed gradient for the weight's rows, to accumulate a slice's gradient in."""
        return torch.zeros((rows.stop - rows.start, *self.p.shape[1:]), dtype=self.p.dtype, device=device)

    def sweeps(self) -> Tuple[str, ...]:
        return ("norm", "step") if self.opt._pass == "step" and self.opt._clips_per_tensor else ("step",)

    def steps(self, sweep: str) -> bool:
        """Whether `sweep` steps the weight (its consume needs the weight's rows): not a norm sweep, nor
        any sweep of global clipping's norm pass or of a pass that steps nothing."""
        return sweep == "step" and self.opt._pass == "step"

    def consume(self, sweep: str, rows: slice, weight: torch.Tensor, grad: torch.Tensor) -> None:
        opt = self.opt
        if sweep == "norm" or opt._pass == "norm":
            self._norms.append(_slice_norm(grad))
            return
        if opt._pass == "off":
            return
        if self._steps is None:  # the first slice of the step sweep
            self._scale = opt._clip_scale(combine_norms(self._norms) if opt._clips_per_tensor else None)
            for before, _ in opt._grad_hooks:
                before(self.p)
            self._steps = _SliceSteps(opt.optimizers[opt._index[id(self.p)]], self.p, self.source)
        if self._scale != 1.0:
            grad.mul_(self._scale)
        self._steps.step(rows, weight, grad, weight_out=True)

    def finish(self, failed: bool = False) -> None:
        """After the last sweep (failed: the loss's backward raised before it ended; nothing more is
        stepped, and the after-hooks hear that nothing was)."""
        opt, stepped = self.opt, self._steps is not None and not failed
        try:
            if not failed and opt._pass == "norm":
                n = combine_norms(self._norms)
                opt._sq_norm += n * n
            elif stepped:
                self._steps.finish()
                opt.steps_taken += 1
        finally:
            self._norms, self._steps = [], None
            for _, after in opt._grad_hooks:
                after(self.p, stepped)


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
        state_device: where the optimizer state lives between steps (None: beside each parameter).
            "cpu" keeps it in host memory (pinned when CUDA is available); each parameter's state
            is copied to the parameter's device for its step and back.
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
                 state_device=None, **optimizer_kwargs):
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
        self.optimizers = [create(optimizer_cls, [p], **optimizer_kwargs) for p in self.params]
        self.state_device = torch.device(state_device) if state_device is not None else None
        self._pin = self.state_device is not None and self.state_device.type == "cpu" and torch.cuda.is_available()
        self._home: List[Dict[str, torch.Tensor]] = [{} for _ in self.params]  # state_device copies
        self._pass = "step"  # "step" | "norm" (pass 1 of the global clipping) | "off"
        self._sq_norm = 0.0
        self._scale = 1.0
        self.steps_taken = 0  # parameter updates in the last backward
        self._handles = []
        self._grad_hooks: List[Tuple[Callable, Callable]] = []
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._row_sources: Dict[int, Any] = {}
        self.attach()
        for p in self.params:
            if p.grad is not None:
                raise ValueError("InBackwardOptimizer: parameters already hold gradients; set them to None first "
                                 "(gradient accumulation is not supported)")

    # -- the hook ------------------------------------------------------------------------------

    def register_grad_hooks(self, before_step: Callable[[torch.Tensor], None],
                            after_grad: Callable[[torch.Tensor, bool], None]):
        """Calls before_step(p) right before parameter p is stepped, and after_grad(p, stepped) once
        its gradient has been consumed in any pass (stepped: whether p was updated). The offload
        store loads a layer's weights and state with the first and writes them back with the second.
        Returns a handle whose remove() unregisters them."""
        pair = (before_step, after_grad)
        self._grad_hooks.append(pair)
        hooks = self._grad_hooks

        class Handle:
            def remove(self) -> None:
                if pair in hooks:
                    hooks.remove(pair)
        return Handle()

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            stepped = False
            try:
                stepped = self._consume(i, p)
            finally:
                for _, after in self._grad_hooks:
                    after(p, stepped)
        return hook

    def _consume(self, i: int, p: torch.Tensor) -> bool:
        """Parameter i's gradient, in the current pass: stepped (True), or only measured or dropped."""
        if self._pass == "off":
            return False
        g = p.grad
        if self._pass == "norm":
            n = grad_norm(g)
            self._sq_norm += n * n
            p.grad = None
            return False
        scale = self._clip_scale(grad_norm(g) if self._clips_per_tensor else None)
        if scale != 1.0:
            g.mul_(scale)
        for before, _ in self._grad_hooks:
            before(p)
        if self.state_device is None:
            self._step(i, p)
        else:
            self._fetch(i, p)
            self.optimizers[i].step()
            self._write_back(i, p)
        p.grad = None
        self.steps_taken += 1
        return True

    @property
    def _clips_per_tensor(self) -> bool:
        return self.max_grad_norm is not None and self.clip == "per_tensor"

    def _clip_scale(self, norm: Optional[float]) -> float:
        """What a gradient is multiplied by before its step: per-tensor clipping's factor for a
        gradient of this norm, or global clipping's (1.0: none)."""
        if self.max_grad_norm is None:
            return 1.0
        if self.clip == "per_tensor":
            return self.max_grad_norm / (norm + 1e-6) if norm > self.max_grad_norm else 1.0
        return self._scale

    # -- steps in row slices -----------------------------------------------------------------------

    def row_slices(self, p: torch.Tensor) -> Optional[List[slice]]:
        """The row slices (dim 0) parameter p can be stepped in, or None (stepped whole): a dense
        parameter of more than SLICE_ELEMENTS elements and several rows, without state_device, whose
        optimizer steps rows alike (torch's Adam, AdamW and SGD; torchao's AdamW classes, see
        _steps_in_rows). In memory only torch's are stepped so (their update's temporaries are
        bounded by a slice; the fused kernel makes none); a row source's parameter is, by either."""
        i = self._index.get(id(p))
        if i is None or self.state_device is not None or not _steps_in_rows(self.optimizers[i], p) \
                or p.dim() < 1 or p.shape[0] < 2 or p.numel() <= SLICE_ELEMENTS or p.is_sparse:
            return None
        return row_slices_of(p)

    def set_row_source(self, p: torch.Tensor, source) -> None:
        """Parameter p's state rows come from `source` when it is stepped in slices: source.read(rows)
        returns {state key: tensor of those rows} (None: no state yet, the first step creates it),
        source.write(rows, state) takes the slice's state after its step (tensors of those rows and
        the scalars, such as the step counter). The state dict then keeps only the scalars; the
        per-row tensors are the source's. None: the state lives in the state dict again."""
        if source is None:
            self._row_sources.pop(id(p), None)
        else:
            self._row_sources[id(p)] = source

    def _step(self, i: int, p: torch.Tensor) -> None:
        opt, source = self.optimizers[i], self._row_sources.get(id(p))
        rows = self.row_slices(p)
        if rows is None or p.grad is None or p.grad.is_sparse or (source is None and type(opt) not in SLICED_OPTIMIZERS):
            opt.step()
            return
        steps = _SliceSteps(opt, p, source)
        flat, grad = p.detach(), p.grad
        for r in rows:
            steps.step(r, flat[r], grad[r])
        steps.finish()

    def stream_rows(self, p: torch.Tensor, source) -> None:
        """Parameter p's weight lives in `source` too, not only its state (the offload store's
        output head): `streamed(p)` then hands a loss a `RowStream`, through which it reads the
        weight a row slice at a time and gives back each slice's gradient, which is stepped at
        once. source is a row source (`set_row_source`) with read_weight(rows) -> the weight's rows,
        write(rows, state, weight=rows' new weight) and start_streaming() -> whether the weight is
        to be read in rows now (False: it is whole in memory, and so will its gradient be). None: p
        is an ordinary parameter again."""
        if source is None:
            self._row_sources.pop(id(p), None)
            _STREAMED.pop(id(p), None)
            return
        if self.row_slices(p) is None:
            raise ValueError(f"InBackwardOptimizer.stream_rows: a parameter of {tuple(p.shape)} is not stepped in row "
                             "slices (torch's Adam, AdamW or SGD, or torchao's AdamW, above SLICE_ELEMENTS elements)")
        self._row_sources[id(p)] = source
        _STREAMED[id(p)] = (p, self)

    # -- state kept on state_device ----------------------------------------------------------------

    def _moved(self, i: int, p: torch.Tensor):
        """The (key, tensor) pairs of parameter i's state that live apart from the parameter (the step
        counter stays where the optimizer keeps it)."""
        st = self.optimizers[i].state.get(p, {})
        return st, [k for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step" and v.dim() > 0]

    def _fetch(self, i: int, p: torch.Tensor) -> None:
        """Parameter i's state -> the parameter's device (non-blocking from pinned memory)."""
        st, keys = self._moved(i, p)
        for k in keys:
            if st[k].device != p.device:
                st[k] = map_inner(st[k], lambda t: t.to(p.device, non_blocking=True))

    def _write_back(self, i: int, p: torch.Tensor) -> None:
        """Parameter i's state -> state_device, into the copies kept there (allocated, pinned, once)."""
        st, keys = self._moved(i, p)
        home = self._home[i]
        for k in keys:
            v = st[k]
            if v.device == self.state_device:
                home[k] = v
                continue
            if k not in home:
                home[k] = map_inner(v, lambda t: torch.empty(t.shape, dtype=t.dtype, device=self.state_device,
                                                              pin_memory=self._pin))
            _copy_inner(home[k], v, non_blocking=True)
            st[k] = home[k]

    def offload_state(self) -> None:
        """Moves every parameter's state to state_device (after load_state_dict, which puts it beside
        the parameters); a no-op without state_device."""
        if self.state_device is None:
            return
        for i, p in enumerate(self.params):
            self._write_back(i, p)
        if self._pin:
            torch.cuda.synchronize()

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
    def measuring_norm(self) -> bool:
        """True during step_two_pass's first pass, whose gradients are only measured (nothing is stepped)."""
        return self._pass == "norm"

    @property
    def state(self) -> Dict[torch.Tensor, Dict[str, Any]]:
        """Every parameter's optimizer state (as torch.optim.Optimizer.state; memory.breakdown reads it)."""
        return {p: st for opt in self.optimizers for p, st in opt.state.items()}

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            set_lr(opt, lr)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        if self._pin:
            torch.cuda.synchronize()  # write-backs in flight
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers], "n": len(self.optimizers)}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("n") != len(self.optimizers):
            raise ValueError(f"InBackwardOptimizer.load_state_dict: state for {sd.get('n')} parameters, "
                             f"this optimizer has {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, sd["per_parameter"]):
            opt.load_state_dict(s)
        self.offload_state()

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


# -- optimizer state as safetensors + JSON (no pickle) ------------------------------------------

STATE_META_KEY = "revengine.optimizer_state"
# the tensor subclasses a state file may rebuild (their classes are looked up by name only here)
SUBCLASS_MODULES = ("torchao.optim.",)


def _encode(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """obj as JSON, its tensors moved to `tensors` under path-like keys (subclasses as their inner tensors)."""
    if isinstance(obj, torch.Tensor):
        if _is_subclass(obj):
            cls = type(obj)
            name = f"{cls.__module__}.{cls.__qualname__}"
            if not name.startswith(SUBCLASS_MODULES):
                raise TypeError(f"revengine.optim: cannot save a state tensor of type {name}")
            names, ctx = obj.__tensor_flatten__()
            return {"__subclass__": name, "ctx": _encode(list(ctx), prefix + ".ctx", tensors),
                    "size": list(obj.size()), "stride": list(obj.stride()),
                    "inner": {n: _encode(getattr(obj, n), f"{prefix}.{n}", tensors) for n in names}}
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{prefix}.k{i}", tensors), _encode(v, f"{prefix}.{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"revengine.optim: cannot save a value of type {type(obj).__name__} at {prefix}")


def _subclass(name: str) -> type:
    if not name.startswith(SUBCLASS_MODULES):
        raise ValueError(f"revengine.optim: a state file names tensor type {name!r}, which is not allowed")
    mod, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise ImportError(f"revengine.optim: the state file holds {cls} tensors, which need torchao: "
                          f"{TORCHAO_HINT} ({e})") from None


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__subclass__" in obj:
        inner = {n: _decode(v, tensors) for n, v in obj["inner"].items()}
        return _subclass(obj["__subclass__"]).__tensor_unflatten__(inner, _decode(obj["ctx"], tensors),
                                                                  torch.Size(obj["size"]), tuple(obj["stride"]))
    if "__dtype__" in obj:
        dt = getattr(torch, obj["__dtype__"], None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"revengine.optim: unknown dtype {obj['__dtype__']!r} in a state file")
        return dt
    if "__size__" in obj:
        return torch.Size(obj["__size__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def state_dict_to_tensors(sd: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], str]:
    """(flat {key: plain CPU tensor}, JSON of everything else) for an optimizer state dict; torchao's
    quantized state tensors become their inner tensors (codes, scales, lookup table)."""
    tensors: Dict[str, torch.Tensor] = {}
    meta = _encode(sd, "s", tensors)
    return tensors, json.dumps(meta, allow_nan=True)


def state_dict_from_tensors(tensors: Dict[str, torch.Tensor], meta: str) -> Dict[str, Any]:
    """The inverse of state_dict_to_tensors (subclass tensors rebuilt; only torchao.optim's are allowed)."""
    return _decode(json.loads(meta), tensors)


def save_state_dict(sd: Dict[str, Any], path: str) -> None:
    """Writes an optimizer state dict (torch's, InBackwardOptimizer's, torchao's) as one safetensors file."""
    from safetensors.torch import save_file

    tensors, meta = state_dict_to_tensors(sd)
    save_file(tensors, path, metadata={STATE_META_KEY: meta})


def load_state_dict_file(path: str) -> Dict[str, Any]:
    """Reads what save_state_dict wrote (CPU tensors; Optimizer.load_state_dict moves them)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = (fh.metadata() or {}).get(STATE_META_KEY)
        if meta is None:
            raise ValueError(f"revengine.optim: {path} is not an optimizer state file (no {STATE_META_KEY} metadata)")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return state_dict_from_tensors(tensors, meta)
