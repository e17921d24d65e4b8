"""`revengine selftest`: verifies an install on a device in seconds.

    revengine selftest                  # CPU
    revengine selftest --device cuda    # the CUDA kernels (GPU users: run this once per install)
    revengine selftest --json           # the rows as JSON (send this when a check fails)

Checks, one row each:
* op:<name>    every custom kernel against its ATen reference (revengine.reference) on the device,
               over several shapes (odd, empty, non-contiguous) and dtypes; the error is the largest
               |custom - reference| in units of the dtype's eps times the largest |reference|
               (integer results: the largest absolute difference);
* model:<type> a tiny reversible model of every block type against reversible_mode="plain"
               (float32): the largest relative difference of the parameter grads;
* exact        revengine.Sequential(..., exact=True, debug=True): reconstruction error (must be 0);
* memory       CUDA only: the growth of a reversible step's peak allocated memory from 4 to 16
               layers, as a fraction of one layer's activation per added layer (flat: about 0);
* offload      three AdamW steps of a tiny model with its layers in revengine.offload.LayerStore
               (on disk on the CPU, in host memory on a GPU) against the same steps without: the
               largest weight difference (must be 0);
* stream       a sharded HF checkpoint converted into a layer store one decoder layer at a time
               (revengine.convert.stream_from_hf) against from_hf: the largest weight difference
               (must be 0; skipped without transformers);
* offload-memory  CUDA only: with the layers in host memory, the growth of the step's peak allocated
               memory (weights and state included) from 4 to 16 layers, as a fraction of one
               layer's weights + AdamW state per added layer (flat: about 0).
Exit status 1 when a check fails.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

import revengine as rev
from revengine import reference
from revengine.memory import device_arg

Tensor = torch.Tensor
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ROUNDED_FMA_F64 = 2.0  # float64 fma: the reference rounds twice (torch has no fma), within 1 ulp
REDUCTION = 64.0  # sums and matmuls may associate differently on a device (eps units)
MODEL_TOL = 1e-4  # float32 grads, reversible against plain, relative to the largest grad (CPU: < 1e-6)
MEMORY_TOL = 0.25  # flat: well under one stored activation per added layer


@dataclass
class Row:
    """One check: its name, the measured error, the tolerance, and whether it passed."""

    name: str
    max_error: float
    tolerance: float
    passed: bool
    note: str = ""


def _custom(name: str) -> Callable:
    """The custom kernel of op `name` as the selftest calls it (the op itself, custom kernels on)."""
    return getattr(torch.ops.revengine, name)


# ---------------------------------------------------------------------------------------------
# op checks
# ---------------------------------------------------------------------------------------------
def _error(ref, ker) -> float:
    """|ker - ref| in units of eps(dtype) * max|ref| (NaN where both are NaN counts as equal);
    integer and bool results: the largest absolute difference; inf when shapes or dtypes differ."""
    if isinstance(ref, (tuple, list)):
        return max([_error(a, b) for a, b in zip(ref, ker)] + [0.0])
    if ref is None:
        return 0.0 if ker is None else float("inf")
    if ker.shape != ref.shape or ker.dtype != ref.dtype or ker.device != ref.device:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    if not ref.is_floating_point():
        return float((ker.double() - ref.double()).abs().max()) if ref.dtype != torch.bool else float((ker != ref).any())
    a, b = ref.double(), ker.double()
    both_nan = a.isnan() & b.isnan()
    same_inf = torch.isinf(a) & (a == b)
    d = torch.where(both_nan | same_inf, torch.zeros_like(a), (a - b).abs())
    if bool(d.isnan().any()):
        return float("inf")
    finite = a[torch.isfinite(a)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return float(d.max()) / (torch.finfo(ref.dtype).eps * max(scale, 1e-30))


def _shapes(dev: torch.device) -> Iterator[Tuple[Tuple[int, ...], bool]]:
    """(shape, non-contiguous) cases: empty, one element, odd sizes, past a 1024-element block."""
    yield (0,), False
    yield (1,), False
    yield (7,), False
    yield (33, 5), True
    yield (3, 1031), False
    yield (5, 257), True


def _rand(shape, dtype, gen, dev, noncontig=False, scale=1.0) -> Tensor:
    if noncontig:  # every other column of a wider tensor
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)[..., ::2]
    else:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return (t * scale).to(device=dev, dtype=dtype)


def _compare(name: str, call: Callable[[Callable], object]) -> float:
    """Runs call(custom) and call(reference) on fresh inputs: call gets the function to apply."""
    ker = call(_custom(name))
    ref = call(reference.REFERENCES[name])
    return _error(ref, ker)


def _elementwise_cases(dev: torch.device) -> Dict[str, List[Tuple[float, float]]]:
    """{op: [(error, tolerance), ...]} for the element-wise ops."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    gen = torch.Generator().manual_seed(0)

    def add(name, err, tol=0.0):
        out.setdefault(name, []).append((err, tol))

    for dtype in FLOATS:
        fma_tol = ROUNDED_FMA_F64 if dtype == torch.float64 else 0.0
        for shape, nc in _shapes(dev):
            x = _rand(shape, dtype, gen, dev, nc)
            f = _rand(shape, dtype, gen, dev, nc)
            scale = _rand(shape, torch.float32, gen, dev, nc).abs() + 0.5
            shift = _rand(shape, dtype, gen, dev, nc)
            add("coupling_update", _compare("coupling_update", lambda fn: fn(x, f, 0.7)), fma_tol)

            def inplace(fn, args, first):
                t = first.clone()
                r = fn(t, *args)
                return (t, r)

            add("coupling_update_", _compare("coupling_update_", lambda fn: inplace(fn, (f, 0.7), x)), fma_tol)
            y = x.clone()
            _custom("coupling_update_")(y, f, 0.7)
            add("coupling_inverse_", _compare("coupling_inverse_", lambda fn: inplace(fn, (f, 0.7, True), y)))
            add("affine_update_", _compare("affine_update_", lambda fn: inplace(fn, (scale, shift), x)), fma_tol)
            add("affine_inverse_", _compare("affine_inverse_", lambda fn: inplace(fn, (scale, shift, True), x)))
            add("all_finite", _compare("all_finite", lambda fn: fn(x)))
            big = x * 100
            for bits in (0, 16, 40):
                add("fixed_quantize", _compare("fixed_quantize", lambda fn: fn(big, bits)))
                q = _custom("fixed_quantize")(big, bits)
                add("fixed_dequantize", _compare("fixed_dequantize", lambda fn: fn(q, bits, dtype)))
            acc = torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=torch.int64).to(dev)
            for sign in (1, -1):
                add("fixed_update_", _compare("fixed_update_", lambda fn: inplace(fn, (big, 50, sign), acc)))
            if shape[0] > 0:
                u = torch.randint(-(2**62), 2**62, shape, generator=gen, dtype=torch.int64).to(dev)
                sg = torch.where(torch.arange(shape[0]) % 2 == 0, 1, -1).to(dev)
                for k in (1, 3, 4, 8):
                    add("bdia_step_", _compare("bdia_step_", lambda fn: inplace(fn, (u, x, sg, 30, k), u)))
                    w = u.clone()
                    low = _custom("bdia_step_")(w, u, x, sg, 30, k)
                    add("bdia_unstep_", _compare("bdia_unstep_", lambda fn: inplace(fn, (u, x, sg, low, 30, k), w)))
        # a non-finite value: the flags, and NaN/inf propagation
        z = torch.tensor([1.0, float("nan"), float("inf"), -2.0], dtype=dtype, device=dev)
        add("all_finite", _compare("all_finite", lambda fn: fn(z)))
        add("coupling_inverse_", _compare("coupling_inverse_", lambda fn: inplace(fn, (z, 0.5, True), z)))
    return out


