"""Peak memory of one training step vs depth, for modes plain, checkpoint and reversible.

The stack is one where activations dominate: additive couplings with
F, G = Linear(w, 4w) - GELU - Linear(4w, w), float32, input [N, 2w] with N >> w.
Each memory figure comes from a fresh subprocess (revengine.memory.measure_in_subprocess, with
MALLOC_MMAP_THRESHOLD_=65536): build the model, one warm-up step, grads set to None, then the
measured step (forward + backward of a loss). Step times are measured separately, in this process,
alternating the three modes (median of several steps after warm-up), at one depth.

    python benchmarks/memory_vs_depth.py               # the full benchmark (a few minutes on 2 cores)
    python benchmarks/memory_vs_depth.py --quick       # a tiny version (seconds), used by the tests

Prints a table and PASS/FAIL lines; never asserts.
"""
import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # a source checkout; an installed revengine or PYTHONPATH takes precedence

import torch  # noqa: E402
from torch import nn  # noqa: E402

import revengine  # noqa: E402
from revengine.memory import breakdown, device_arg, measure_in_subprocess, measure_step, time_alternating  # noqa: E402

MODES = ("plain", "checkpoint", "reversible")
MB = float(2**20)


def build(depth: int, width: int, mode: str, seed: int = 0) -> revengine.Sequential:
    """The benchmark stack: `depth` additive couplings, F and G = Linear(w,4w)-GELU-Linear(4w,w)."""
    torch.manual_seed(seed)

    def mlp():
        return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    layers = [revengine.AdditiveCoupling(mlp(), mlp()) for _ in range(depth)]
    return revengine.Sequential(*layers, mode=mode)


def make_input(rows: int, width: int, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2 * width, generator=g).to(device)


def clear_grads(model) -> None:
    for p in model.parameters():
        p.grad = None  # as optimizer.zero_grad() does: the next step allocates the grads


def make_step(model, x, zero_grad: bool = True):
    def step():
        if zero_grad:
            clear_grads(model)
        loss = model(x).square().mean()
        loss.backward()
        return loss.item()

    return step


def param_grad_mb(depth: int, width: int) -> float:
    """Bytes of parameters + their grads of the stack (computed), in MiB."""
    model = build(depth, width, "plain")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    b = breakdown(model)
    return (b["weights_bytes"] + b["grads_bytes"]) / MB


def measure_config(depth: int, width: int, rows: int, mode: str, device: str = "cpu") -> dict:
    """Runs in a fresh subprocess: one warm-up step, grads set to None, then the measured step.

    The grads are cleared before the measured call (not inside it), so the figure holds the grads
    the step allocates, as in a training step after optimizer.zero_grad()."""
    torch.manual_seed(0)
    model = build(depth, width, mode).to(device)
    x = make_input(rows, width, device)
    step = make_step(model, x, zero_grad=False)
    step()  # warm-up: lazy allocations, thread pools
    clear_grads(model)
    fig = measure_step(step, device=device)
    return {"depth": depth, "mode": mode, "figure": fig.as_dict(), "loss": fig.result}


