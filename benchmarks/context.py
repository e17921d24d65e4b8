"""Long context: peak memory of a training step against the number of tokens, by depth, for a reversible
model, the same model checkpointed, and Hugging Face with gradient checkpointing.

Workload: "qwen-moe-mini" (hidden 256, 16 experts top-4 + a shared expert, vocab 16384) built as HF
Qwen2MoeForCausalLM with 12, 24 and 48 layers, batch 1, one full training step with AdamW (fp32)
stepping every parameter inside backward (revengine.optim.InBackwardOptimizer, for every contender),
at sequence lengths 1K, 2K, 4K and 8K (16K with --long). Contenders:

    rev        from_hf(hf_model, scheme="bdia"): reversible_mode="reversible", no other option (the
               working-set options are chosen from the batch's tokens: RevMoEConfig.working_set)
    ckpt       the same model with reversible_mode="checkpoint" (torch.utils.checkpoint per layer):
               only reversibility differs (same chunked loss, same kernels, same in-backward AdamW)
    hf-ckpt    the HF model with gradient_checkpointing_enable() (non-reentrant)

Each figure is a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536): build, one warm-up step on the first
64 tokens (the AdamW state exists afterwards; the step's cost does not depend on it), then the
measured step: peak = weights + AdamW state + the step's peak RSS delta. Per contender and depth a
least-squares line peak = a + b * tokens, and b between the two longest lengths (the bytes each further
token of context costs: at short lengths part of it hides under fixed-size peaks), which extrapolates
the longest context that fits a memory budget (4 GiB) from the longest measured length.

    python benchmarks/context.py                  # the full grid (hours on 2 cores: see --jobs)
    python benchmarks/context.py --long           # + 16K tokens
    python benchmarks/context.py --quick          # a tiny config (seconds), used by the tests
    python benchmarks/context.py --breakdown      # + revengine's bytes per token split into parts (profiled)

Attention costs tokens^2 FLOPs: every attention call here is torch's flash kernel with is_causal
(no mask, the blocks above the diagonal skipped), the warm-up step is 64 tokens long, and --jobs N
runs N figures side by side with 2/N threads each (the figures are read inside each process).
Prints tables and PASS/FAIL lines; never asserts.
"""
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from _common import child_env, hf_model, parser, pyplot, random_ids, summary, table_header, verdict

CONTENDERS = ("rev", "ckpt", "hf-ckpt")
LABELS = {"rev": "revengine (reversible)", "ckpt": "same model, checkpoint mode", "hf-ckpt": "HF + gradient checkpointing"}
MIB = float(2**20)
KB = 1000.0
WARMUP_TOKENS = 64


def build(name: str, quick: bool, layers: int, options=None):
    """Contender `name` of hf_model(quick, layers)."""
    from revengine.convert import from_hf

    hf = hf_model(quick, layers)
    if name == "hf-ckpt":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return hf
    mode = {"rev": "reversible", "ckpt": "checkpoint"}[name]
    model = from_hf(hf, scheme="bdia", reversible_mode=mode, **(options or {}))
    del hf
    return model


def measure(name: str, quick: bool, layers: int, seq: int, options=None, threads=None) -> dict:
    """Runs in a fresh subprocess: one contender's steady-state step at batch 1 x seq tokens."""
    from revengine.memory import breakdown, measure_step
    from revengine.optim import InBackwardOptimizer

    if threads:
        torch.set_num_threads(threads)
    model = build(name, quick, layers, options).train()
    ids = random_ids(model.config.vocab_size, 1, seq)
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5)

    def step(ids=ids):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()  # every parameter is stepped in here
        return float(loss)

    step(ids[:, :WARMUP_TOKENS])  # warm-up: AdamW state, lazy allocations
    b = breakdown(model, opt)
    fig = measure_step(step)
    return {"name": name, "layers": layers, "seq": seq, "weights_mb": b["weights_mb"],
            "optimizer_mb": b["optimizer_state_mb"], "delta_mb": fig.peak_delta_mb,
            "peak_mb": b["weights_mb"] + b["optimizer_state_mb"] + fig.peak_delta_mb, "seconds": fig.seconds,
            "loss": fig.result, "reliable": fig.reliable}