def _moe_cases(dev: torch.device) -> Dict[str, List[Tuple[float, float]]]:
    """{op: [(error, tolerance), ...]} for the MoE routing ops."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    gen = torch.Generator().manual_seed(1)

    def add(name, err, tol=0.0):
        out.setdefault(name, []).append((err, tol))

    for T, k, E, H in ((0, 2, 3, 5), (1, 1, 1, 4), (9, 2, 4, 7), (33, 3, 5, 33), (17, 2, 6, 0)):
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
        ids = ids.to(dev)
        for idt in (torch.int64, torch.int32, torch.int16):
            add("moe_permute", _compare("moe_permute", lambda fn: fn(ids.to(idt), E)))
        slots, off = _custom("moe_permute")(ids, E)
        for dtype in FLOATS:
            x = _rand((T, H), dtype, gen, dev, noncontig=True)
            add("moe_gather", _compare("moe_gather", lambda fn: fn(x, slots, k)))
            go = _rand((T * k, H), dtype, gen, dev)
            add("moe_gather_backward", _compare("moe_gather_backward", lambda fn: fn(go, slots, k)), REDUCTION)
            xs = _custom("moe_gather")(x, slots, k)
            w = _rand((E, 3, H), dtype, gen, dev)
            add("moe_grouped_mm", _compare("moe_grouped_mm", lambda fn: fn(xs, w, off)), REDUCTION)
            gy = _rand((T * k, 3), dtype, gen, dev)
            add("moe_grouped_mm_weight_grad", _compare("moe_grouped_mm_weight_grad", lambda fn: fn(gy, xs, off)), REDUCTION)
            wt = _rand((T, k), torch.float32, gen, dev).abs()
            add("moe_scatter_combine", _compare("moe_scatter_combine", lambda fn: fn(go, wt, slots, T)), REDUCTION)
            g2 = _rand((T, H), dtype, gen, dev)
            add("moe_scatter_combine_backward",
                _compare("moe_scatter_combine_backward", lambda fn: fn(g2, go, wt, slots)), REDUCTION)
    return out


def op_rows(dev: torch.device) -> List[Row]:
    """One row per op: the worst case, against its tolerance (0: bit for bit)."""
    rows = []
    cases = {**_elementwise_cases(dev), **_moe_cases(dev)}
    for name in reference.REFERENCES:
        pairs = cases.get(name, [])
        worst = max(pairs, key=lambda p: (p[0] > p[1], p[0] - p[1]), default=(0.0, 0.0))
        ok = bool(pairs) and all(e <= t for e, t in pairs)
        rows.append(Row(f"op:{name}", worst[0], max(t for _, t in pairs) if pairs else 0.0, ok,
                        "" if pairs else "not exercised"))
    return rows


# ---------------------------------------------------------------------------------------------
# model, exact and memory checks
# ---------------------------------------------------------------------------------------------
def model_rows(dev: torch.device) -> List[Row]:
    """A tiny model of every block type, reversible against plain (float32 grads)."""
    from revengine.models import BLOCK_TYPES, RevMoEConfig, RevMoEForCausalLM

    rows = []
    for bt in BLOCK_TYPES:
        try:
            grads = []
            for mode in ("plain", "reversible"):
                cfg = RevMoEConfig.preset("tiny", block_type=bt, reversible_mode=mode, num_hidden_layers=4)
                torch.manual_seed(0)
                model = RevMoEForCausalLM(cfg).to(dev)
                ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(dev)
                torch.manual_seed(2)  # bdia's random signs: the same in both modes
                model(ids, labels=ids).loss.backward()
                grads.append([p.grad.detach().float() for p in model.parameters() if p.grad is not None])
            err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*grads))
            rows.append(Row(f"model:{bt}", err, MODEL_TOL, err <= MODEL_TOL))
        except Exception as e:  # a failing check is a row, not a traceback
            rows.append(Row(f"model:{bt}", float("inf"), MODEL_TOL, False, f"{type(e).__name__}: {e}"[:200]))
    return rows


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))


def exact_row(dev: torch.device) -> Row:
    """Exact mode: every layer's reconstruction equals its true input bit for bit (debug=True)."""
    try:
        torch.manual_seed(0)
        stack = rev.Sequential(*[rev.AdditiveCoupling(_mlp(16), _mlp(16)) for _ in range(6)], exact=True,
                               debug=True, debug_tol=0.0).to(dev)
        x = torch.randn(4, 32, device=dev, requires_grad=True)
        stack(x).square().sum().backward()
        errs = [float(e) for e in stack.last_report.reconstruction_errors]
        err = max(errs + [0.0])
        return Row("exact", err, 0.0, err == 0.0 and len(errs) == 6)
    except Exception as e:
        return Row("exact", float("inf"), 0.0, False, f"{type(e).__name__}: {e}"[:200])


