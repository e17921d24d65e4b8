"""Layer weights and optimizer state kept off the compute device between uses, one layer at a time.

A reversible stack runs its layers one by one in forward and again, in reverse, in backward, and
`InBackwardOptimizer` steps a layer's parameters as soon as its gradients exist. So between those
moments a layer's weights and optimizer state need not be in memory at all. `LayerStore` keeps
them in a tier and brings a layer in just before it runs:

    opt = rev.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5)
    store = rev.offload.LayerStore(model, opt, tier="disk", directory="run/store")
    for batch in data:
        model(**batch).loss.backward()          # each layer: read, run, re-run, step, written back
    store.close()                               # everything back in memory, hooks removed

Tiers:
  - "disk": one safetensors file per layer in `directory`, read with ordinary reads into the
    layer's own tensors (so file pages are the kernel's cache, not this process's memory), written
    after the layer's step to a temporary file and renamed. Each layer has two slots: a step writes
    the slot the last completed step did not, and `store.json` (replaced atomically once every
    layer of a step is written) names the slots of the last completed step, and those of the step
    before (intact until the next step writes over them; each file records its step). A process
    killed in the middle of a step leaves that step's files intact: `LayerStore.open` resumes
    from them (or from the step before, for a trainer whose own checkpoint is one step behind).
  - "host": pinned host memory, for parameters on a GPU. The copies run on a stream of their own:
    the next layer's weights come in while this one computes (the compute stream waits for their
    event at first use only), and a stepped layer goes out while the next one computes. The store's
    tensors are allocated on the copy stream, and a load first waits (on the CPU) for the compute
    to finish with the layer released last, so that the allocator reuses its memory instead of
    taking more: the device holds two layers' weights and one layer's state, as on disk.
  - "none": nothing moves (the same hooks, for tests and benchmarks).

What moves: every parameter of every layer of the model's reversible stacks
(`revengine.Sequential` in reversible mode), the model's input embedding and output head when they
are trained and not tied (`get_input_embeddings()`, an nn.Embedding, in memory for its forward and
its step, the last of the backward; `get_output_embeddings()`, an nn.Linear, from the end of the
last stack's forward, when the loss reads it, to its step, the first of the backward; on disk their
state, when the optimizer steps them in row slices, comes a slice at a time inside the step and is
never whole in memory: `_StateRows`; their weights then too: a loss or lookup that asks
`optim.streamed(weight)`, as the models' chunked cross-entropy and embedding lookup do, reads it a
row slice at a time and steps each slice's gradient in backward, so it never comes in whole in
training; one that calls the module itself gets it whole, for its forward and its step), and the
tensors of their optimizer state (the plain tensors inside torchao's quantized state too); tensors
under 4096 elements stay (norm weights, quantization tables, step counters), and so do the other
parameters outside the stacks (the final norm, a tied embedding). A layer is released after its
forward (in training not the last one: backward re-runs it first) and after the last of its
parameters has been stepped (not after the backward's re-run: its vector-Jacobian product still
needs it). The next layer's weights are read ahead (in backward with this layer's optimizer state).
A reader and a writer thread do the I/O; a read waits for its layer's last write-back and for the
write-back in flight, so at most two layers' weights and one layer's state are in memory (the one
stepped and the one below; at the top the last layer's and the head's, or a slice of it; at the
bottom the embedding's alone, or a slice of it, read for its step once layer 0's write-back has freed
its memory). A write-back frees its
memory once the file is in the page cache; a third thread flushes it to the disk, and store.json
names a step only once all its files are flushed.

A model that never exists whole: `LayerStore.build` (or `revengine.convert.stream_from_hf`, from
an HF checkpoint) writes a store one layer at a time, `LayerStore.open` trains it, and
`save_weights` writes the model's weights as one safetensors file, one layer at a time.

Exactness: the tensors come back bit for bit, so a run with any tier is bit-identical to one
without (tests/test_offload.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_for
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import side
from .optim import InBackwardOptimizer, inner_tensors, map_inner, state_of_rows, state_rows, state_template

TIERS = ("none", "host", "disk")
MIN_ELEMENTS = 4096  # smaller tensors stay in memory (norm weights, quantization tables, step counters)
STORE_FILE = "store.json"
FORMAT = 2  # 2: the input embedding and the output head have files of their own ("ends")


class OffloadError(ValueError):
    """A store that cannot be used: the message names the file or the setting."""


@dataclass
class _Layer:
    name: str
    module: torch.nn.Module
    params: List[torch.nn.Parameter]
    parts: List[torch.nn.Module] = field(default_factory=list)  # the stream functions that hold them
    role: str = "layer"          # a stack's layer, or an end of the model: "input" embedding, "output" head
    loaded: bool = True          # its weights are in memory
    state_loaded: bool = True    # its optimizer state is (read only for the step: forward needs none)
    ran: int = 0                 # parts run in the current forward (a streamed end: 1 once streamed in training)
    dirty: bool = False          # stepped since it was last written
    pending: int = 0             # parameters whose gradient this backward has not consumed yet
    slot: int = 0                # the slot of its last written version (disk)
    written_at: int = 0          # the step whose weights and state that version holds
    home: Dict[str, torch.Tensor] = field(default_factory=dict)  # host tier: pinned copies
    copied: Dict[str, "torch.cuda.Event"] = field(default_factory=dict)  # host: the copies in of "param" / "state"
    ready: Dict[str, Future] = field(default_factory=dict)  # disk: the reads of "param" / "state" in flight
    released: Optional[Future] = None  # disk: its last write-back / release (a read of it waits for it)
    sliced: bool = False         # disk, an end: its state is stepped in row slices, never whole (_StateRows)
    streamed: bool = False       # disk, an end: its weight too, read and stepped by its user a slice at a time
    partial: Optional["_StateRows"] = None  # the file of its next version, its state rows written so far

    @property
    def streaming(self) -> bool:
        """A streamed end that this training forward read a slice at a time (so its user steps it)."""
        return self.streamed and bool(self.ran)

    def __post_init__(self):
        mine = {id(p) for p in self.params}
        # the parameters' names inside the module (a tied weight: its last name)
        self.names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False) if id(p) in mine}


def _owns_storage(t: torch.Tensor) -> bool:
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() in (0, t.numel() * t.element_size()))


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's memory as a writable byte buffer (CPU, contiguous). Through its address, not
    .numpy(): a storage exported to numpy can no longer be resized, so never released again."""
    n = t.numel() * t.element_size()
    if n and (t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() < n):
        raise OffloadError(f"offload: a {t.device.type} tensor of {tuple(t.shape)} without its memory cannot be "
                           "read or written (a released or meta tensor)")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise = None