def fit(points):
    """Least squares peak = a + b * tokens over [(tokens, peak_bytes)]: (a, b)."""
    n = len(points)
    if n == 1:
        return 0.0, points[0][1] / points[0][0]
    mx = sum(t for t, _ in points) / n
    my = sum(p for _, p in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    b = sum((t - mx) * (p - my) for t, p in points) / sxx
    return my - b * mx, b


# -- revengine's bytes per token, part by part (--breakdown) ---------------------------------------
# Live allocations at the step's peak, by the op stack that made them (torch.profiler's allocation
# events), sorted into parts by these keywords (first match).
PARTS = (
    ("stream buffers", ("fixed_quantize", "fixed_dequantize", "RevengineLayerBackward/aten::clone",
                        "RevengineLayerBackward/aten::zeros_like")),
    ("per-layer records", ("bdia_step", "_to_copy")),
    ("attention", ("scaled_dot_product", "SliceBackward", "rsqrt", "CatBackward")),
    ("MoE", ("moe_", "GroupedMm", "topk", "scatter", "softmax")),
)


def _part(stack: str) -> str:
    for part, keys in PARTS:
        if any(k in stack for k in keys):
            return part
    return "layer grads, loss and other"


def profile_parts(quick: bool, seq: int, threads=None) -> dict:
    """Runs in a fresh subprocess: one step of the 1-layer reversible model at `seq` tokens under
    torch.profiler; the allocations live at the peak of the allocator's total, by part (bytes)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from revengine.optim import InBackwardOptimizer

    if threads:
        torch.set_num_threads(threads)
    model = build("rev", quick, 1).train()
    ids = random_ids(model.config.vocab_size, 1, seq)
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5)  # noqa: F841 (its hooks step)

    def step(ids=ids):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    step(ids[:, :WARMUP_TOKENS])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = []

    def walk(node, stack):
        if node.typed[0] == _EventType.Allocation:
            f = node.typed[1]
            allocs.append((node.start_time_ns, f.ptr, f.alloc_size, f.total_allocated, "/".join(stack[-4:])))
            return
        for c in node.children:
            walk(c, stack + [node.name])

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    allocs.sort()
    peak = max(allocs, key=lambda x: x[3])
    live = {}
    for t, ptr, size, _total, stack in allocs:
        if t > peak[0]:
            break
        if size > 0:
            live[ptr] = (size, stack)
        else:
            live.pop(ptr, None)
    parts = {}
    for size, stack in live.values():
        parts[_part(stack)] = parts.get(_part(stack), 0) + size
    return {"seq": seq, "parts": parts, "peak_stack": peak[4]}


def parts_per_token(quick: bool, layers: int, profiled: dict, vocab_fixed: dict) -> dict:
    """Bytes per token by part at `layers` layers: the profiled 1-layer step's parts at two lengths
    (their difference over the tokens), plus the per-layer records of the other layers-1 layers,
    computed: BDIA's dropped bits (k per element, packed) and the replayed top-k ids (uint8)."""
    from revengine.convert import revmoe_config_from_hf
    from revengine.integrators import BDIA

    cfg = revmoe_config_from_hf(hf_model(quick, 1).config, "bdia")
    per_layer = cfg.hidden_size * BDIA.exact_shift(cfg.bdia_gamma) // 8 + cfg.num_experts_per_tok
    (s1, p1), (s2, p2) = sorted(profiled.items())
    names = [p for p, _ in PARTS] + ["layer grads, loss and other"]
    out = {n: (p2.get(n, 0) - p1.get(n, 0)) / (s2 - s1) for n in names}
    out["per-layer records"] = out.get("per-layer records", 0) + (layers - 1) * per_layer
    return out


def _ratio(x: float, y: float) -> float:
    """x / y, infinite where y is not positive (a fitted slope can come out 0 or below when the lengths
    measured are too short for the step's noise, as in --quick on a busy machine)."""
    return x / y if y > 0 else float("inf")


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 layers, 32 and 64 tokens (seconds)")
    ap.add_argument("--long", action="store_true", help="also 16K tokens")
    ap.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths (default 1024 2048 4096 8192)")
    ap.add_argument("--depths", type=int, nargs="*", default=None, help="layers (default 12 24 48)")
    ap.add_argument("--contenders", nargs="*", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--budget-gib", type=float, default=4.0, help="memory budget for the longest context (default 4)")
    ap.add_argument("--jobs", type=int, default=1, help="figures measured side by side (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per figure (default: 2 / jobs)")
    ap.add_argument("--breakdown", action="store_true", help="revengine's bytes per token by part")
    ap.add_argument("--png", default=None, help="plot of peak against tokens (needs matplotlib)")
    ap.add_argument("--json", default=None, help="dump the results as JSON")
    ap.add_argument("--resume", default=None, help="a --json file of an earlier run: its figures are reused")
    a = ap.parse_args(argv)
    lengths = a.lengths or ([32, 64] if a.quick else [1024, 2048, 4096, 8192] + ([16384] if a.long else []))
    depths = a.depths or ([2] if a.quick else [12, 24, 48])
    threads = a.threads or (1 if a.quick else max(1, (os.cpu_count() or 2) // max(1, a.jobs)))
    env = child_env(threads)
    budget = a.budget_gib * 2**30
    t0 = time.perf_counter()
    print(f"{'tiny' if a.quick else 'qwen-moe-mini'} (HF Qwen2-MoE; converted with bdia), batch 1, AdamW inside "
          f"backward, one full step per figure in a fresh process (MALLOC_MMAP_THRESHOLD_=65536), {threads} "
          f"threads x {a.jobs} jobs; lengths {lengths}, depths {depths}", flush=True)

    done = {}
    if a.resume and os.path.isfile(a.resume):
        with open(a.resume) as fh:
            for r in json.load(fh)["figures"]:
                done[(r["name"], r["layers"], r["seq"])] = r
    configs = [(n, d, s) for d in depths for n in a.contenders for s in lengths if (n, d, s) not in done]
    figures = dict(done)

    def run(cfg):
        n, d, s = cfg
        r = measure_in_subprocess(os.path.abspath(__file__) + ":measure",
                                  dict(name=n, quick=a.quick, layers=d, seq=s, threads=threads), env=env, timeout=7200)
        print(f"  measured {n} at {d} layers, {s} tokens ({time.perf_counter() - t0:.0f} s): peak {r['peak_mb']:.0f} "
              f"MiB (delta {r['delta_mb']:.1f}, step {r['seconds']:.0f} s)", flush=True)
        return r

    from revengine.memory import measure_in_subprocess

    def save():
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"figures": list(figures.values()), "lengths": lengths, "depths": depths}, fh, indent=1)

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for cfg, r in zip(configs, pool.map(run, configs)):
            figures[cfg] = r
            save()

    # -- the fit: bytes per token and the longest context in the budget --------------------------------
    fits = {}
    for n in a.contenders:
        for d in depths:
            pts = [(s, figures[(n, d, s)]["peak_mb"] * MIB) for s in lengths if (n, d, s) in figures]
            if pts:
                a0, b = fit(pts)
                resid = max(abs(p - (a0 + b * s)) for s, p in pts) / MIB
                # The marginal cost between the two longest lengths: at short lengths part of a token's
                # cost hides under fixed-size peaks (vocabulary-sized grads), so the line through all
                # points underestimates what each further token costs. The longest context extrapolates
                # from the longest measured length with it.
                (s1, p1), (s2, p2) = pts[-2:] if len(pts) > 1 else ((0, a0), pts[-1])
                bm = (p2 - p1) / (s2 - s1)
                fits[(n, d)] = {"a_mb": a0 / MIB, "b_fit": b, "b": bm, "residual_mb": resid,
                                "longest": int(s2 + (budget - p2) / bm) if bm > 0 else None,
                                "peak_mb": {s: figures[(n, d, s)]["peak_mb"] for s in lengths if (n, d, s) in figures}}
    print()
    print(f"peak = a + b x tokens: least squares over {lengths} (a, b fit) and b between the two longest lengths "
          f"(b); longest context at {a.budget_gib:g} GiB = the longest length + (budget - its peak) / b (batch 1):")
    table_header("contender", "layers", *[f"peak {s}" for s in lengths], "a (MiB)", "b fit (KB/token)",
                 "fit residual (MiB)", "b (KB/token)", f"longest at {a.budget_gib:g} GiB")
    for (n, d), f in fits.items():
        peaks = [f"{f['peak_mb'][s]:.0f}" if s in f["peak_mb"] else "-" for s in lengths]
        longest = f"{f['longest']:,}" if f["longest"] else "-"
        print(f"| {n} | {d} | " + " | ".join(peaks) + f" | {f['a_mb']:.0f} | {f['b_fit'] / KB:.1f} | "
              f"{f['residual_mb']:.1f} | {f['b'] / KB:.1f} | {longest} |")
    print("(MiB; KB = 1000 bytes; a holds the weights and AdamW state)")

    print()
    table_header("layers", *[f"{n}: KB/token" for n in a.contenders], *[f"{n}: longest" for n in a.contenders])
    for d in depths:
        cells = [f"{fits[(n, d)]['b'] / KB:.1f}" if (n, d) in fits else "-" for n in a.contenders]
        cells += [f"{fits[(n, d)]['longest']:,}" if (n, d) in fits and fits[(n, d)]["longest"] else "-"
                  for n in a.contenders]
        print(f"| {d} | " + " | ".join(cells) + " |")

    ok = []
    hi, lo = max(depths), min(depths)
    if ("rev", hi) in fits:
        rb = fits[("rev", hi)]["b"]
        print()
        for other, share, longer in (("ckpt", 4, 3), ("hf-ckpt", 8, 8)):
            if (other, hi) in fits:
                ob = fits[(other, hi)]["b"]
                ok.append(verdict(rb <= ob / share, f"{hi} layers: revengine {rb / KB:.1f} KB/token = 1/{_ratio(ob, rb):.2f} of "
                                                   f"{other} ({ob / KB:.1f}); target <= 1/{share}"))
                rl, ol = fits[("rev", hi)]["longest"] or 0, fits[(other, hi)]["longest"] or 0
                if ol > 0:
                    ok.append(verdict(rl >= longer * ol, f"{hi} layers: longest context at {a.budget_gib:g} GiB: "
                                                         f"revengine {rl:,} = {rl / ol:.2f} x {other} ({ol:,}); "
                                                         f"target >= {longer} x"))
        if ("rev", lo) in fits and lo < hi:
            lb = fits[("rev", lo)]["b"]
            ok.append(verdict(rb <= 1.10 * lb, f"revengine's bytes per token from {lo} to {hi} layers: "
                                               f"{lb / KB:.1f} -> {rb / KB:.1f} KB (+{100 * (_ratio(rb, lb) - 1):.0f}%); "
                                               "target <= +10%"))
    if a.breakdown:
        two = lengths[-2:] if len(lengths) > 1 else lengths
        profiled = {}
        for s in two:
            r = measure_in_subprocess(os.path.abspath(__file__) + ":profile_parts",
                                      dict(quick=a.quick, seq=s, threads=threads), env=env, timeout=7200)
            profiled[s] = r["parts"]
            print(f"  profiled the 1-layer model at {s} tokens; peak at {r['peak_stack']}", flush=True)
        print()
        print(f"revengine's bytes per token by part: allocations live at the peak of a 1-layer step (torch.profiler) "
              f"between {two[0]} and {two[-1]} tokens, plus the records of the other layers (computed); KB = 1000 bytes:")
        table_header("layers", "part", "KB/token")
        for d in depths:
            parts = parts_per_token(a.quick, d, profiled, {})
            for part, v in parts.items():
                print(f"| {d} | {part} | {v / KB:.2f} |")
            meas = f"{fits[('rev', d)]['b'] / KB:.1f}" if ("rev", d) in fits else "-"
            print(f"| {d} | sum (measured b) | {sum(parts.values()) / KB:.2f} ({meas}) |")
    if a.png:
        plot(figures, a.contenders, depths, lengths, a.png, a.budget_gib)
    if a.json:
        save()
        with open(a.json) as fh:
            out = json.load(fh)
        out["fits"] = [{"name": n, "layers": d, **f} for (n, d), f in fits.items()]
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    summary(t0, ok)
    return 0


def plot(figures, contenders, depths, lengths, path, budget_gib):
    plt = pyplot()
    if plt is None:
        print(f"note: matplotlib is not installed; no plot written to {path}")
        return
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.8), sharey=True, squeeze=False)
    colors = {"rev": "tab:green", "ckpt": "tab:orange", "hf-ckpt": "tab:red"}
    for ax, d in zip(axes[0], depths):
        for n in contenders:
            pts = [(s, figures[(n, d, s)]["peak_mb"]) for s in lengths if (n, d, s) in figures]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[n], label=LABELS[n])
        ax.axhline(budget_gib * 1024, ls="--", color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{s // 1024}K" if s >= 1024 else str(s) for s in lengths])
        ax.set_title(f"{d} layers")
        ax.set_xlabel("tokens (batch 1)")
    axes[0][0].set_ylabel("steady-state peak of one step (MiB)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("qwen-moe-mini, AdamW inside backward, CPU peak RSS")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