def memory_row(dev: torch.device) -> Row:
    """CUDA: peak allocated of a reversible step, 16 layers against 4, per added layer, as a
    fraction of one layer's activation (what storing activations would add)."""
    width, batch = 64, 8192
    act_bytes = batch * 2 * width * 4

    def peak(depth: int) -> int:
        torch.manual_seed(0)
        stack = rev.Sequential(*[rev.AdditiveCoupling(_mlp(width), _mlp(width)) for _ in range(depth)]).to(dev)
        x = torch.randn(batch, 2 * width, device=dev, requires_grad=True)
        stack(x).square().sum().backward()  # warm-up: grads and allocator state in place
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        stack(x).square().sum().backward()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base

    try:
        err = (peak(16) - peak(4)) / (12 * act_bytes)
        return Row("memory", max(err, 0.0), MEMORY_TOL, err <= MEMORY_TOL)
    except Exception as e:
        return Row("memory", float("inf"), MEMORY_TOL, False, f"{type(e).__name__}: {e}"[:200])


def _offload_run(dev: torch.device, layers: int, tier: str, directory: str, steps: int = 3, **config):
    """(weights after `steps` AdamW steps in backward, the last step's peak allocated CUDA memory or 0,
    the bytes of one layer's weights + AdamW state). `config` overrides the tiny preset's fields."""
    from revengine.models import RevMoEConfig, RevMoEForCausalLM
    from revengine.offload import LayerStore

    cfg = RevMoEConfig.preset("tiny", block_type="bdia", num_hidden_layers=layers, **config)
    torch.manual_seed(0)
    model = RevMoEForCausalLM(cfg).to(dev).train()
    opt = rev.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    store = LayerStore(model, opt, tier=tier, directory=directory) if tier != "none" else None
    peak = 0
    for s in range(steps):
        torch.manual_seed(10 + s)
        ids = torch.randint(0, cfg.vocab_size, (2, 12)).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        model(ids, labels=ids).loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
    if store is not None:
        store.close()
    layer = model.model.layers.layers[0]
    per_layer = 3 * sum(p.numel() * p.element_size() for p in layer.parameters())
    return [p.detach().clone() for p in model.parameters()], peak, per_layer


