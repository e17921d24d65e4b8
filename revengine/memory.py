"""Memory tools: the peak-memory figure of one training step, and how it is measured.

    import revengine as rev

    def step():                      # one forward + backward (+ optimizer step)
        loss = model(x).square().mean()
        loss.backward()

    step()                                       # warm-up: lazy allocations, optimizer state
    fig = rev.memory.measure_step(step)          # MemoryFigure(peak_delta_mb=..., seconds=..., ...)

On CPU the figure is only meaningful in a fresh process started with
`MALLOC_MMAP_THRESHOLD_=65536` (glibc then serves every block of 64 KiB or more with mmap and gives
it back to the kernel on free, so the resident set follows the live tensors). Run each
configuration with `measure_in_subprocess("pkg.module:function", kwargs)`: the function builds its
model, warms up, calls `measure_step` and returns a dict, which comes back to the caller.

How the CPU figure is read. The plain recipe is "ru_maxrss just before and just after the step".
Two facts about Linux make the raw `getrusage(RUSAGE_SELF).ru_maxrss` difference wrong here:
  * it is a lifetime high-water mark, so after a warm-up step (whose peak equals the measured
    step's peak) the difference is ~0;
  * it also folds in the maxrss inherited at exec time, and Python's `subprocess` uses vfork, so a
    child starts with its *parent's* peak RSS as its ru_maxrss.
So `measure_step` resets the process's own high-water mark just before the step (Linux >= 4.0:
write "5" to /proc/self/clear_refs) and reports VmHWM - VmRSS from /proc/self/status (the very
counter ru_maxrss is built from, without the inherited part). Where that is not available it falls
back to the ru_maxrss difference and marks the figure unreliable.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from revengine.optim import inner_tensors

__all__ = [
    "MMAP_THRESHOLD",
    "MemoryFigure",
    "breakdown",
    "measure_in_subprocess",
    "measure_step",
]

#: The glibc setting under which CPU peak-memory figures are repeatable.
MMAP_THRESHOLD = "65536"

#: torch runs bfloat16 matmuls on CPU through oneDNN, which caches a primitive per matmul shape (and
#: ideep its own objects), 1024 of each by default, with memory held per entry. An MoE's expert
#: matmuls take a new shape per expert, layer and step, so the caches grow through the first steps
#: (SmolLM2-upcycled, 8 layers, 2048 tokens, 8-bit AdamW with bf16 weights: one step's peak 1090 MiB
#: with the defaults, 534 MiB with 64 entries each, and the step faster than fp32 AdamW's).
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}

_MB = float(2**20)
_RESULT_PREFIX = "@@revengine-memory-result@@ "


@dataclass
class MemoryFigure:
    """The peak-memory figure of one call of a step function.

    Attributes:
        peak_delta_mb: peak memory during the call minus the memory in use just before it, in MiB
            (CPU: resident set size; CUDA: bytes allocated by torch's caching allocator).
        seconds: wall-clock time of the call (CUDA: synchronized before and after).
        device: "cpu" or the CUDA device the figure is for.
        reliable: False when the figure cannot be trusted: on CPU, the process was not started with
            MALLOC_MMAP_THRESHOLD_=65536, or the high-water mark could not be reset.
        method: how memory was read ("vmhwm-reset", "ru_maxrss", "cuda-max-allocated").
        note: why the figure is unreliable, empty otherwise.
        result: what step_fn returned (not serialized by `as_dict`).
    """

    peak_delta_mb: float
    seconds: float
    device: str
    reliable: bool
    method: str = ""
    note: str = ""
    result: Any = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> Dict[str, Any]:
        """The figure as a JSON-serializable dict (without `result`)."""
        d = dataclasses.asdict(self)
        d.pop("result", None)
        return d


# -- CPU memory readings -----------------------------------------------------------------------


def bound_onednn_caches() -> None:
    """Sets ONEDNN_CACHE_ENV's capacities where the user has not set them (run when revengine is
    imported: oneDNN reads them when it creates its first primitive, so a process that ran bfloat16
    matmuls before importing revengine keeps the defaults)."""
    for name, value in ONEDNN_CACHE_ENV.items():
        os.environ.setdefault(name, value)


def proc_status_kb(*fields: str) -> Optional[Dict[str, int]]:
    """{field: kB} from /proc/self/status (e.g. "VmRSS", "VmHWM"), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            text = fh.read()
    except OSError:
        return None
    out = {}
    for name in fields:
        m = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if m is None:
            return None
        out[name] = int(m.group(1))
    return out


