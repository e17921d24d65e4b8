"""Layers on disk between uses (revengine.offload.LayerStore): peak resident memory of a training step
against depth, with and without the store, and the step time against its two lower bounds (the
compute of the same model without the store, and the bytes the store moves over the measured disk
bandwidth).

Workload: qwen-moe-mini (HF Qwen2-MoE: hidden 256, 16 experts top-4 + a shared expert, vocab 16384)
converted with from_hf(scheme="bdia"), at 12, 24 and 48 layers, batch 1 x 512 tokens, fp32 AdamW
stepped inside backward (revengine.optim.InBackwardOptimizer; --optimizer adamw8bit / adamw4bit and
--weights bf16: torchao's low-bit state, bf16 weights). Contenders:

    none   every layer in memory (the ordinary in-backward run)
    disk   LayerStore(tier="disk") in a temporary folder: each layer's weights are read before its
           forward and its re-run, its AdamW state before its step, and both written back after it

Each figure is a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536): build, one warm-up step (AdamW
state), then --steps measured steps; --rounds such subprocesses per figure, the two contenders
alternating, keep the fastest median step and the highest peak. Peak = the process's resident set
size at the top of a step (VmRSS before it + its peak rise, the largest over the steps: what the
machine must have); time = the median step, by default (--timing own) in subprocesses of their own
with glibc's default allocator: the memory subprocesses' MALLOC_MMAP_THRESHOLD_=65536 (needed for a
true peak) maps and unmaps every freed buffer above 64 KiB, which costs the store's step (its loads
allocate and free a layer at a time while the I/O threads run) far more than the in-memory one's
(--timing memory times the memory subprocesses instead). Bandwidth: the store's own write
(safetensors + fsync + rename) and read (reads into existing tensors) of a 64 MiB file, repeated, in
the same process. Reads usually come from the kernel's page cache (the files were just written),
which is not the process's memory.

    python benchmarks/offload.py                       # 12 24 48 layers (about 10 min on 2 cores)
    python benchmarks/offload.py --depths 12 48 --steps 2
    python benchmarks/offload.py --quick               # tiny config, seconds (the tests run it)
    python benchmarks/offload.py --clip global         # with global grad-norm clipping (two passes per step)
    python benchmarks/offload.py --device cuda         # GPU: the host tier against every layer on the GPU

With --device cuda the model lives on the GPU and the contenders are `none` and `host`
(LayerStore(tier="host"): each layer's weights and AdamW state in pinned host memory, copied to the
GPU on a copy stream for its forward, re-run and step, and back after the step). Peak = the GPU's
peak allocated memory in the step (torch.cuda.max_memory_allocated, allocated memory before it
included); bandwidth = pinned host <-> GPU copies of 256 MiB, measured in the same process.

Prints a table and PASS/FAIL lines; never asserts.
"""
import gc
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from _common import add_device, child_env, hf_contender, parser, random_ids, summary, table_header, verdict
from revengine.memory import measure_in_subprocess, measure_step, proc_status_kb

TIERS = {"cpu": ("none", "disk"), "cuda": ("none", "host")}
MIB = float(2**20)


def io_bandwidth(directory: str, mib: int = 64, rounds: int = 4) -> dict:
    """MB/s of the store's own write and read path on a file of `mib` MiB in `directory`."""
    from revengine.offload import _read_into, _write_file

    t = {"x": torch.randn(mib * 2**18)}
    path = os.path.join(directory, "bandwidth.safetensors")
    t0 = time.perf_counter()
    for _ in range(rounds):
        _write_file(path, t, {})
    w = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(rounds):
        _read_into(path, t)
    r = time.perf_counter() - t0
    os.remove(path)
    return {"write_mb_s": rounds * mib / w, "read_mb_s": rounds * mib / r}