def offload_row(dev: torch.device) -> Row:
    """Layers in the store (disk on the CPU, host memory on a GPU): bit-identical weights after three steps."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as d:
            plain, _, _ = _offload_run(dev, 4, "none", d)
            stored, _, _ = _offload_run(dev, 4, "host" if dev.type == "cuda" else "disk", d + "/store")
        err = max(float((a - b).abs().max()) for a, b in zip(plain, stored))
        return Row("offload", err, 0.0, err == 0.0)
    except Exception as e:
        return Row("offload", float("inf"), 0.0, False, f"{type(e).__name__}: {e}"[:200])


def stream_row() -> Row:
    """A sharded HF checkpoint (Qwen2-MoE, hub layout) streamed into a layer store one decoder layer at a
    time (revengine.convert.stream_from_hf) against from_hf of the same folder: the largest weight
    difference (must be 0). Skipped (passing, with a note) without transformers."""
    import tempfile

    try:
        import transformers
    except ImportError:
        return Row("stream", 0.0, 0.0, True, "skipped: transformers is not installed (pip install 'revengine[hf]')")
    from revengine.convert import from_hf, stream_from_hf
    from revengine.offload import LayerStore

    try:
        torch.manual_seed(0)
        cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40, qkv_bias=True)
        with tempfile.TemporaryDirectory() as d:
            transformers.Qwen2MoeForCausalLM(cfg).save_pretrained(d + "/hf", max_shard_size="40KB")
            expect = from_hf(d + "/hf").state_dict()
            model = stream_from_hf(d + "/hf", d + "/store")
            opt = rev.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
            LayerStore.open(model, opt, d + "/store").close()
            got = model.state_dict()
        err = max(float((got[k] - v).abs().max()) for k, v in expect.items()) if got.keys() == expect.keys() \
            else float("inf")
        return Row("stream", err, 0.0, err == 0.0)
    except Exception as e:
        return Row("stream", float("inf"), 0.0, False, f"{type(e).__name__}: {e}"[:200])


def offload_memory_row(dev: torch.device) -> Row:
    """CUDA, layers in host memory: peak allocated from 4 to 16 layers per added layer, as a fraction
    of one layer's weights + AdamW state (what keeping it on the device would add)."""
    # hidden 128: 99.7% of a layer's elements are in tensors the store moves (the tiny preset's hidden 64
    # leaves 61% in tensors below offload.MIN_ELEMENTS, which stay on the device by design)
    wide = dict(hidden_size=128, moe_intermediate_size=128)
    try:
        p4, per_layer = _offload_run(dev, 4, "host", "", **wide)[1:]
        p16 = _offload_run(dev, 16, "host", "", **wide)[1]
        err = (p16 - p4) / (12 * per_layer)
        return Row("offload-memory", max(err, 0.0), MEMORY_TOL, err <= MEMORY_TOL)
    except Exception as e:
        return Row("offload-memory", float("inf"), MEMORY_TOL, False, f"{type(e).__name__}: {e}"[:200])