if sys.platform.startswith("linux"):  # MADV_HUGEPAGE's number is Linux's
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _madvise = None


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Asks Linux for transparent huge pages under a freshly allocated CPU buffer before it is read
    into: the read then faults in 2 MiB at a time instead of 4 KiB (a layer's read costs a quarter
    of the CPU time, which on a small machine is taken from the compute). Advice only: ignored
    where huge pages are off."""
    if _madvise is None or t.device.type != "cpu":
        return
    start, n = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = -(-start // _HUGE_PAGE) * _HUGE_PAGE, (start + n) // _HUGE_PAGE * _HUGE_PAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)


def _materialize(parts: List[torch.nn.Module]) -> None:
    """CPU parameters for the meta ones in these modules (new Parameter objects: a meta tensor cannot
    take CPU data); only modules that hold meta parameters themselves."""
    for part in parts:
        for m in part.modules():
            if any(p.is_meta for p in m.parameters(recurse=False)):
                m.to_empty(device="cpu", recurse=False)


def _write_payload(fh, buffers) -> None:
    for b in buffers:
        fh.write(b)


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` at `offset` of an open file (pwrite may write less than it was given)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_file(path: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, str], sync: bool = True,
                in_place: bool = False) -> None:
    """A safetensors file written beside `path`, synced (unless sync=False: see `_sync_file`) and
    renamed over it (the old file survives a failure). Written here rather than by
    safetensors.torch.save_file, which first copies every tensor into a bytes object: this writes from
    the tensors' own memory, without holding the GIL, so the I/O thread's writes overlap the compute
    (safetensors reads the files: tests).

    in_place=True, for a file no completed step names (a layer's other slot): when `path` already has
    exactly the new file's size, it is overwritten where it is. Its pages are then usually in the page
    cache already, and overwriting them costs the CPU about a quarter of what a new file does (the
    kernel allocates and zeroes no pages, and frees none of the old file's): on 2 cores that CPU is
    taken from the compute. The header (the step the file holds) goes first, so a killed process
    leaves a file that names the step it was becoming; after a power loss the pages may reach the
    disk in any order, which matters only to `open(step=...)` of the step this slot held before."""
    head, _ = _layout({k: (t.dtype, t.shape) for k, t in tensors.items()}, meta)
    payload = [_bytes_view(t) for t in tensors.values()]

    def write(fh):
        fh.write(head)
        _write_payload(fh, payload)
    if in_place:
        try:
            with open(path, "r+b") as fh:
                if os.fstat(fh.fileno()).st_size == len(head) + sum(b.nbytes for b in payload):
                    write(fh)
                    fh.flush()
                    if sync:
                        os.fsync(fh.fileno())
                    return
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _cannot_write(path, "the layer's file", e) from None
    _replace(path, "wb", write, "the layer's file", sync=sync)


def _layout(specs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], meta: Dict[str, str]) -> Tuple[bytes, Dict[str, int]]:
    """A safetensors file's header for tensors of these dtypes and shapes, in this order, and where
    each tensor's data starts in the file."""
    header: Dict[str, object] = {"__metadata__": meta}
    offset, starts = 0, {}
    for k, (dtype, shape) in specs.items():
        n = math.prod(shape) * dtype.itemsize
        header[k] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        starts[k] = offset
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: base + v for k, v in starts.items()}


def _replace(path: str, mode: str, write: Callable, what: str, sync: bool = True) -> None:
    """write(fh) into a temporary file beside `path`, synced (sync=True), then renamed over it: `path`
    is the old file or the whole new one, whatever happens to the process."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _cannot_write(path, what, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sync_file(path: str, what: str = "the layer's file") -> None:
    """Flushes a file written with sync=False to the disk. A layer's write-back leaves its file in the
    page cache (safe against a killed process already) and frees the layer's memory at once; this runs
    on a thread of its own, so that the window does not wait for the disk, and the step's store.json
    is written only once every file it names is synced (safe against a power loss too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _cannot_write(path, what, e) from None


def _cannot_write(path: str, what: str, e: OSError) -> OffloadError:
    """The one-line error of a failed write or flush (the files of the last completed step are never
    the ones written)."""
    return OffloadError(f"{path}: cannot write {what} ({os.strerror(e.errno) if e.errno else e}); the last "
                        "completed step's files are unchanged")


def _cannot_read(path: str, e: OSError) -> OffloadError:
    """The one-line error of a layer file that cannot be opened or read."""
    return OffloadError(f"{path}: cannot read the layer's file ({os.strerror(e.errno) if e.errno else e})")


def _read_header(path: str, fh) -> Tuple[dict, int]:
    head = fh.read(8)
    if len(head) != 8:
        raise OffloadError(f"{path}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", head)
    raw = fh.read(n)
    if len(raw) != n:
        raise OffloadError(f"{path}: truncated (header of {n} bytes cut short)")
    try:
        return json.loads(raw), 8 + n
    except ValueError:
        raise OffloadError(f"{path}: not a safetensors file (unreadable header)") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}


def _read_into(path: str, targets: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Reads each named tensor of a safetensors file into the given tensor's memory; returns the metadata."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with fh:
        header, base = _read_header(path, fh)
        size = os.fstat(fh.fileno()).st_size
        for name, t in targets.items():
            h = header.get(name)
            if h is None:
                raise OffloadError(f"{path}: has no tensor {name!r} (a store written by another model or optimizer?)")
            if _DTYPES.get(h["dtype"]) != t.dtype or list(h["shape"]) != list(t.shape):
                raise OffloadError(f"{path}: {name} is {h['dtype']} {h['shape']}, the model's is {t.dtype} "
                                   f"{list(t.shape)} (a store written by another model or optimizer?)")
            b, e = h["data_offsets"]
            if base + e > size:
                raise OffloadError(f"{path}: truncated ({size} bytes, {name} ends at {base + e})")
            fh.seek(base + b)
            if fh.readinto(_bytes_view(t)) != e - b:
                raise OffloadError(f"{path}: truncated while reading {name}")
    return header.get("__metadata__", {})


class _StateRows:
    """The optimizer state of a stored end (the embedding or the head, one weight), row slices at a
    time, for `InBackwardOptimizer.set_row_source` (torch's moments by rows; torchao's quantized ones by
    their codes' and scales' parts, their lookup table whole): each slice's rows are read from the file of the
    end's last written version and, once stepped, written into the file of its next version, so
    the state is never whole in memory. The weight and the scalars (the step counter) complete that
    file at the end's release (`finish`), which renames it into place."""

    def __init__(self, store: "LayerStore", layer: _Layer):
        self.store, self.layer = store, layer
        self.param = layer.params[0]
        self.prefix = f"state.{layer.names[id(self.param)]}."
        self.weight_key = f"param.{layer.names[id(self.param)]}"
        self.fd: Optional[int] = None
        self.pending: Optional[Future] = None  # the slice write in flight

    def _row_bytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.param.shape[1:]) * dtype.itemsize  # (the weight may have no memory: no indexing)

    def _per_row(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == self.param.dim() and t.shape[1:] == self.param.shape[1:]

    def _read_parts(self, parts: Dict[str, slice]) -> Dict[str, torch.Tensor]:
        """Flat element ranges of tensors of the end's last version, by name."""
        layer = self.layer
        path = self.store._path(layer, layer.slot)
        if layer.released is not None:
            layer.released.result()  # its last version is complete
        out = {}
        try:
            with open(path, "rb") as fh:
                header, base = _read_header(path, fh)
                for name, part in parts.items():
                    h = header.get(name)
                    if h is None or name == "__metadata__":
                        raise OffloadError(f"{path}: has no tensor {name!r} (a store written by another model or "
                                           "optimizer?)")
                    t = torch.empty(part.stop - part.start, dtype=_DTYPES[h["dtype"]])
                    start, end = h["data_offsets"]
                    offset = start + part.start * t.element_size()
                    if offset + t.numel() * t.element_size() > end:
                        raise OffloadError(f"{path}: {name} holds {math.prod(h['shape'])} elements, not "
                                           f"{part.stop} (a store written by another model or optimizer?)")
                    fh.seek(base + offset)
                    if fh.readinto(_bytes_view(t)) != t.numel() * t.element_size():
                        raise OffloadError(f"{path}: truncated while reading {name}")
                    out[name] = t
        except OSError as e:
            raise _cannot_read(path, e) from None
        self.store.bytes_read += sum(t.numel() * t.element_size() for t in out.values())
        return out

    def _templates(self) -> Dict[str, torch.Tensor]:
        """The state entries of the weight's shape (in the state dict without memory: their rows are in the file)."""
        st = self.store.optimizer.state.get(self.param, {})
        return {k: v for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == self.param.shape}

    def _parts(self, key: str, template: torch.Tensor, rows: slice) -> List[Tuple[str, Optional[slice]]]:
        """(file entry, element range of rows `rows`, None: shared by all rows) of each inner tensor of a state entry."""
        return [(f"{self.prefix}{key}.{j}", part) for j, part in enumerate(state_rows(template, rows))]

    def read(self, rows: slice) -> Dict[str, torch.Tensor]:
        templates = self._templates()
        layout = {key: self._parts(key, t, rows) for key, t in templates.items()}
        got = self._read_parts({name: part for parts in layout.values() for name, part in parts if part is not None})
        return {key: state_of_rows(t, rows, [got[name] if part is not None else inner
                                             for (name, part), inner in zip(layout[key], inner_tensors(t))])
                for key, t in templates.items()}

    def start_streaming(self) -> bool:
        """Whether a loss or lookup is to read the weight a slice at a time now: not while it is whole in
        memory (the module ran on its own in a training forward: its gradient then arrives whole).
        Remembers a training forward's yes: the module may not then run whole as well."""
        if self.layer.loaded:
            return False
        if torch.is_grad_enabled():
            self.layer.ran = 1
        return True

    def read_weight(self, rows: slice) -> torch.Tensor:
        """The weight's rows (a streamed end: `InBackwardOptimizer.stream_rows`)."""
        stride = math.prod(self.param.shape[1:])
        flat = self._read_parts({self.weight_key: slice(rows.start * stride, rows.stop * stride)})[self.weight_key]
        return flat.view(rows.stop - rows.start, *self.param.shape[1:])

    def write(self, rows: slice, state: Dict[str, object], weight: Optional[torch.Tensor] = None) -> None:
        """A stepped slice's state rows (and, for a streamed weight, its new weight rows) into the
        next version's file: written on the store's writer thread while the next slice computes, one
        slice in flight (a failed write is raised by the next slice's write, or at the end's release)."""
        if rows.start == 0 and self.fd is not None:
            self._settle(raising=False)
            self._abandon()  # the file of a step that failed before the end's release
        if self.fd is None:
            self._open(state, streamed=weight is not None)
        self._settle()
        templates, chunks = self._templates(), []
        for key, v in state.items():
            if self._per_row(v):
                for (name, part), t in zip(self._parts(key, templates[key], rows), inner_tensors(v)):
                    if part is not None:  # (a shared table: written whole by `finish`)
                        chunks.append((self.starts[name] + part.start * t.element_size(), t.contiguous()))
        if weight is not None:
            chunks.append((self.starts[self.weight_key] + rows.start * self._row_bytes(weight.dtype), weight.contiguous()))
        fd = self.fd

        def job():
            for offset, t in chunks:
                _write_at(fd, _bytes_view(t), offset)
        self.pending = self.store._writer.submit(job)  # (its failure is _settle's to raise, not _drain's)

    def _settle(self, raising: bool = True) -> None:
        """Waits for the slice write in flight; its failure becomes the one-line error (the file is abandoned)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.result()
        except OSError as e:
            self._abandon()
            if raising:
                raise _cannot_write(self.path, "the layer's file", e) from None

    def _open(self, state: Dict[str, object], streamed: bool = False) -> None:
        """The next version's file, laid out as the store writes an end (the weight, then the state
        entries by key; per-row ones at the weight's shape). The state dict gets a tensor without
        memory for each per-row entry (what the store's file names and `close` reads back into)."""
        store, layer, p = self.store, self.layer, self.param
        st = store.optimizer.state[p]
        for key, t in state.items():
            if self._per_row(t) and not (isinstance(st.get(key), torch.Tensor) and st[key].shape == p.shape):
                st[key] = state_template(t, p.shape)
        specs = {f"param.{layer.names[id(p)]}": (p.dtype, p.shape)}
        for key, t in sorted(state.items()):
            if isinstance(t, torch.Tensor):
                for j, inner in enumerate(inner_tensors(st[key] if self._per_row(t) else t)):
                    specs[f"{self.prefix}{key}.{j}"] = (inner.dtype, inner.shape)
        self.slot = layer.slot if layer.name in store._written else 1 - layer.slot
        self.path = store._path(layer, self.slot)
        self.step = store.step + 1
        head, self.starts = _layout(specs, {"step": str(self.step), "layer": layer.name})
        self.rows = store._row_entries(layer)  # what the slices write; `finish` the rest
        if streamed:  # the weight's rows come with the state's; `finish` writes the scalars only
            self.rows.add(self.weight_key)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _write_at(self.fd, memoryview(head), 0)
        except OSError as e:
            self._abandon()
            raise _cannot_write(self.path, "the layer's file", e) from None
        layer.partial = self

    def finish(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Writes the weight and the scalars, and renames the file into place (not synced: the
        store's flush thread does that, as for a layer's file). On the writer thread, after the
        last slice's write."""
        self._settle()
        try:
            for k, t in tensors.items():
                if k not in self.rows:
                    _write_at(self.fd, _bytes_view(t), self.starts[k])
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._abandon()
            raise _cannot_write(self.path, "the layer's file", e) from None

    def _abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        self.layer.partial = None


def _write_json(path: str, doc: dict) -> None:
    """store.json, replaced atomically (synced first)."""
    _replace(path, "w", lambda fh: json.dump(doc, fh, indent=1), "the store")


def _fingerprint(layers: List[_Layer], ends: List[_Layer], rest: _Layer, optimizer: Optional[str]) -> Dict[str, object]:
    """What store.json records of the model and optimizer it was written for."""
    return {"format": FORMAT, "layers": [layer.name for layer in layers], "ends": [end.name for end in ends],
            "rest": sorted(rest.names.values()), "optimizer": optimizer}


class LayerStore:
    """Keeps the layers of a model's reversible stacks, and their optimizer state, in a tier between
    uses (see the module's docstring).

    Args:
        model: a module containing `revengine.Sequential` stacks in reversible mode.
        optimizer: the `InBackwardOptimizer` that steps the model (the store needs the in-backward
            step: no gradient of a released layer may wait for a later optimizer.step()).
        tier: "disk", "host" or "none".
        directory: the folder of the disk tier (created if missing; must be empty of another store).

    Raises:
        OffloadError: an unknown tier, a missing or unwritable directory, no reversible stack, a
            stack not in reversible mode, a layer with frozen parameters, "host" on a CPU model or
            "disk" on another device.
    """

    def __init__(self, model: torch.nn.Module, optimizer: InBackwardOptimizer, tier: str = "disk",
                 directory: Optional[str] = None, *, _resume: bool = False, _step: Optional[int] = None):
        if tier not in TIERS:
            raise OffloadError(f"offload: tier must be one of {', '.join(TIERS)}, got {tier!r}")
        if not isinstance(optimizer, InBackwardOptimizer):
            raise OffloadError("offload: the store needs revengine.optim.InBackwardOptimizer (the in-backward step), "
                               f"got {type(optimizer).__name__}")
        self.model, self.optimizer, self.tier = model, optimizer, tier
        self.directory = os.path.abspath(directory) if directory is not None else None
        self.layers = self._find_layers(model, optimizer)
        self.ends = self._find_ends(model, optimizer, self.layers)  # the input embedding, the output head
        self._input = next((e for e in self.ends if e.role == "input"), None)
        self._output = next((e for e in self.ends if e.role == "output"), None)
        self._stored = self.layers + self.ends  # what moves between the tier and memory
        for end in self.ends:  # on disk an end's state is stepped in row slices, never whole in memory
            end.sliced = tier == "disk" and len(end.params) == 1 and optimizer.row_slices(end.params[0]) is not None
            # and their weights too: the loss reads the head's, and steps it, a vocabulary slice at a time,
            # and the models' lookup the embedding's (a plain one: no padding row, norm limit, sparse grad)
            m = end.module
            end.streamed = end.sliced and (end.role == "output" or (
                m.padding_idx is None and m.max_norm is None and not m.sparse and not m.scale_grad_by_freq))
        self._of_param = {id(p): layer for layer in self._stored for p in layer.params}
        self._index = {layer.name: i for i, layer in enumerate(self.layers)}
        # the other trained parameters (the final norm, a tied embedding) stay in memory; the disk
        # tier writes them with each completed step, so that the store is a whole checkpoint
        self.rest = _Layer("rest", model, [p for p in optimizer.params if id(p) not in self._of_param])
        if tier == "host" and any(p.device.type == "cpu" for layer in self.layers for p in layer.params):
            raise OffloadError("offload: tier 'host' keeps a GPU model's layers in host memory; this model is on the CPU "
                               "(use tier 'disk')")
        if tier == "disk":
            elsewhere = next((p.device for layer in self._stored for p in layer.params if p.device.type != "cpu"), None)
            if elsewhere is not None:
                raise OffloadError(f"offload: tier 'disk' reads the layers into CPU memory; this model is on {elsewhere} "
                                   "(use tier 'host')")
            if self.directory is None:
                raise OffloadError("offload: tier 'disk' needs a directory (--offload-dir)")
            self._check_directory(_resume)
        self.step = 0
        self._written: set = set()  # layers written in the step not yet committed
        self._flush_queued = False
        self.bytes_read = self.bytes_written = 0
        self._handles = []
        # disk: a reader thread and a writer thread beside the compute, so that the next layer's read
        # does not queue behind the last one's write-back; a layer's read waits for its own last
        # release, and a release for the reads asked before it
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="revengine-read") if tier == "disk" else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="revengine-write") if tier == "disk" else None
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="revengine-sync") if tier == "disk" else None
        self._jobs: List[Future] = []
        self._last_write: Optional[Future] = None
        self._previous: Optional[dict] = None  # store.json's record of the step before the last
        # host: the copies' stream, and an event on the compute stream after the last release's use
        device = next((p.device for layer in self._stored for p in layer.params), None)
        self._copy = torch.cuda.Stream(device) if tier == "host" else None
        self._freed: Optional["torch.cuda.Event"] = None
        if _resume:
            self._load_store_json(_step)
        elif tier != "none":
            for layer in self._stored:  # step 0: the weights as they are (no optimizer state yet)
                self._write(layer, slot=0, step=0)
            if tier == "disk":
                self._write(self.rest, slot=0, step=0)
            self._drain()
            self._commit()
        for layer in self._stored:
            self._own_memory(layer)
            self._release(layer)
        self._attach()

    # -- construction -----------------------------------------------------------------------------

    @staticmethod
    def _find_layers(model, optimizer) -> List[_Layer]:
        from .sequential import Sequential

        stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, Sequential)]
        if not stacks:
            raise OffloadError("offload: the model has no revengine.Sequential stack: only a reversible stack's layers "
                               "can be released between forward and backward")
        trained = {id(p) for p in optimizer.params} if optimizer is not None else None
        layers = []
        for name, stack in stacks:
            if stack.mode != "reversible":
                raise OffloadError(f"offload: {name or 'the stack'} runs in mode {stack.mode!r}; the store needs "
                                   "reversible mode (other modes keep layer inputs or re-run from stored ones)")
            for i, layer in enumerate(stack.layers):
                # the stream functions (f, g) hold the weights and run under hooks; parameters of
                # the coupling itself (a few scalars) stay in memory
                parts = [c for c in layer.children() if any(True for _ in c.parameters())]
                params = [p for c in parts for p in c.parameters()]
                frozen = [n for n, p in layer.named_parameters() if trained is not None and id(p) not in trained]
                if frozen:
                    raise OffloadError(f"offload: {name}.{i} has parameters the optimizer does not train ({frozen[0]}, "
                                       "...): a released layer's frozen weights would not come back for its re-run")
                for n, p in layer.named_parameters():
                    if not _owns_storage(p):
                        raise OffloadError(f"offload: {name}.{i}.{n} shares its memory with another tensor "
                                           "(a view or a tied weight); it cannot be released alone")
                layers.append(_Layer(f"{name}.{i}" if name else str(i), layer, params, parts))
        return layers

    @staticmethod
    def _find_ends(model, optimizer, layers: List[_Layer]) -> List[_Layer]:
        """The model's input embedding and output head (`get_input_embeddings()` /
        `get_output_embeddings()`: an nn.Embedding, whose backward needs no weight, and an nn.Linear),
        stored like a layer when the optimizer trains them, they are not tied and own their memory;
        otherwise they stay in memory with the rest."""
        mine = {id(p) for layer in layers for p in layer.params}
        trained = {id(p) for p in optimizer.params} if optimizer is not None else None
        names = {id(m): n for n, m in model.named_modules()}
        ends = []
        for role, getter, cls in (("input", "get_input_embeddings", torch.nn.Embedding),
                                  ("output", "get_output_embeddings", torch.nn.Linear)):
            fn = getattr(model, getter, None)
            try:
                module = fn() if callable(fn) else None
            except (NotImplementedError, AttributeError):
                module = None
            if type(module) is not cls or id(module) not in names:
                continue
            params = list(module.parameters())
            if (any(id(p) in mine or (trained is not None and id(p) not in trained) or not _owns_storage(p)
                    for p in params) or sum(p.numel() for p in params) < MIN_ELEMENTS):
                continue
            ends.append(_Layer(names[id(module)], module, params, role=role))
        if len(ends) == 2 and {id(p) for p in ends[0].params} & {id(p) for p in ends[1].params}:
            return []  # tied: the one weight is used at both ends of every step
        return ends

    def _check_directory(self, resume: bool) -> None:
        self._check_directory_at(self.directory, resume)

    @staticmethod
    def _check_directory_at(d: str, resume: bool) -> None:
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise OffloadError(f"--offload-dir {d}: cannot create it ({os.strerror(e.errno)})") from None
        if not os.access(d, os.W_OK):
            raise OffloadError(f"--offload-dir {d}: not writable")
        if not resume and os.path.exists(os.path.join(d, STORE_FILE)):
            raise OffloadError(f"--offload-dir {d}: holds a store already ({STORE_FILE}); resume it with "
                               "LayerStore.open, or choose an empty folder")

    @staticmethod
    def build(model: torch.nn.Module, directory: str, fill: Callable[[int, torch.nn.Module], None]) -> None:
        """Writes a store for `model` one layer at a time, so that the whole model never exists in
        memory: each layer of its reversible stacks is given memory (`to_empty` when it is on the
        meta device), filled by `fill(index, layer)` (an initialisation, or weights read from a
        checkpoint), written and released again. The parameters outside the stacks must be real
        already. Then `LayerStore.open(model, optimizer, directory)` trains it.

        Raises:
            OffloadError: as LayerStore(): no reversible stack, a directory that is not writable or
                holds a store already.
        """
        layers = LayerStore._find_layers(model, None)
        ends = LayerStore._find_ends(model, None, layers)
        mine = {id(p) for layer in layers + ends for p in layer.params}
        rest = _Layer("rest", model, [p for p in model.parameters() if id(p) not in mine])
        directory = os.path.abspath(directory)
        LayerStore._check_directory_at(directory, resume=False)
        for i, layer in enumerate(layers):
            if any(p.is_meta for p in layer.params):
                _materialize(layer.parts)
                layer = _Layer(layer.name, layer.module, [p for c in layer.parts for p in c.parameters()], layer.parts)
            with torch.no_grad():
                fill(i, layer.module)
            tensors = {f"param.{layer.names[id(p)]}": p.data for p in layer.params}
            _write_file(os.path.join(directory, f"{layer.name}.0.safetensors"), tensors, {"step": "0", "layer": layer.name})
            for t in tensors.values():
                if t.numel() >= MIN_ELEMENTS and _owns_storage(t):
                    t.untyped_storage().resize_(0)
        for end in ends + [rest]:
            _write_file(os.path.join(directory, f"{end.name}.0.safetensors"),
                        {f"param.{end.names[id(p)]}": p.data for p in end.params}, {"step": "0", "layer": end.name})
        names = [layer.name for layer in layers + ends + [rest]]
        doc = dict(_fingerprint(layers, ends, rest, None), step=0, slots=dict.fromkeys(names, 0),
                   steps=dict.fromkeys(names, 0))
        _write_json(os.path.join(directory, STORE_FILE), doc)

    @staticmethod
    def empty_layers(model: torch.nn.Module) -> None:
        """Gives the layers of a model built on the meta device CPU parameters without memory (and
        the rest of the model none: fill it, or let `open` read it): the model of an existing store,
        made without ever holding it whole, for `LayerStore.open`."""
        for layer in LayerStore._find_layers(model, None):
            if any(p.is_meta for p in layer.params):
                _materialize(layer.parts)
                for part in layer.parts:
                    for p in part.parameters():
                        p.untyped_storage().resize_(0)

    @classmethod
    def open(cls, model: torch.nn.Module, optimizer: InBackwardOptimizer, directory: str,
             step: Optional[int] = None) -> "LayerStore":
        """Resumes a disk store: the model's layers and their optimizer state as of the store's last
        completed step (checked against the model: names, shapes, dtypes, optimizer state), or as
        of `step` when that is the step before it (its files stay intact until the next step
        starts writing: a trainer killed between the store's commit and its own checkpoint
        resumes from the checkpoint's step)."""
        return cls(model, optimizer, "disk", directory, _resume=True, _step=step)

    # -- the tensors of a layer --------------------------------------------------------------------

    def _tensors(self, layer: _Layer) -> Dict[str, torch.Tensor]:
        """What a layer's file holds: its parameters and every tensor of their optimizer state (the
        plain tensors inside quantized state, step counters included)."""
        out = {}
        names = layer.names
        state = self.optimizer.state
        for p in layer.params:
            n = names[id(p)]
            out[f"param.{n}"] = p.data
            for key, v in sorted(state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    for j, t in enumerate(inner_tensors(v)):
                        out[f"state.{n}.{key}.{j}"] = t
        return out

    def _moving(self, layer: _Layer, kind: str = "") -> Dict[str, torch.Tensor]:
        """The tensors whose memory is released between uses (the large ones that own their storage,
        and a sliced end's state kept in rows, whatever its size); kind "param" or "state" selects the
        weights or the optimizer state."""
        rows = self._row_entries(layer)
        return {k: t for k, t in self._tensors(layer).items()
                if k.startswith(kind) and _owns_storage(t) and (t.numel() >= MIN_ELEMENTS or k in rows)}

    def _row_entries(self, layer: _Layer) -> set:
        """The entries of a sliced end's state that are read and written a row slice at a time (`_StateRows`)."""
        if not layer.sliced:
            return set()
        p = layer.params[0]
        prefix, every = f"state.{layer.names[id(p)]}.", slice(0, p.shape[0])
        return {f"{prefix}{key}.{j}" for key, v in self.optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape
                for j, part in enumerate(state_rows(v, every)) if part is not None}

    def _own_memory(self, layer: _Layer) -> None:
        """Gives every moving tensor of the layer memory of its own that can be released: tensors read
        from a file (an HF checkpoint's weights, a loaded optimizer state) may sit in memory torch
        cannot resize."""
        def resizable(t):
            return t.untyped_storage().resizable()

        for p in layer.params:
            if p.numel() >= MIN_ELEMENTS and not resizable(p):
                p.data = p.data.clone()
            st = self.optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if isinstance(v, torch.Tensor) and not all(resizable(t) for t in inner_tensors(v)):
                    st[k] = map_inner(v, lambda t: t.clone())

    def _path(self, layer: _Layer, slot: int) -> str:
        return os.path.join(self.directory, f"{layer.name}.{slot}.safetensors")

    def _fingerprint(self) -> Dict[str, object]:
        return _fingerprint(self.layers, self.ends, self.rest, type(self.optimizer.optimizers[0]).__name__)

    # -- moving ------------------------------------------------------------------------------------

    def _submit(self, fn, pool: Optional[ThreadPoolExecutor]) -> Future:
        """Runs fn on the reader or writer thread (disk), or now (the other tiers)."""
        if pool is None:
            f: Future = Future()
            f.set_result(fn())
            return f
        f = pool.submit(fn)
        # keep what is in flight or failed (a failure is raised by the next _drain)
        self._jobs = [j for j in self._jobs if not j.done() or j.exception() is not None] + [f]
        return f

    def _drain(self) -> None:
        """Waits for every queued read and write; the first failure is raised here."""
        jobs, self._jobs = self._jobs, []
        for f in jobs:
            f.result()
        if self._copy is not None:
            self._copy.synchronize()

    def _write(self, layer: _Layer, slot: int, step: int, free: Optional[List[torch.Tensor]] = None) -> None:
        """Writes the layer as of `step` back (disk: queued on the writer thread, which then frees
        `free`, once the layer's reads asked for before have landed)."""
        tensors = self._tensors(layer) if self.tier == "disk" else self._moving(layer)
        if self.tier == "disk":
            path, meta = self._path(layer, slot), {"step": str(step), "layer": layer.name}
            layer.written_at = step
            reads = list(layer.ready.values())
            part, layer.partial = layer.partial, None  # a sliced end: its state rows are in the file already

            def job():
                for f in reads:
                    f.result()
                if part is not None:
                    part.finish(tensors)
                else:
                    _write_file(path, tensors, meta, sync=False, in_place=True)  # a slot no step names
                for t in free or ():
                    t.untyped_storage().resize_(0)
            written = layer.released = self._submit(job, self._writer)

            def sync():
                written.result()
                _sync_file(path)
            self._submit(sync, self._syncer)  # _drain (before store.json) waits for it
            layer.slot = slot
        elif self.tier == "host":
            self._copy.wait_stream(torch.cuda.current_stream(self._copy.device))  # after the step that wrote it
            with torch.cuda.stream(self._copy):
                for k, t in tensors.items():
                    if k not in layer.home:
                        layer.home[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    layer.home[k].copy_(t, non_blocking=True)
                    t.record_stream(self._copy)  # its memory is not reused before the copy is done
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
        layer.dirty = False

    def _release(self, layer: _Layer) -> None:
        # (a streamed end is never loaded in training; its stepped file is completed here all the same)
        if not (layer.loaded or layer.partial is not None) or self.tier == "none":
            return
        moving = list(self._moving(layer).values())
        if self.tier == "disk":
            reads = list(layer.ready.values())

            def free():
                for f in reads:
                    f.result()
                for t in moving:
                    t.untyped_storage().resize_(0)
            if layer.dirty:
                # one write-back in flight at most: when the disk is slower than the compute, the
                # compute waits here rather than queueing layers in memory (the window stays three)
                if self._last_write is not None:
                    self._last_write.exception()
                # the slot the last completed step did not write (the same one again within a step)
                self._write(layer, layer.slot if layer.name in self._written else 1 - layer.slot, self.step + 1,
                            free=moving)
                self._written.add(layer.name)
                self._last_write = layer.released
            else:
                layer.released = self._submit(free, self._writer)
        else:
            if layer.dirty:
                self._write(layer, 0, self.step + 1)
                self._written.add(layer.name)
            # freed now; the allocator hands the memory out again once the compute (and the copy
            # out: record_stream) is done with it, and the next load waits for that on the CPU
            self._freed = torch.cuda.Event()
            self._freed.record(torch.cuda.current_stream(self._copy.device))
            for t in moving:
                t.untyped_storage().resize_(0)
            layer.copied.clear()
        layer.loaded = layer.state_loaded = False
        layer.ready.clear()

    def _end_of_backward(self) -> None:
        """Queued by the first re-run of a backward: releases what is still in memory (a layer whose
        parameters did not all get a gradient) and commits the step."""
        self._flush_queued = False
        for layer in self._stored:
            if layer.loaded:
                self._release(layer)
        if self._written:
            if self.tier == "disk":
                self._write(self.rest, slot=1 - self.rest.slot, step=self.step + 1)
            self._drain()  # every layer's file is complete before store.json names it
            self.step += 1
            self._commit()
        else:
            self._drain()
        for end in self.ends:
            end.ran = 0
        if self._input is not None and not self._input.streamed:  # the next forward starts there
            self._load(self._input, "param", wait=False)
        self._load(self.layers[0], "param", wait=False)

    def _load(self, layer: _Layer, kind: str = "param", wait: bool = True) -> None:
        """Brings in a layer's weights (kind "param") or its optimizer state ("state"); wait=False
        only asks for it (a prefetch: the I/O thread reads it while the compute goes on)."""
        if not (layer.loaded if kind == "param" else layer.state_loaded) and self.tier != "none":
            tensors = self._moving(layer, kind)
            path = self._path(layer, layer.slot) if self.tier == "disk" else None
            before = layer.released
            # the write-back in flight (another layer's) frees its memory before this read takes more:
            # the window is then two layers' weights and one layer's state, not three and two; reads
            # from the page cache are fast against a write, so the compute hardly waits for it
            in_flight = self._last_write

            def job():
                if before is not None:
                    before.result()  # its last write-back and release come first
                if in_flight is not None:
                    wait_for([in_flight])  # (its failure is raised by _drain, not by this read)
                for t in tensors.values():
                    t.untyped_storage().resize_(t.numel() * t.element_size())
                    _advise_huge_pages(t)
                _read_into(path, tensors)
            if self.tier == "host":
                self._copy_in(layer, kind, tensors)
            else:
                layer.ready[kind] = self._submit(job, self._reader)
            self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
            if kind == "param":
                layer.loaded = True
            else:
                layer.state_loaded = True
        if wait and kind in layer.ready:
            layer.ready.pop(kind).result()
        if wait and kind in layer.copied:
            torch.cuda.current_stream(self._copy.device).wait_event(layer.copied.pop(kind))

    def _copy_in(self, layer: _Layer, kind: str, tensors: Dict[str, torch.Tensor]) -> None:
        """Host tier: the layer's tensors allocated on the copy stream (after the compute has finished
        with the layer released last, so that they take its memory) and copied in there; the compute
        stream waits for the copies' event when it first uses them (`_load(wait=True)`)."""
        if self._freed is not None:
            self._freed.synchronize()
            self._freed = None
        compute = torch.cuda.current_stream(self._copy.device)
        with torch.cuda.stream(self._copy):
            for k, t in tensors.items():
                t.untyped_storage().resize_(t.numel() * t.element_size())
                t.copy_(layer.home[k], non_blocking=True)
                t.record_stream(compute)
            done = torch.cuda.Event()
            done.record(self._copy)
        layer.copied[kind] = done

    def _commit(self) -> None:
        """store.json: the slots of the last completed step (written only for the disk tier)."""
        self._written = set()
        if self.tier != "disk":
            return
        everything = self._stored + [self.rest]
        doc = dict(self._fingerprint(), step=self.step, slots={layer.name: layer.slot for layer in everything},
                   steps={layer.name: layer.written_at for layer in everything})
        if self._previous is not None and self._previous["step"] == self.step - 1:
            doc["previous"] = self._previous
        _sync_file(self.directory, "the store's folder")  # the layer files' renames (their data is synced by then: _drain)
        _write_json(os.path.join(self.directory, STORE_FILE), doc)
        self._previous = {k: doc[k] for k in ("step", "slots", "steps")}

    def _load_store_json(self, step: Optional[int] = None) -> None:
        path = os.path.join(self.directory, STORE_FILE)
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except OSError as e:
            raise OffloadError(f"{path}: cannot read the store ({os.strerror(e.errno) if e.errno else e})") from None
        except ValueError:
            raise OffloadError(f"{path}: not a store file (unreadable JSON)") from None
        mine = self._fingerprint()
        if doc.get("optimizer") is None and int(doc.get("step", -1)) == 0:
            mine.pop("optimizer")  # a store built before any optimizer existed (LayerStore.build)
        for k, v in mine.items():
            if doc.get(k) != v:
                raise OffloadError(f"{path}: written for another model or optimizer ({k}: {doc.get(k)!r}, "
                                   f"this run has {v!r})")
        if step is not None and step != int(doc["step"]):
            if int((doc.get("previous") or {}).get("step", -1)) != step:
                raise OffloadError(f"{path}: holds step {doc['step']}" + (f" (and {doc['previous']['step']})"
                                   if doc.get("previous") else "") + f", not step {step}")
            doc = doc["previous"]
        self.step = int(doc["step"])
        for layer in self._stored + [self.rest]:
            layer.slot = int(doc["slots"][layer.name])
            layer.written_at = int(doc.get("steps", {}).get(layer.name, -1))
        self._previous = {k: doc[k] for k in ("step", "slots", "steps")} if "steps" in doc else None
        self._restore_state()

    def _restore_state(self) -> None:
        """Reads every layer's weights and optimizer state from its committed file. The optimizer's
        state tensors are created first (by a zero-gradient step that is then undone: reading over it)."""
        for layer in self._stored + [self.rest]:
            path = self._path(layer, layer.slot)
            try:
                with open(path, "rb") as fh:
                    header, _ = _read_header(path, fh)
            except OSError as e:
                raise _cannot_read(path, e) from None
            for p in layer.params:  # a layer built released (LayerStore.build) gets its memory back
                if p.untyped_storage().nbytes() == 0 and p.numel():
                    p.untyped_storage().resize_(p.numel() * p.element_size())
            has_state = any(k.startswith("state.") for k in header if k != "__metadata__")
            if has_state and not any(p in self.optimizer.state for p in layer.params):
                self._init_state(layer)
            tensors = self._tensors(layer)
            extra = sorted(set(header) - set(tensors) - {"__metadata__"})
            if extra:
                raise OffloadError(f"{path}: holds {extra[0]} that this model and optimizer do not have "
                                   "(a store written by another model or optimizer?)")
            meta = _read_into(path, tensors)
            if layer.written_at >= 0 and meta.get("step") != str(layer.written_at):
                raise OffloadError(f"{path}: holds step {meta.get('step')}, the store names step {layer.written_at} "
                                   "(overwritten by a later step)")
            if layer is not self.rest:  # one layer in memory at a time: a model larger than memory resumes
                self._own_memory(layer)
                for t in self._moving(layer).values():
                    t.untyped_storage().resize_(0)
                layer.loaded = layer.state_loaded = False

    def _init_state(self, layer: _Layer) -> None:
        """Creates the optimizer state of a layer's parameters (its tensors are then read from disk)."""
        opts = {id(p): o for p, o in zip(self.optimizer.params, self.optimizer.optimizers)}
        for p in layer.params:
            opt = opts[id(p)]
            saved = p.detach().clone()
            p.grad = torch.zeros_like(p)
            lr = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0 if isinstance(g["lr"], torch.Tensor) else 0.0
            rng = torch.get_rng_state()
            opt.step()
            torch.set_rng_state(rng)
            for g, v in zip(opt.param_groups, lr):
                g["lr"] = v
            p.grad = None
            with torch.no_grad():
                p.copy_(saved)

    # -- hooks ---------------------------------------------------------------------------------------

    def _attach(self) -> None:
        for layer in self.layers:
            for part in layer.parts:  # the executor refuses hooks on a coupling; its f and g take them
                self._handles.append(part.register_forward_pre_hook(lambda m, a, layer=layer: self._before_part(layer)))
                self._handles.append(part.register_forward_hook(lambda m, a, o, layer=layer: self._after_part(layer)))
        for end in self.ends:
            self._handles.append(end.module.register_forward_pre_hook(lambda m, a, end=end: self._load(end, "param")))
            self._handles.append(end.module.register_forward_hook(lambda m, a, o, end=end: self._after_end(end)))
        if self._output is not None:
            # a causal LM's loss may read the head's weight without calling the head (a chunked
            # cross-entropy): the head is brought in when the last stack has run
            from .sequential import Sequential

            top = self.layers[-1].module
            stack = next(m for m in self.model.modules()
                         if isinstance(m, Sequential) and any(x is top for x in m.layers))
            self._handles.append(stack.register_forward_hook(lambda m, a, o: self._head_needed()))
        self._grad_hooks = self.optimizer.register_grad_hooks(self._before_step, self._after_grad)
        for end in self.ends:
            if end.streamed:
                self.optimizer.stream_rows(end.params[0], _StateRows(self, end))
            elif end.sliced:
                self.optimizer.set_row_source(end.params[0], _StateRows(self, end))

    def _trains(self) -> bool:
        """Whether the forward running now will be followed by this model's backward."""
        return torch.is_grad_enabled() and self.model.training

    def _head_needed(self) -> None:
        """After the last stack's forward: the head in memory (and its state, for the step that its
        gradient, the first of the backward, brings); it stays until that step."""
        out = self._output
        if out.streamed:  # the loss reads it a slice at a time (`optim.streamed`)
            out.pending, out.ran = (len(out.params) if self._trains() else 0), 0
            return
        self._load(out, "param")
        if self._trains():
            if not self.optimizer.measuring_norm and not out.sliced:
                self._load(out, "state", wait=False)
            out.pending = len(out.params)

    def _after_end(self, end: _Layer) -> None:
        """After the embedding's or the head's own forward. In training the embedding goes (its
        backward needs no weight: it comes back for its step) and the head stays (the loss's backward
        re-reads it); otherwise both go."""
        if not self._trains():
            self._release(end)
        elif end.streaming:
            raise OffloadError(f"offload: {end.name} ran whole in a training forward that had already read its weight "
                               "a slice at a time (stepped then, in backward): call it once per forward (for logits: "
                               "without grad, or from a forward without labels)")
        elif end.role == "input":
            end.pending = len(end.params)
            self._release(end)

    def _before_part(self, layer: _Layer) -> None:
        """Brings the layer in, and asks for what comes next: the next layer's weights in forward; in
        backward's re-run, this layer's optimizer state (for its step) and the layer below's weights."""
        self._load(layer, "param")
        i = self._index[layer.name]
        stepping = not self.optimizer.measuring_norm  # (global clipping's first pass steps nothing)
        if side.is_recomputing():
            if stepping:
                self._load(layer, "state", wait=False)
            if i > 0:
                self._load(self.layers[i - 1], "param", wait=False)
            # (the embedding's step, the last, is read for once layer 0 is released: _after_grad)
        elif i + 1 < len(self.layers):
            self._load(self.layers[i + 1], "param", wait=False)
        elif self._output is not None and not self._output.streamed:
            self._load(self._output, "param", wait=False)

    def _after_part(self, layer: _Layer) -> None:
        layer.ran += 1
        if layer.ran < len(layer.parts):
            return
        layer.ran = 0
        if side.is_recomputing():
            # backward's re-run: the vector-Jacobian product and the step still need the layer
            layer.pending = len(layer.params)
            if not self._flush_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._flush_queued = True
            return
        if layer.module.training and layer is self.layers[-1]:
            return  # training: backward re-runs this layer first, so it stays for that
        self._release(layer)

    def _before_step(self, p: torch.Tensor) -> None:
        layer = self._of_param.get(id(p))
        if layer is not None and not layer.streaming:  # (the stream steps it in slices)
            self._load(layer, "param")
            if not layer.sliced:  # (its state comes in row slices inside the step: _StateRows)
                self._load(layer, "state")

    def _after_grad(self, p: torch.Tensor, stepped: bool) -> None:
        layer = self._of_param.get(id(p))
        if layer is None:
            return
        layer.dirty = layer.dirty or stepped
        layer.pending -= 1
        if layer.pending <= 0:
            self._release(layer)
            if layer is self.layers[0] and self._input is not None and not self.optimizer.measuring_norm \
                    and not self._input.streaming:
                # the embedding's step comes last: its weights (and state) are read once layer 0's
                # write-back has freed that memory, while the embedding's gradient is computed
                self._load(self._input, "param", wait=False)
                if not self._input.sliced:
                    self._load(self._input, "state", wait=False)

    # -- API ---------------------------------------------------------------------------------------

    def resident_layers(self) -> List[str]:
        """The layers (and ends: the embedding first, the head last) whose tensors are in memory now."""
        ordered = [e for e in (self._input, *self.layers, self._output) if e is not None]
        return [layer.name for layer in ordered if layer.loaded or self.tier == "none"]

    def _load_all(self) -> None:
        for layer in self._stored:
            self._load(layer, "param")
            self._load(layer, "state")
        self._drain()

    @contextlib.contextmanager
    def resident(self):
        """Every layer and its optimizer state in memory inside the block (to save a checkpoint of
        the whole model, say), released again after it."""
        self._load_all()
        try:
            yield self
        finally:
            for layer in self._stored:
                self._release(layer)

    def save_weights(self, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
        """Writes the model's parameters (named as in `model.named_parameters()`, a tied weight once)
        as one safetensors file, bringing in one layer at a time: a model larger than memory is
        saved without being whole. Written beside `path` and renamed over it.

        Raises:
            OffloadError: the file cannot be written (named); `path` is then unchanged.
        """
        named = list(self.model.named_parameters())
        header: Dict[str, object] = {"__metadata__": dict(metadata or {})}
        offset = 0
        for k, p in named:
            n = p.numel() * p.element_size()
            header[k] = {"dtype": _CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)

        def write(fh):
            fh.write(struct.pack("<Q", len(raw)) + raw)
            current = None  # the layer brought in for this save
            for _, p in named:
                layer = self._of_param.get(id(p))
                if layer is not current and current is not None:
                    self._release(current)
                    current = None
                if layer is not None:
                    if not layer.loaded:
                        current = layer
                    self._load(layer, "param")  # waits for a read ahead in flight too
                fh.write(_bytes_view(p.data if p.device.type == "cpu" else p.data.cpu()))
            if current is not None:
                self._release(current)
            self._drain()
        _replace(path, "wb", write, "the model's weights")

    def detach(self) -> None:
        """Removes the hooks and leaves the released layers as they are (a model about to be dropped).
        Writes still queued are finished first."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._grad_hooks.remove()
        for end in self.ends:
            if end.streamed:
                self.optimizer.stream_rows(end.params[0], None)
            elif end.sliced:
                self.optimizer.set_row_source(end.params[0], None)
            if end.partial is not None:
                end.partial._settle(raising=False)
                end.partial._abandon()
        for pool in (self._reader, self._writer, self._syncer):
            if pool is not None:
                pool.shutdown(wait=True)
        self._reader = self._writer = self._syncer = None

    def close(self) -> None:
        """Brings every layer back into memory and removes the hooks (the model is ordinary again)."""
        self._load_all()
        self.detach()

    @staticmethod
    def remove(directory: str) -> None:
        """Deletes the store in `directory` (store.json and the layer files it names; nothing else)."""
        path = os.path.join(directory, STORE_FILE)
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            return
        for name in list(doc.get("layers", [])) + list(doc.get("ends", [])) + ["rest"]:
            for slot in (0, 1):
                f = os.path.join(directory, f"{name}.{slot}.safetensors")
                if os.path.exists(f):
                    os.remove(f)
        os.remove(path)

    def __enter__(self) -> "LayerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["LayerStore", "OffloadError", "TIERS"]