def copy_bandwidth(device: str, mib: int = 256, rounds: int = 4) -> dict:
    """MB/s of pinned host -> GPU ("read": the store's loads) and GPU -> pinned host ("write") copies."""
    host = torch.randn(mib * 2**18).pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    r = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(rounds):
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize(device)
    w = time.perf_counter() - t0
    return {"write_mb_s": rounds * mib * MIB / 1e6 / w, "read_mb_s": rounds * mib * MIB / 1e6 / r}


def measure(tier: str, quick: bool, layers: int, seq: int, steps: int, threads=None, clip: str = "none",
            device: str = "cpu", vocab=None, optimizer: str = "adamw", weights: str = "fp32") -> dict:
    """Runs in a fresh subprocess."""
    from revengine.apps.plan import OPTIMIZERS, WEIGHT_BYTES
    from revengine.offload import LayerStore
    from revengine.optim import WEIGHT_DTYPES, InBackwardOptimizer, optimizer_class

    if threads:
        torch.set_num_threads(threads)
    for name in ("transformers", "revengine.convert"):  # imported before the baseline: runtime, not model
        importlib.import_module(name)
    # so is what the first model and step bring in: transformers' lazily imported model code, torch's
    # compute threads and math libraries (~40 MiB here, which the planner does not count), in the weights'
    # dtype (bf16 brings its own kernels)
    cuda = device != "cpu"
    warm = hf_contender("rev-bdia", True, 1).train().to(device, WEIGHT_DTYPES[weights])
    warm_ids = random_ids(warm.config.vocab_size, 1, 16).to(device)
    warm(input_ids=warm_ids, labels=warm_ids, use_cache=False).loss.backward()
    del warm
    gc.collect()

    def resident_mb():  # what the step's peak is added to: the GPU's allocated memory, or the process's RSS
        return torch.cuda.memory_allocated(device) / MIB if cuda else proc_status_kb("VmRSS")["VmRSS"] / 1024.0

    base_mb = resident_mb()  # CPU: the interpreter, torch, transformers, revengine; GPU: ~0
    model = hf_contender("rev-bdia", quick, layers, vocab=vocab).train().to(device, WEIGHT_DTYPES[weights])
    clipping = {} if clip == "none" else dict(max_grad_norm=1.0, clip=clip.replace("-", "_"))
    cls, kw = optimizer_class(optimizer, weights=weights)
    opt = InBackwardOptimizer(model.parameters(), cls, lr=1e-5, **kw, **clipping)
    ids = random_ids(model.config.vocab_size, 1, seq).to(device)
    directory = tempfile.mkdtemp(prefix="revengine-offload-")
    try:
        store = LayerStore(model, opt, tier=tier, directory=os.path.join(directory, "store"))

        def step(ids=ids):
            if clip == "global":  # a forward + backward that measures the norm, then one that steps
                return float(opt.step_two_pass(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss))
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return float(loss)

        step(ids[:, :64])  # warm-up: the AdamW state exists afterwards
        peaks, times, losses = [], [], []
        read0, written0 = store.bytes_read, store.bytes_written
        for _ in range(steps):
            before = resident_mb()
            fig = measure_step(step, device=device)
            peaks.append(before + fig.peak_delta_mb)
            times.append(fig.seconds)
            losses.append(fig.result)
        moved = (store.bytes_read - read0 + store.bytes_written - written0) / steps
        bw = io_bandwidth(directory) if tier == "disk" else copy_bandwidth(device) if tier == "host" else {}
        store.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    return {"tier": tier, "layers": layers, "seq": seq, "peak_mb": max(peaks), "seconds": statistics.median(times),
            "losses": losses, "moved_mb": moved / MIB, "params": params,
            "state_mb": (WEIGHT_BYTES[weights] + OPTIMIZERS[optimizer]) * params / MIB,
            "base_mb": base_mb, "reliable": fig.reliable, **bw}


