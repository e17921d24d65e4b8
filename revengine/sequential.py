"""revengine.Sequential: a stack of reversible layers run by the C++ executor."""
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _ext
from ._runtime import flatten_context, recompute_call
from .couplings import Coupling
from .errors import RecomputeError
from .recompute import recomputing, replayed_rng, rng_state
from . import side

Tensor = torch.Tensor

MODES = ("reversible", "checkpoint", "plain")
SPLITS = ("halves", "duplicate")
MERGES = ("cat", "mean", "last", None)


def _check_coupling(i: int, layer, exact: bool = False) -> None:
    """The checks a layer passes to join a stack at index i (constructor, append, insert, ...)."""
    if not isinstance(layer, Coupling):
        raise TypeError(
            f"revengine.Sequential: layer {i} ({type(layer).__name__}) is not a reversible coupling; "
            "wrap it, e.g. revengine.AdditiveCoupling(f, g), or subclass revengine.Coupling"
        )
    if exact and not layer._executor_layer().supports_exact:
        raise ValueError(
            f"revengine.Sequential: exact=True needs layers that only add and subtract increments, "
            f"but layer {i} ({type(layer).__name__}) does not support it"
        )


class LayerList(nn.ModuleList):
    """The nn.ModuleList behind Sequential.layers, which checks every layer added to it.

    A plain ModuleList would accept any module, and the executor would only fail on it at the
    next forward, with an error about its internals. Keys stay "0", "1", ... (state_dict keys
    ``layers.0. ...`` as with a ModuleList).
    """

    def __init__(self, modules: Optional[Iterable[nn.Module]] = None, exact: bool = False):
        super().__init__()
        self.exact = bool(exact)  # the owning stack's exact: its layers must support it
        if modules is not None:
            self.extend(modules)

    def append(self, module: nn.Module) -> "LayerList":
        _check_coupling(len(self), module, self.exact)
        return super().append(module)

    def extend(self, modules: Iterable[nn.Module]) -> "LayerList":
        modules = list(modules)  # check all before adding any
        for k, module in enumerate(modules):
            _check_coupling(len(self) + k, module, self.exact)
        return super().extend(modules)

    def insert(self, index: int, module: nn.Module) -> None:
        _check_coupling(index, module, self.exact)
        super().insert(index, module)

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        _check_coupling(int(self._get_abs_string_index(idx)), module, self.exact)  # names layer 3, not -1
        super().__setitem__(idx, module)