def reset_peak_rss() -> bool:
    """Resets this process's resident-set high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Collects garbage and hands freed heap back to the OS (glibc), so that a peak RSS reset next
    starts from live memory only; a no-op where libc has no malloc_trim."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _maxrss_kb() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb // 1024 if sys.platform == "darwin" else kb  # bytes on macOS, KiB on Linux


def synchronize(device) -> None:
    """Waits for the work queued on `device` (a CUDA device); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(steps: Dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 2,
                     device="cpu") -> Dict[str, List[float]]:
    """Seconds of each step per round, the steps run in rotation (a, b, c; b, c, a; ...) after
    `warmup` calls each, so that none always runs first; `device`'s queued work is waited for
    before and after each call. The benchmarks' and the demo's timings (take the median)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    names = list(steps)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            t0 = time.perf_counter()
            steps[n]()
            synchronize(device)
            times[n].append(time.perf_counter() - t0)
    return times


def check_device(value: str) -> str:
    """`value` if it names a usable device: "cpu", or "cuda[:i]" with that GPU present; else a
    ValueError that says what is missing (the --device of the benchmarks and of finetune)."""
    try:
        dev = torch.device(value)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"expected 'cpu' or 'cuda[:i]', got {value!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{value!r} needs a CUDA device, and this torch sees none "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{value!r}: there are {torch.cuda.device_count()} CUDA devices")
    return value


def device_arg(value: str) -> str:
    """argparse `type=` for --device (check_device): a usage error (exit 2), not a traceback mid-run."""
    import argparse

    try:
        return check_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _normalize_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"revengine.memory.measure_step: device must be 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


def measure_step(step_fn: Callable[[], Any], *, warmup: int = 0, device="cpu") -> MemoryFigure:
    """Measures the peak-memory delta and the wall time of one call of `step_fn()` in this process.

    Args:
        step_fn: a function of no arguments running one step (e.g. forward + backward + optimizer
            step). Whatever it returns is kept in `MemoryFigure.result`; tensors it returns are
            alive at the end of the call but do not change the peak.
        warmup: calls of `step_fn` before the measured one (lazy allocations, optimizer state).
        device: "cpu" or "cuda[:i]": where the memory to measure lives.

    Returns a `MemoryFigure`. CPU: the rise of the resident set size above its value just before
    the call (see the module docstring for how it is read). A warning is issued, and
    `reliable=False` recorded, when the process lacks MALLOC_MMAP_THRESHOLD_=65536: glibc then
    keeps freed memory and the figure depends on what ran before. CUDA:
    `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory
    allocated just before the call.
    """
    dev = _normalize_device(device)
    for _ in range(int(warmup)):
        step_fn()
    gc.collect()

    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        result = step_fn()
        synchronize(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev)
        return MemoryFigure(
            peak_delta_mb=(peak - before) / _MB, seconds=seconds, device=str(dev), reliable=True,
            method="cuda-max-allocated", result=result,
        )

    notes = []
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        notes.append(
            f"MALLOC_MMAP_THRESHOLD_ is {os.environ.get('MALLOC_MMAP_THRESHOLD_')!r}, not {MMAP_THRESHOLD!r}: "
            "glibc keeps freed memory, so the figure depends on what ran before; "
            "use revengine.memory.measure_in_subprocess"
        )
    status = proc_status_kb("VmHWM", "VmRSS")
    if status is not None and reset_peak_rss():
        method = "vmhwm-reset"
        before_kb = proc_status_kb("VmRSS")["VmRSS"]
        t0 = time.perf_counter()
        result = step_fn()
        seconds = time.perf_counter() - t0
        after_kb = proc_status_kb("VmHWM")["VmHWM"]
    else:
        method = "ru_maxrss"
        notes.append(
            "could not reset the RSS high-water mark (/proc/self/clear_refs); the ru_maxrss difference "
            "misses any part of the step's peak below an earlier peak of this process"
        )
        before_kb = _maxrss_kb()
        t0 = time.perf_counter()
        result = step_fn()
        seconds = time.perf_counter() - t0
        after_kb = _maxrss_kb()
    note = "; ".join(notes)
    if note:
        warnings.warn(f"revengine.memory.measure_step: unreliable CPU figure: {note}", RuntimeWarning, stacklevel=2)
    return MemoryFigure(
        peak_delta_mb=max(after_kb - before_kb, 0) / 1024.0, seconds=seconds, device="cpu",
        reliable=not note, method=method, note=note, result=result,
    )


# -- fresh subprocesses ------------------------------------------------------------------------

_CHILD = r"""
import dataclasses, importlib, importlib.util, json, os, sys
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]  # `python -c` puts the cwd first; PYTHONPATH (set by the parent) decides instead
target, kwargs = sys.argv[1], json.loads(sys.argv[2])
mod_name, _, fn_name = target.rpartition(":")
if mod_name.endswith(".py"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(mod_name)))  # as running the file as a script would
    spec = importlib.util.spec_from_file_location("__revengine_measure_target__", mod_name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
else:
    mod = importlib.import_module(mod_name)
out = getattr(mod, fn_name)(**kwargs)
if not isinstance(out, dict):
    raise TypeError(f"{target} must return a dict, got {type(out).__name__}")
def _default(o):
    if hasattr(o, "as_dict"):
        return o.as_dict()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):  # tensors, numpy arrays and scalars
        return o.tolist()
    return str(o)
sys.stdout.flush()
print(PREFIX + json.dumps(out, default=_default), flush=True)
"""


def _tail(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def measure_in_subprocess(
    target: str, kwargs: Optional[Dict[str, Any]] = None, *, env: Optional[Dict[str, str]] = None,
    timeout: float = 600,
) -> Dict[str, Any]:
    """Calls `target(**kwargs)` in a fresh Python process set up for memory measurement.

    Args:
        target: "package.module:function" (importable in the child) or "path/to/file.py:function"
            (the file's folder comes first on the child's sys.path, as when it runs as a script).
            The function builds its model, runs its own warm-up, calls `measure_step` and returns a
            JSON-serializable dict (a `MemoryFigure` in it is converted with `as_dict()`).
        kwargs: keyword arguments for the function; must be JSON-serializable.
        env: extra environment variables for the child (on top of this process's environment and
            MALLOC_MMAP_THRESHOLD_=65536; OMP/MKL thread settings are inherited unchanged); a value of
            None removes the variable (MALLOC_MMAP_THRESHOLD_=None: glibc's default allocator, for
            timings that should not pay for returning every freed buffer to the kernel).
        timeout: seconds before the child is killed.

    Returns the function's dict. Raises RuntimeError, with the tail of the child's stderr, when the
    child fails, times out or returns no result.
    """
    if ":" not in target:
        raise ValueError(f"revengine.memory.measure_in_subprocess: target must be 'module:function', got {target!r}")
    kwargs = {} if kwargs is None else kwargs
    try:
        kwargs_json = json.dumps(kwargs)
    except TypeError as exc:
        raise TypeError(f"revengine.memory.measure_in_subprocess: kwargs must be JSON-serializable ({exc})") from exc

    child_env = dict(os.environ)
    child_env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    # The child must import what this process imports: this package's root and the current directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, os.getcwd()] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    child_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    for k, v in (env or {}).items():
        if v is None:
            child_env.pop(str(k), None)
        else:
            child_env[str(k)] = str(v)

    code = _CHILD.replace("PREFIX", repr(_RESULT_PREFIX))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, target, kwargs_json],
            env=child_env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise RuntimeError(
            f"revengine.memory.measure_in_subprocess: {target} timed out after {timeout} s; stderr tail:\n{_tail(err)}"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"revengine.memory.measure_in_subprocess: {target}({kwargs_json}) failed in the child "
            f"(exit code {proc.returncode}); stderr tail:\n{_tail(proc.stderr)}"
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(
        f"revengine.memory.measure_in_subprocess: {target} printed no result; stdout tail:\n"
        f"{_tail(proc.stdout)}\nstderr tail:\n{_tail(proc.stderr)}"
    )


# -- static breakdown --------------------------------------------------------------------------


def _unique_tensors(tensors: Iterable[torch.Tensor]):
    seen = set()
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        yield t


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in _unique_tensors(tensors))


def _state_tensors(state) -> Iterable[torch.Tensor]:
    """The plain tensors of an optimizer state (a quantized subclass, torchao's, counts as its inner tensors)."""
    if isinstance(state, torch.Tensor):
        yield from inner_tensors(state)
    elif isinstance(state, dict):
        for v in state.values():
            yield from _state_tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _state_tensors(v)


def breakdown(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Bytes held by a model's weights, their grads and the optimizer state (computed, not measured).

    Tensors shared between modules (tied weights) are counted once. Returns a dict with
    `*_bytes` (int) and `*_mb` (MiB, float) for: weights (parameters), grads (`.grad` tensors
    currently allocated), buffers, optimizer_state (every tensor in `optimizer.state`, 0 without
    an optimizer), and total, plus `params` (number of parameter elements).
    """
    params = list(model.parameters())
    sizes = {
        "weights": _nbytes(params),
        "grads": _nbytes(p.grad for p in params),
        "buffers": _nbytes(model.buffers()),
        "optimizer_state": _nbytes(_state_tensors(list(optimizer.state.values()))) if optimizer is not None else 0,
    }
    sizes["total"] = sum(sizes.values())
    out: Dict[str, Any] = {"params": sum(p.numel() for p in _unique_tensors(params))}
    for k, v in sizes.items():
        out[f"{k}_bytes"] = v
        out[f"{k}_mb"] = v / _MB
    return out


def training_step_figures(model: torch.nn.Module, optimizer, loss_fn: Callable[[], torch.Tensor],
                          *, full_step: bool = True, head_fn: Optional[Callable[[], torch.Tensor]] = None,
                          device="cpu") -> Dict[str, Any]:
    """The steady-state memory of one training step, broken down.

    Runs one warm-up step (forward + backward + `optimizer.step()`: the optimizer state exists
    afterwards), then measures (a) forward + backward with the grads already allocated (zeroed,
    not freed): its peak delta is what the step adds on top of weights, grads and optimizer state
    (activations, logits, temporaries), and (b) unless `full_step=False`, the step as a training
    loop runs it (grads set to None first, so backward allocates them). `loss_fn()` returns the
    loss of one forward.

    `optimizer` may be a torch.optim.Optimizer or a revengine.optim.InBackwardOptimizer (which
    steps inside backward: then there is no separate step and no grads survive).

    head_fn: optional; runs the loss head alone (LM head + cross-entropy on a stand-in hidden
    state, with a detached copy of the head's weight) and returns its loss; its forward + backward peak is reported as logits_mb, and
    activations_body_mb = activations_mb - logits_mb is what the layers add at the peak.

    Returns `breakdown(model, optimizer)` plus activations_mb, step_delta_mb, steady_peak_mb
    (weights + optimizer state + the full step's delta; with full_step=False, + grads + (a)),
    and the two MemoryFigures (`figure_activations`, `figure_step`). Meaningful on CPU only in a
    fresh process (see `measure_in_subprocess`).
    """
    fused = not isinstance(optimizer, torch.optim.Optimizer)

    def fwd_bwd():
        loss = loss_fn()
        loss.backward()
        return float(loss)

    def step():
        loss = fwd_bwd()
        if not fused:
            optimizer.step()
        return loss

    step()
    if head_fn is not None:
        head = measure_step(lambda: head_fn().backward(), device=device)
    if not fused:
        optimizer.zero_grad(set_to_none=False)
    # Fused: each grad lives only until its parameter is stepped, so this delta is the whole step's.
    act = measure_step(fwd_bwd, device=device)
    out = breakdown(model, optimizer)
    out["activations_mb"] = act.peak_delta_mb
    out["figure_activations"] = act
    if head_fn is not None:
        out["logits_mb"] = head.peak_delta_mb
        out["activations_body_mb"] = max(act.peak_delta_mb - head.peak_delta_mb, 0.0)
    if full_step and not fused:
        optimizer.zero_grad(set_to_none=True)
        full = measure_step(step, device=device)
        out["step_delta_mb"] = full.peak_delta_mb
        out["figure_step"] = full
        out["steady_peak_mb"] = out["weights_mb"] + out["optimizer_state_mb"] + full.peak_delta_mb
    else:
        out["step_delta_mb"] = act.peak_delta_mb if fused else None
        out["steady_peak_mb"] = out["weights_mb"] + out["optimizer_state_mb"] + out["grads_mb"] + act.peak_delta_mb
    return out