def predicted_mb(quick: bool, layers: int, seq: int, tier: str, vocab=None, optimizer="adamw", weights="fp32") -> float:
    """`revengine plan`'s peak for this workload (weights + state held + the step's rise; no runtime)."""
    from revengine.apps import plan as planner
    from revengine.convert import hf_config_from_revmoe
    from revengine.models import RevMoEConfig

    model_cfg = RevMoEConfig.preset("tiny" if quick else "qwen-moe-mini", num_hidden_layers=layers,
                                    **({} if vocab is None else {"vocab_size": vocab}))
    shapes = planner.Shapes.from_config(hf_config_from_revmoe(model_cfg, "qwen2_moe").to_dict(), name="qwen-moe-mini")
    st = planner.Strategy.parse(f"rev-bdia/{optimizer}/{weights}/in-backward"
                                + ("" if tier == "none" else f"/offload-{tier}"))
    # the working-set options the converted model picks for this many tokens (the benchmark sets none;
    # the planner's defaults assume a batch above one expert chunk, as at the default 512 tokens)
    return planner.peak(shapes, st, 1, seq, rev_options=model_cfg.working_set(seq - 1))[2] / MIB


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 and 4 layers, 64 tokens (seconds)")
    ap.add_argument("--depths", type=int, nargs="*", default=None, help="layers (default 12 24 48)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per step (default 512)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per figure (default 3)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="times each figure is measured, the contenders alternating; the fastest median step "
                         "and the highest peak are kept (default 2: this machine's step times drift by ~20%%)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default: the preset's, 16384; a larger one makes the LM head, which the "
                         "store streams a vocabulary slice at a time, outweigh a layer)")
    ap.add_argument("--clip", default="none", choices=("none", "per-tensor", "global"),
                    help="gradient clipping to norm 1 (global: InBackwardOptimizer.step_two_pass, two passes)")
    ap.add_argument("--timing", default="own", choices=("own", "memory"),
                    help="own (default): step times from subprocesses with glibc's default allocator; memory: "
                         "from the memory subprocesses (MALLOC_MMAP_THRESHOLD_=65536)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "adamw4bit"),
                    help="the optimizer (revengine.optim.optimizer_class; default adamw)")
    ap.add_argument("--weights", default="fp32", choices=("fp32", "bf16"), help="weight dtype (default fp32)")
    add_device(ap, "cpu (the disk tier, peak resident memory) or cuda[:i] (the host tier, peak GPU memory)")
    a = ap.parse_args(argv)
    kind = "cuda" if a.device.startswith("cuda") else "cpu"
    tiers = TIERS[kind]
    away = tiers[1]  # the store's tier: "disk" on the CPU, "host" on a GPU
    depths = a.depths or ([2, 4] if a.quick else [12, 24, 48])
    seq = a.seq or (64 if a.quick else 512)
    env = child_env(a.threads)
    t0 = time.perf_counter()
    print(f"{'tiny' if a.quick else 'qwen-moe-mini'} converted with bdia, batch 1 x {seq}, {a.optimizer} "
          f"({a.weights} weights) in backward, "
          f"{a.steps} measured steps per figure, a fresh process each; depths {depths}; {a.device}"
          + ("" if a.clip == "none" else f"; clipping {a.clip}") + ("" if a.vocab is None else f"; vocabulary {a.vocab}"),
          flush=True)
    rows = {}
    for d in depths:
        for _ in range(a.rounds):
            for tier in tiers:
                job = dict(tier=tier, quick=a.quick, layers=d, seq=seq, steps=a.steps, threads=a.threads,
                           clip=a.clip, device=a.device, vocab=a.vocab, optimizer=a.optimizer, weights=a.weights)
                r = measure_in_subprocess(os.path.abspath(__file__) + ":measure", job, env=env, timeout=7200)
                if a.timing == "own" and kind == "cpu":
                    timed = measure_in_subprocess(os.path.abspath(__file__) + ":measure", job,
                                                  env={**(env or {}), "MALLOC_MMAP_THRESHOLD_": None}, timeout=7200)
                    r = dict(r, seconds=timed["seconds"], seconds_memory_run=r["seconds"],
                             losses_timing_run=timed["losses"])
                print(f"  measured {tier} at {d} layers ({time.perf_counter() - t0:.0f} s): peak {r['peak_mb']:.0f} "
                      f"MiB, {r['seconds']:.1f} s/step"
                      + (f" ({r['seconds_memory_run']:.1f} in the memory run)" if "seconds_memory_run" in r else ""),
                      flush=True)
                best = rows.get((tier, d))
                if best is not None:  # the faster step time and the higher peak (what the machine must have)
                    mem = best if best["peak_mb"] >= r["peak_mb"] else r
                    r = dict(r, seconds=min(r["seconds"], best["seconds"]), peak_mb=mem["peak_mb"],
                             base_mb=mem["base_mb"])
                rows[(tier, d)] = r
    print()
    table_header("layers", "parameters", "weights + optimizer state MiB", "peak MiB, none", f"peak MiB, {away}",
                 f"{away} / none", "s/step, none", f"s/step, {away}", "MiB moved/step", "write / read MB/s",
                 "lower bound s", f"{away} / bound")
    checks = []
    ok = []
    for d in depths:
        n, k = rows[("none", d)], rows[(away, d)]
        io_s = k["moved_mb"] * MIB / 1e6 / min(k["write_mb_s"], k["read_mb_s"])
        bound = max(n["seconds"], io_s)
        k["bound_s"] = bound
        print(f"| {d} | {n['params'] / 1e6:.1f}M | {n['state_mb']:.0f} | {n['peak_mb']:.0f} | {k['peak_mb']:.0f} | "
              f"{k['peak_mb'] / n['peak_mb']:.3f} | {n['seconds']:.1f} | {k['seconds']:.1f} | {k['moved_mb']:.0f} | "
              f"{k['write_mb_s']:.0f} / {k['read_mb_s']:.0f} | {bound:.1f} | {k['seconds'] / bound:.2f} |")
        for tier, r in (("none", n), (away, k)):
            checks.append((d, tier, r["peak_mb"] - r["base_mb"],
                           predicted_mb(a.quick, d, seq, tier, a.vocab, a.optimizer, a.weights)))
    print("\nthe planner (`revengine plan`) against the peak above the runtime's own memory ("
          + ("GPU memory allocated before the model):" if kind == "cuda" else "VmRSS before the model):"))
    table_header("layers", "tier", "measured MiB", "predicted MiB", "error")
    for d, tier, m, p in checks:
        print(f"| {d} | {tier} | {m:.0f} | {p:.0f} | {100 * (p / m - 1):+.1f}% |")
    for d in depths:
        runs = [rows[(t, d)].get(k) for t in (away, "none") for k in ("losses", "losses_timing_run")]
        diff = max(abs(x - y) for other in runs if other for x, y in zip(rows[("none", d)]["losses"], other))
        ok.append(verdict(diff == 0, f"{d} layers: the {away} run's losses equal the in-memory run's bit for bit "
                                     f"(largest difference {diff:.3g})"))
    lo, hi = rows[(away, depths[0])], rows[(away, depths[-1])]
    growth = hi["peak_mb"] / lo["peak_mb"] - 1
    ok.append(verdict(growth <= 0.10, f"{away} peak from {depths[0]} to {depths[-1]} layers: {lo['peak_mb']:.0f} -> "
                                      f"{hi['peak_mb']:.0f} MiB ({100 * growth:+.1f}%, target within 10%)"))
    worst = max(rows[(away, d)]["seconds"] / rows[(away, d)]["bound_s"] for d in depths)
    ok.append(verdict(worst <= 1.3, f"{away} step time <= 1.3 x max(compute without the store, bytes moved / "
                                    f"bandwidth): worst {worst:.2f}"))
    worst_plan = max(abs(p / m - 1) for _, _, m, p in checks)
    ok.append(verdict(worst_plan <= 0.10, f"planner within {100 * worst_plan:.1f}% of the measured peaks (target 10%)"))
    summary(t0, ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