class Sequential(nn.Module):
    r"""A stack of reversible couplings whose backward recomputes activations instead of storing them.

    The input is split into two streams (x1, x2); each layer maps the pair to a new pair with an
    exact inverse; the two output streams are merged into the result. In ``mode="reversible"``
    the C++ executor runs the stack: each layer is one autograd node, and backward walks the
    layers in reverse, reconstructing each layer's input from its output with the layer's
    inverse and re-running the layer with grad. Gradients equal those of ``mode="plain"``.

    The stack iterates, indexes and slices like :class:`torch.nn.Sequential`: ``for layer in
    stack``, ``stack[0]``, ``stack[-1]``, ``len(stack)``; ``stack[2:]`` is a new Sequential over
    the same coupling modules with the same settings. :meth:`append` and :meth:`extend` (and
    ``stack.layers.append`` / ``insert`` / item assignment) check layers as the constructor does.

    .. note:: How the three modes differ

        * **memory**: ``"plain"`` keeps every layer's activations for backward, ``"checkpoint"``
          each layer's input (two streams per layer), ``"reversible"`` only the stack's output
          streams and a small record per layer (RNG states, replay records): its memory does not
          grow with depth. (One forward + backward on CPU, 4 vs 16 layers of width 512, batch
          1024, float32: plain 81 vs 297 MB, checkpoint 33 vs 57 MB, reversible 27 vs 27 MB.)
        * **double backward** (``create_graph=True``, e.g. gradient penalties): not supported in
          ``"reversible"``, which raises :class:`RecomputeError`; ``"checkpoint"`` and ``"plain"``
          support it.
        * **in-place edits of outputs before backward**: in ``"reversible"`` backward
          reconstructs from the output streams, so changing one in place (``merge=None`` or
          ``"last"`` return them; ``"cat"`` and ``"mean"`` return a new tensor) raises
          :class:`RecomputeError` in backward; clone the output first. With ``exact=True`` the
          outputs are copies of the fixed-point buffers and editing them does not affect
          backward. ``"checkpoint"`` and ``"plain"`` follow the usual autograd rules.
        * **retain_graph**: supported in every mode: ``loss.backward(retain_graph=True)`` and a
          second backward accumulate the same grads as plain autograd. Without it, a second
          backward raises (:class:`RecomputeError` from the executor, or autograd's own error
          when the graph around the stack saved tensors).
        * **torch.compile**: ``torch.compile(model)`` runs the executor eagerly, one graph break
          per reversible stack; :meth:`compile_blocks` compiles the couplings' stream functions,
          which the executor then runs compiled in forward and in backward's re-run.
          ``"checkpoint"`` also breaks the graph at the stack; ``"plain"`` is traced whole.
        * **FSDP2**: ``fully_shard`` each coupling (``for layer in stack: fully_shard(layer)``),
          then the model. In ``"reversible"`` the executor runs each sharded coupling inside a
          call of its module, so during backward only the layer being re-run (and one
          prefetched) is unsharded; sharding a coupling's stream functions (f, g) on their own
          raises a ValueError.

    Args:
        *layers: :class:`Coupling` modules (AdditiveCoupling, AffineCoupling, integrators, or your
            own), or one list of them.
        split: how one input tensor becomes two streams: ``"halves"`` (last dim split in two;
            needs an even width) or ``"duplicate"`` (both streams start as the input, as in MEFT).
            Passing a tuple (x1, x2) to forward skips the split.
        merge: how the two output streams become one: ``"cat"``, ``"mean"``, ``"last"``, or
            ``None`` (return the tuple).
        mode: ``"reversible"`` (the C++ executor: activations are recomputed from the outputs),
            ``"checkpoint"`` (torch.utils.checkpoint per layer) or ``"plain"`` (autograd stores
            everything; the reference).
        exact: keep the streams in fixed point (int64, ``exact_bits`` fractional bits) and round
            every increment before adding it, so reconstruction is bit-exact at any depth. Every
            layer must support it (additive updates only).
        exact_bits: fractional bits of the fixed-point streams, 0 to 52.
        check_finite: raise, naming the layer, when a reconstruction holds NaN or Inf.
        preserve_rng_state: replay the RNG state in the recompute (dropout gets the same masks).
        debug: keep every layer's true input and compare it with the reconstruction in backward;
            a layer whose inverse does not invert raises, and ``last_report.reconstruction_errors``
            holds the per-layer error.
        debug_tol: the tolerance of that comparison (relative to the input's largest magnitude);
            ``None`` picks one from the dtype.

    Raises:
        TypeError: a layer is not a :class:`Coupling` (the message names its index).
        ValueError: a bad ``mode``, ``split``, ``merge`` or ``exact_bits``, or ``exact=True``
            with a layer that does not support it.

    Example::

        >>> import torch, revengine as rev
        >>> def mlp():
        ...     return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        >>> stack = rev.Sequential(*[rev.AdditiveCoupling(mlp(), mlp()) for _ in range(6)])
        >>> x = torch.randn(2, 8, requires_grad=True)
        >>> y = stack(x)  # (2, 8): the halves of x are the two streams
        >>> y.sum().backward()  # reconstructs each layer's input instead of storing it
        >>> with torch.no_grad():
        ...     print(torch.allclose(stack.inverse(y), x, atol=1e-5))
        True
        >>> len(stack), type(stack[2:]).__name__
        (6, 'Sequential')
    """

    def __init__(
        self,
        *layers: Union[Coupling, Sequence[Coupling]],
        split: str = "halves",
        merge: Optional[str] = "cat",
        mode: str = "reversible",
        exact: bool = False,
        exact_bits: int = 16,
        check_finite: bool = True,
        preserve_rng_state: bool = True,
        debug: bool = False,
        debug_tol: Optional[float] = None,
    ):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple, nn.ModuleList)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            _check_coupling(i, layer)
        if mode not in MODES:
            raise ValueError(f"revengine.Sequential: mode must be one of {MODES}, got {mode!r}")
        if split not in SPLITS:
            raise ValueError(f"revengine.Sequential: split must be one of {SPLITS}, got {split!r}")
        if merge not in MERGES:
            raise ValueError(f"revengine.Sequential: merge must be one of {MERGES}, got {merge!r}")
        if exact and not 0 <= int(exact_bits) <= 52:
            raise ValueError(f"revengine.Sequential: exact_bits must be in [0, 52], got {exact_bits}")
        self.layers = LayerList(layers, exact=bool(exact))
        self.split, self.merge, self.mode = split, merge, mode
        self.exact, self.exact_bits = bool(exact), int(exact_bits)
        self.check_finite, self.preserve_rng_state = bool(check_finite), bool(preserve_rng_state)
        self.debug, self.debug_tol = bool(debug), debug_tol
        self.last_report = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, split={self.split!r}, merge={self.merge!r}, exact={self.exact}"

    def __getstate__(self):
        # last_report (a C++ StackReport of the last debug run) cannot be pickled or deep-copied;
        # a copy starts without one, as a fresh Sequential does.
        return {**super().__getstate__(), "last_report": None}

    # -- the layers as a sequence (as torch.nn.Sequential) -------------------------------------

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Coupling]:
        return iter(self.layers)

    def __getitem__(self, idx: Union[int, slice]) -> Union[Coupling, "Sequential"]:
        """stack[i] is the i-th coupling; stack[a:b] a new Sequential over the same coupling
        modules (parameters shared, not copied) with this stack's settings."""
        if isinstance(idx, slice):
            return Sequential(
                list(self.layers)[idx], split=self.split, merge=self.merge, mode=self.mode,
                exact=self.exact, exact_bits=self.exact_bits, check_finite=self.check_finite,
                preserve_rng_state=self.preserve_rng_state, debug=self.debug, debug_tol=self.debug_tol,
            )
        return self.layers[idx]

    def append(self, layer: Coupling) -> "Sequential":
        """Adds a coupling at the end, checked as the constructor checks it. Returns self."""
        self.layers.append(layer)
        return self

    def extend(self, layers: Iterable[Coupling]) -> "Sequential":
        """Adds couplings at the end (all checked before any is added). Returns self."""
        self.layers.extend(layers)
        return self

    def compile_blocks(self, fullgraph: bool = True, **compile_kwargs) -> "Sequential":
        """Compiles every layer's sub-modules (F and G of a coupling) in place: each one's forward
        becomes torch.compile(forward, fullgraph=..., **compile_kwargs); the executor then runs
        compiled code in forward and in the re-run of backward. Parameter names and state_dict keys
        do not change. Blocks with data-dependent Python (MoE routing replay) need fullgraph=False.
        Returns self."""
        for layer in self.layers:
            for child in layer.children():
                if "forward" not in vars(child):  # not compiled yet
                    child.forward = torch.compile(child.forward, fullgraph=fullgraph, **compile_kwargs)
        return self

    # -- split / merge ------------------------------------------------------------------------

    def _split(self, x) -> Tuple[Tensor, Tensor]:
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"revengine.Sequential: pass one tensor or two streams, got {len(x)} tensors")
            x1, x2 = x
            if not (isinstance(x1, Tensor) and isinstance(x2, Tensor)):
                raise TypeError("revengine.Sequential: streams must be tensors")
            if x1.shape != x2.shape or x1.dtype != x2.dtype or x1.device != x2.device:
                raise ValueError(
                    "revengine.Sequential: the two streams must match in shape, dtype and device, got "
                    f"{tuple(x1.shape)} {x1.dtype} {x1.device} and {tuple(x2.shape)} {x2.dtype} {x2.device}"
                )
            return x1, x2
        if not isinstance(x, Tensor):
            raise TypeError(f"revengine.Sequential: expected a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"revengine.Sequential: the input must be floating point, got {x.dtype}")
        if self.split == "duplicate":
            return x, x
        if x.dim() == 0 or x.shape[-1] % 2:
            width = x.shape[-1] if x.dim() else "a scalar"
            raise ValueError(
                f"revengine.Sequential: split='halves' needs an even last dimension, got {width} "
                f"(input shape {tuple(x.shape)}); use an even width or split='duplicate'"
            )
        return x.chunk(2, dim=-1)

    def _merge(self, y1: Tensor, y2: Tensor):
        if self.merge == "cat":
            return torch.cat([y1, y2], dim=-1)
        if self.merge == "mean":
            return (y1 + y2) / 2
        if self.merge == "last":
            return y2
        return y1, y2

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x, **ctx):
        r"""Runs the layers over the two streams of ``x``.

        Args:
            x: a floating-point tensor (split as ``split`` says), or a tuple (x1, x2) of two
                streams of the same shape, dtype and device.
            **ctx: keyword arguments passed to every layer (and on to its stream functions):
                attention masks, (cos, sin) tables, flags. Tensors in them get grads.

        Returns:
            The output streams merged as ``merge`` says: one tensor, or the tuple (y1, y2) with
            ``merge=None``.

        Raises:
            TypeError, ValueError: a bad input (not floating point, odd width with
                ``split="halves"``, streams that do not match).
            ReconstructionError: in backward (``mode="reversible"``), a reconstructed layer input
                holds NaN or Inf, or, with ``debug=True``, differs from the true input.
            RecomputeError: in backward, an output stream was modified in place, the graph was
                already freed, or a double backward was asked for.

        Example::

            >>> import torch, revengine as rev
            >>> f, g = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            >>> stack = rev.Sequential(rev.AdditiveCoupling(f, g), merge=None)
            >>> y1, y2 = stack(torch.randn(3, 8))
            >>> y1.shape
            torch.Size([3, 4])
        """
        x1, x2 = self._split(x)
        if self.mode == "reversible":
            y1, y2 = self._forward_reversible(x1, x2, ctx)
        else:
            y1, y2 = self._forward_stored(x1, x2, ctx)
        return self._merge(y1, y2)

    # torch.compile(model) compiles everything around the executor and runs the executor eagerly:
    # one deliberate graph break per reversible stack (the executor drives autograd itself). The
    # layers' own blocks can be compiled inside it: see compile_blocks().
    @torch.compiler.disable
    def _forward_reversible(self, x1, x2, ctx):
        tensors, builder = flatten_context(ctx)
        layers, hooked = self._executor_layers()
        if hooked and torch.is_grad_enabled():
            # The hooked layers' parameters are not inputs of the executor's nodes: a leaf that
            # requires grad makes sure the nodes exist (and backward runs) even when nothing else does.
            tensors = tensors + [torch.empty(0, device=x1.device, requires_grad=True)]
        y1, y2, report, _tags, aux = _ext._C.reversible_forward(
            layers, x1, x2, tensors, builder,
            exact=self.exact, frac_bits=self.exact_bits, check_finite=self.check_finite,
            preserve_rng=self.preserve_rng_state, debug=self.debug,
            debug_tol=-1.0 if self.debug_tol is None else float(self.debug_tol),
        )
        self.last_report = report if self.debug else None
        side.collect(aux)
        return y1, y2

    def _executor_layers(self):
        """The C++ layers, and whether any is managed by FSDP2.

        A coupling wrapped by `fully_shard` runs inside a call of its module (HookedLayer), so
        FSDP's hooks unshard its parameters before the executor uses them, reduce-scatter the
        grads and reshard after its backward. f and g must not be sharded on their own: the
        fused backward evaluates them inside the layer's step.
        """
        fsdp_module = _fsdp_module_class()
        layers, hooked = [], False
        for i, layer in enumerate(self.layers):
            wrapped = fsdp_module is not None and isinstance(layer, fsdp_module)  # FSDP's hooks: run by HookedLayer
            inner = self._with_module_hooks(i, layer) if _has_forward_hooks(layer) and not wrapped else layer._executor_layer()
            if fsdp_module is not None:
                inside = [name for name, m in layer.named_modules() if name and isinstance(m, fsdp_module)]
                if inside:
                    raise ValueError(
                        f"revengine.Sequential: layer {i} ({type(layer).__name__}) has submodules wrapped by "
                        f"fully_shard ({', '.join(inside[:3])}); in mode='reversible' shard each coupling as a "
                        "whole (fully_shard(layer)), not its stream functions"
                    )
                if wrapped:
                    inner = _ext._C.HookedLayer(inner, layer)
                    hooked = True
            layers.append(inner)
        return layers, hooked

    def _with_module_hooks(self, i, layer):
        """A coupling with forward hooks of its own runs through a call of its module (its forward,
        then its inverse and forward again in backward, as a coupling written in Python does), so
        its hooks fire: the fused C++ layer would call f and g directly and skip them."""
        if self.exact or getattr(layer, "inverse_needs_its_forward", False):
            raise ValueError(
                f"revengine.Sequential: layer {i} ({type(layer).__name__}) has forward hooks, which "
                f"mode='reversible' cannot run {'with exact=True' if self.exact else 'on this layer'}; "
                "register them on its stream functions (f, g), or use mode='checkpoint'"
            )
        return Coupling._executor_layer(layer)

    def _forward_stored(self, x1, x2, ctx):
        if self.exact:
            # The same rounding as the fixed-point executor, with straight-through grads.
            from .couplings import quantize_ste

            x1, x2 = quantize_ste(x1, self.exact_bits), quantize_ste(x2, self.exact_bits)
        for i, layer in enumerate(self.layers):
            run = _layer_runner(layer, self.exact, self.exact_bits)
            if self.mode == "checkpoint" and torch.is_grad_enabled():
                x1, x2 = checkpoint(
                    _CheckpointCall(run, layer, i, self.preserve_rng_state), x1, x2, ctx,
                    use_reentrant=False, preserve_rng_state=False,
                )
            else:
                x1, x2 = run(x1, x2, ctx)
        return x1, x2

    # -- inverse ------------------------------------------------------------------------------

    @torch.no_grad()
    def inverse(self, y, **ctx):
        r"""The input that produces output ``y``, computed layer by layer in reverse, without grad.

        Args:
            y: an output of this stack: a tensor with ``merge="cat"``, or the tuple (y1, y2) of
                output streams (the other merges lose information).
            **ctx: the keyword arguments the forward was given.

        Returns:
            The input: a tensor (the two streams concatenated, or one stream with
            ``split="duplicate"``), or the tuple (x1, x2) when ``y`` is a tuple.

        Raises:
            ValueError: ``y`` cannot be split into two streams (odd width, or a lossy ``merge``).
            ReconstructionError: with ``check_finite=True``, a reconstructed input holds NaN or Inf.
            RuntimeError: a layer cannot be inverted on its own (BDIA draws its signs in forward).

        Example::

            >>> import torch, revengine as rev
            >>> stack = rev.Sequential(rev.AdditiveCoupling(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)))
            >>> x = torch.randn(3, 8)
            >>> with torch.no_grad():
            ...     print(torch.allclose(stack.inverse(stack(x)), x, atol=1e-6))
            True
        """
        if isinstance(y, (tuple, list)):
            y1, y2 = y
        elif self.merge == "cat":
            if y.shape[-1] % 2:
                raise ValueError(f"revengine.Sequential.inverse: expected an even last dimension, got shape {tuple(y.shape)}")
            y1, y2 = y.chunk(2, dim=-1)
        else:
            raise ValueError(
                f"revengine.Sequential.inverse: merge={self.merge!r} loses information; pass the two "
                "output streams as a tuple (build the stack with merge=None to get them)"
            )
        tensors, builder = flatten_context(ctx)
        layers, _ = self._executor_layers()
        x1, x2 = _ext._C.reversible_inverse(
            layers, y1, y2, tensors, builder,
            exact=self.exact, frac_bits=self.exact_bits, check_finite=self.check_finite,
        )
        if isinstance(y, (tuple, list)):
            return x1, x2
        if self.split == "duplicate":
            return x1
        return torch.cat([x1, x2], dim=-1)