def run_checks(device: str) -> List[Row]:
    """Every check on `device`: the op rows (custom kernels against references), then the model,
    exact and (CUDA) memory rows with the kernels the process selected."""
    dev = torch.device(device)
    selected = rev.ops.kernels()
    rev.ops.use_kernels("custom")  # the op rows test the custom kernels whatever is selected
    try:
        rows = op_rows(dev)
    finally:
        rev.ops.use_kernels(selected)
    rows += model_rows(dev)
    rows.append(exact_row(dev))
    rows.append(offload_row(dev))
    rows.append(stream_row())
    if dev.type == "cuda":
        rows.append(memory_row(dev))
        rows.append(offload_memory_row(dev))
    return rows


def format_table(rows: List[Row]) -> str:
    w = max(len(r.name) for r in rows)
    lines = [f"{'check':<{w}}  {'max error':>10}  {'tolerance':>10}  result"]
    for r in rows:
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.name:<{w}}  {r.max_error:>10.3g}  {r.tolerance:>10.3g}  {'pass' if r.passed else 'FAIL'}{note}")
    return "\n".join(lines)


def cmd_selftest(args) -> int:
    t0 = time.perf_counter()
    rows = run_checks(args.device)
    failed = [r for r in rows if not r.passed]
    hint = ""
    if any(r.name.startswith("op:") for r in failed):
        bad = ", ".join(r.name[3:] for r in failed if r.name.startswith("op:"))
        hint = (f"hint: a custom kernel disagrees with its reference ({bad}); set REVENGINE_KERNELS=aten to run on "
                "the ATen references meanwhile, and send the `revengine selftest --json` output")
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        if hint:
            print(hint, file=sys.stderr)
        return 1 if failed else 0
    print(f"revengine selftest on {args.device} (torch {torch.__version__}, kernels: {rev.ops.kernels()})")
    print(format_table(rows))
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed in {time.perf_counter() - t0:.1f} s")
    if hint:
        print(hint)
    return 1 if failed else 0


def add_arguments(p) -> None:
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