def time_modes(depth: int, width: int, rows: int, device: str, rounds: int, warmup: int = 1) -> dict:
    """Median step time per mode, measured in this process, alternating the modes."""
    models = {m: build(depth, width, m).to(device) for m in MODES}
    x = make_input(rows, width, device)
    steps = {m: make_step(models[m], x) for m in MODES}
    times = time_alternating(steps, rounds, warmup=warmup, device=device)  # modes in rotation
    med = {m: statistics.median(ts) for m, ts in times.items()}
    return {"depth": depth, "rounds": rounds, "times": times, "median_s": med}


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def allocator_setting() -> str:
    v = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return "default malloc" if v is None else f"MALLOC_MMAP_THRESHOLD_={v}"


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no plot written to {path}")
        return
    depths = results["depths"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in MODES:
        ax.plot(depths, [results["peak_mb"][m][str(d)] for d in depths], marker="o", label=m)
    ax.plot(depths, [results["param_grad_mb"][str(d)] for d in depths], ls="--", color="gray", label="params+grads")
    ax.set_xlabel("depth (couplings)")
    ax.set_ylabel("peak-memory delta of one step (MiB)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_title(f"w={results['width']}, N={results['rows']}, fp32, {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="depths (default 4 8 16 32)")
    ap.add_argument("--width", type=int, default=None, help="w: stream width (input is [N, 2w]; default 64)")
    ap.add_argument("--rows", type=int, default=None, help="N: rows of the input (default 16384)")
    ap.add_argument("--time-depth", type=int, default=None, help="depth of the timing run (default 16)")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per mode (default 7)")
    ap.add_argument("--jobs", type=int, default=None, help="memory subprocesses run side by side (default 1; --quick: 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, here and in the subprocesses (default: torch's; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="a tiny version (seconds)")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda[:i] (default cpu)")
    ap.add_argument("--png", default=None, help="write a plot (needs matplotlib)")
    ap.add_argument("--json", default=None, help="dump the results as JSON")
    args = ap.parse_args(argv)

    if args.quick:
        defaults = dict(depths=[2, 4], width=16, rows=4096, time_depth=4, rounds=3, jobs=3, threads=1)
    else:
        defaults = dict(depths=[4, 8, 16, 32], width=64, rows=16384, time_depth=16, rounds=7, jobs=1, threads=None)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    depths = sorted(set(args.depths))
    child_env = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        child_env = {"OMP_NUM_THREADS": str(args.threads)}

    print(
        f"memory vs depth: additive couplings, F,G = Linear({args.width},{4 * args.width})-GELU-"
        f"Linear({4 * args.width},{args.width}), fp32, input [{args.rows}, {2 * args.width}], device {args.device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("peak-memory delta of one step (forward + backward, after one warm-up step; grads allocated in the step),")
    print("each figure from a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536")
    t_start = time.perf_counter()
    peak = {m: {} for m in MODES}
    reliable = True
    target = os.path.abspath(__file__) + ":measure_config"
    configs = [(d, m) for d in depths for m in MODES]

    def run(cfg):
        d, m = cfg
        return measure_in_subprocess(target, dict(depth=d, width=args.width, rows=args.rows, mode=m, device=args.device), env=child_env)

    # Each figure is read inside its own process, so processes running side by side (--jobs) do not
    # disturb each other's figures (only each other's speed). On CUDA they would share the device.
    jobs = 1 if args.device.startswith("cuda") else max(1, args.jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for (d, m), out in zip(configs, pool.map(run, configs)):
            peak[m][str(d)] = out["figure"]["peak_delta_mb"]
            reliable = reliable and out["figure"]["reliable"]
    pg = {str(d): param_grad_mb(d, args.width) for d in depths}

    print()
    hdr = f"{'depth':>5} | {'plain MB':>9} | {'ckpt MB':>9} | {'rev MB':>9} | {'rev/ckpt':>8} | {'rev/plain':>9} | {'params+grads MB':>15}"
    print(hdr)
    print("-" * len(hdr))
    for d in depths:
        p, c, r = (peak[m][str(d)] for m in MODES)
        rc = f"{r / c:.3f}" if c > 0 else "n/a"
        rp = f"{r / p:.3f}" if p > 0 else "n/a"
        print(f"{d:>5} | {p:>9.1f} | {c:>9.1f} | {r:>9.1f} | {rc:>8} | {rp:>9} | {pg[str(d)]:>15.2f}")
    if not reliable:
        print("warning: some figures were marked unreliable by revengine.memory.measure_step")
    mem_seconds = time.perf_counter() - t_start

    checks = []
    lo = depths[1] if len(depths) > 2 else depths[0]
    hi = depths[-1]
    if hi > lo:
        rev_growth = peak["reversible"][str(hi)] - peak["reversible"][str(lo)]
        ckpt_growth = peak["checkpoint"][str(hi)] - peak["checkpoint"][str(lo)]
        pg_growth = pg[str(hi)] - pg[str(lo)]
        ckpt_act_growth = ckpt_growth - pg_growth
        limit = pg_growth + 0.05 * ckpt_act_growth
        ok = rev_growth <= limit
        checks.append(("memory_flat", ok))
        print()
        print(
            f"{'PASS' if ok else 'FAIL'}: memory flat in depth: from depth {lo} to {hi} reversible grows "
            f"{rev_growth:.1f} MB <= params+grads growth {pg_growth:.1f} MB + 5% of checkpoint's activation "
            f"growth {ckpt_act_growth:.1f} MB = {limit:.1f} MB"
        )

    print()
    print(
        f"step time at depth {args.time_depth}, one process, modes alternating, median of {args.rounds} steps "
        f"after warm-up; allocator: {allocator_setting()}, torch threads {torch.get_num_threads()}"
    )
    load_before = _loadavg()
    timing = time_modes(args.time_depth, args.width, args.rows, args.device, args.rounds)
    load_after = _loadavg()
    med = timing["median_s"]
    for m in MODES:
        lo_t, hi_t = min(timing["times"][m]), max(timing["times"][m])
        print(
            f"  {m:<10} median {med[m] * 1e3:9.1f} ms   (x{med[m] / med['plain']:.3f} vs plain)   "
            f"min {lo_t * 1e3:9.1f} ms, max {hi_t * 1e3:9.1f} ms"
        )
    if load_before is not None:
        cores = os.cpu_count() or 1
        print(f"  load average (1 min) before/after timing: {load_before:.2f}/{load_after:.2f} on {cores} cores")
        if max(load_before, load_after) > cores + 0.5:
            print("  note: other processes competed for the cores; the timing ratios are noisy")
    timing["loadavg"] = [load_before, load_after]
    r_ck = med["reversible"] / med["checkpoint"]
    r_pl = med["reversible"] / med["plain"]
    ok_ck, ok_pl = r_ck <= 1.05, r_pl <= 1.40
    checks += [("time_vs_checkpoint", ok_ck), ("time_vs_plain", ok_pl)]
    print(f"{'PASS' if ok_ck else 'FAIL'}: step time reversible/checkpoint = {r_ck:.3f} <= 1.05")
    print(f"{'PASS' if ok_pl else 'FAIL'}: step time reversible/plain = {r_pl:.3f} <= 1.40")
    print(f"\n(memory runs {mem_seconds:.0f} s, total {time.perf_counter() - t_start:.0f} s)")

    results = {
        "depths": depths, "width": args.width, "rows": args.rows, "device": args.device,
        "peak_mb": peak, "param_grad_mb": pg, "reliable": reliable,
        "timing": {**timing, "allocator": allocator_setting(), "threads": torch.get_num_threads()},
        "checks": dict(checks),
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"results written to {args.json}")
    if args.png:
        plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