def _fsdp_module_class():
    """FSDP2's FSDPModule when a process group is up (FSDP needs one), else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule


def _has_forward_hooks(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def _layer_runner(layer: Coupling, exact: bool, bits: int):
    if exact:
        return lambda a, b, ctx: layer.forward_exact(a, b, bits, **ctx)
    return lambda a, b, ctx: layer(a, b, **ctx)


class _CheckpointCall:
    """The function torch.utils.checkpoint re-runs: its second call is the recompute, which must not
    update module buffers again and reports is_recomputing().

    It replays the RNG itself (torch's checkpoint is given preserve_rng_state=False): the snapshot
    and the layer's draws happen inside the executor's RNG section, as in reversible mode, so
    other threads' stacks cannot draw in between. It also refuses a recompute whose parameters
    were changed in place since the forward (it would run on the new values)."""

    def __init__(self, run, layer, index, preserve_rng):
        self.run = run
        self.layer = layer
        self.index = index
        self.preserve_rng = preserve_rng
        self.calls = 0
        self.rng = None
        self.versions = None

    def __call__(self, a, b, ctx):
        self.calls += 1
        if self.calls == 1:
            self.versions = [p._version for p in self.layer.parameters()]
            if not self.preserve_rng:
                return self.run(a, b, ctx)
            with _ext._C.RngSection():
                self.rng = rng_state(a.device)
                return self.run(a, b, ctx)
        self._check_versions()
        with recomputing():
            if not self.preserve_rng:
                return recompute_call(self.run, (a, b, ctx), {}, module=self.layer)
            with _ext._C.RngSection(), replayed_rng(self.rng, a.device):
                return recompute_call(self.run, (a, b, ctx), {}, module=self.layer)

    def _check_versions(self):
        for j, (p, v) in enumerate(zip(self.layer.parameters(), self.versions)):
            if p._version != v:
                raise RecomputeError(
                    f"revengine: parameter {j} of layer {self.index} ({type(self.layer).__name__}, shape "
                    f"{list(p.shape)}) was modified in place between the forward and the backward (version "
                    f"{v} -> {p._version}); the recompute needs the values the forward used: step the "
                    "optimizer after backward, or run the forward again"
                )
