"""The memory floor: a converted reversible model with the optimizer step inside backward
(revengine.optim.InBackwardOptimizer), against the physical floor and HF gradient checkpointing.

Workload: "qwen-moe-mini" built as HF Qwen2MoeForCausalLM (as in benchmarks/hf_memory.py), batch 8
x seq 1024, fp32 AdamW. Each figure is a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536); one
warm-up step, then one measured full step (forward + backward, which steps every parameter).

    steady-state peak = weights + AdamW state + the step's peak delta (no grads survive a step)
    floor             = weights + AdamW state + one layer's working set, the latter measured as
                        the step delta of the same model cut to 1 layer (embedding, LM-head CE
                        chunk and one layer's recompute: what no schedule can avoid)

Contenders: hf-ckpt (HF gradient checkpointing, torch AdamW), rev-<scheme> (converted, torch
AdamW) and rev-<scheme>-fused (converted, AdamW inside backward).

    python benchmarks/floor.py                       # qwen-moe-mini + a depth sweep (12, 24, 48)
    python benchmarks/floor.py --quick               # tiny config, seconds (tests)
    python benchmarks/floor.py --device cuda         # peak allocated GPU memory instead of peak RSS

Prints tables and PASS/FAIL lines (peak within 10% of the floor; converted + fused <= 0.42 x
hf-ckpt); never asserts.
"""
import os
import sys
import time

import torch

from _common import (
    MEMORY_DEVICE_HELP, add_device, add_set_option, hf_contender, hf_workload, parser, random_ids, summary, table_header,
    verdict,
)
from revengine.memory import breakdown, measure_in_subprocess, measure_step

FLOOR_SLACK = 1.10
TARGET = 0.42


def measure(name: str, quick: bool, layers: int, batch: int, seq: int, overrides=None, device: str = "cpu") -> dict:
    """Runs in a fresh subprocess: one contender's steady-state step."""
    from revengine.optim import InBackwardOptimizer

    fused = name.endswith("-fused")
    model = hf_contender(name, quick, layers, overrides)
    model.to(device).train()
    ids = random_ids(model.config.vocab_size, batch, seq, device)
    opt = (InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5) if fused
           else torch.optim.AdamW(model.parameters(), lr=1e-5))

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()  # fused: every parameter is stepped in here
        if not fused:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up: optimizer state
    b = breakdown(model, opt)
    fig = measure_step(step, device=device)
    return {"name": name, "layers": layers, "weights_mb": b["weights_mb"], "optimizer_mb": b["optimizer_state_mb"],
            "delta_mb": fig.peak_delta_mb, "peak_mb": b["weights_mb"] + b["optimizer_state_mb"] + fig.peak_delta_mb,
            "seconds": fig.seconds}


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scheme", default="leapfrog", help="conversion scheme (default leapfrog)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--sweep", type=int, nargs="*", default=None, help="depths of the fused sweep (default 12 24 48)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--sweep-batch", type=int, default=None, help="batch of the sweep (default --batch)")
    ap.add_argument("--threads", type=int, default=None)
    add_device(ap, MEMORY_DEVICE_HELP)
    ap.add_argument("--no-hf", action="store_true", help="skip the hf-ckpt contender")
    add_set_option(ap, ", as in hf_memory.py")
    a = ap.parse_args(argv)
    layers, batch, seq, overrides, env = hf_workload(a)
    sweep = a.sweep if a.sweep is not None else ([2, 4] if a.quick else [12, 24, 48])
    t0 = time.perf_counter()

    def run(name, n_layers, b=None):
        r = measure_in_subprocess(os.path.abspath(__file__) + ":measure",
                                  dict(name=name, quick=a.quick, layers=n_layers, batch=b or batch, seq=seq,
                                       overrides=overrides, device=a.device),
                                  env=env, timeout=3600)
        print(f"  measured {name} at {n_layers} layers, batch {b or batch} ({time.perf_counter() - t0:.0f} s): "
              f"peak {r['peak_mb']:.0f} MiB", flush=True)
        return r

    fused = f"rev-{a.scheme}-fused"
    print(f"{'tiny' if a.quick else 'qwen-moe-mini'} (HF Qwen2-MoE, converted with scheme {a.scheme}): {layers} layers, "
          f"batch {batch} x seq {seq}, fp32 AdamW, steady-state step on {a.device}, fresh subprocess per figure; converted models "
          f"with {overrides}", flush=True)
    names = ([] if a.no_hf else ["hf-ckpt"]) + [f"rev-{a.scheme}", fused]
    rows = {n: run(n, layers) for n in names}
    one = run(fused, 1)
    floor = rows[fused]["weights_mb"] + rows[fused]["optimizer_mb"] + one["delta_mb"]
    base = rows.get("hf-ckpt")
    print()
    table_header("contender", "weights", "AdamW", "step delta", "steady-state peak", "/ floor", "/ hf-ckpt")
    for n, r in rows.items():
        print(f"| {n} | {r['weights_mb']:.0f} | {r['optimizer_mb']:.0f} | {r['delta_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / floor:.3f} | {r['peak_mb'] / base['peak_mb']:.3f} |" if base else
              f"| {n} | {r['weights_mb']:.0f} | {r['optimizer_mb']:.0f} | {r['delta_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / floor:.3f} | - |")
    print(f"floor = weights + AdamW + one layer's working set ({one['delta_mb']:.0f} MiB, the step delta at 1 layer) "
          f"= {floor:.0f} MiB")
    ok = [verdict(rows[fused]["peak_mb"] <= FLOOR_SLACK * floor,
                  f"{fused} peak {rows[fused]['peak_mb']:.0f} MiB <= {FLOOR_SLACK} x floor ({FLOOR_SLACK * floor:.0f} MiB)")]
    if base:
        ratio = rows[fused]["peak_mb"] / base["peak_mb"]
        ok.append(verdict(ratio <= TARGET, f"{fused} peak = {ratio:.3f} x hf-ckpt; target <= {TARGET} (paper: 0.51)"))
    if sweep:
        sb = a.sweep_batch or batch
        print()
        print(f"{fused} by depth (batch {sb} x seq {seq}):")
        table_header("layers", "weights + AdamW", "step delta", "peak", "floor", "peak / floor")
        one_s = one if sb == batch else run(fused, 1, sb)
        for n_layers in sweep:
            r = rows[fused] if (n_layers == layers and sb == batch) else run(fused, n_layers, sb)
            fl = r["weights_mb"] + r["optimizer_mb"] + one_s["delta_mb"]
            ok.append(r["peak_mb"] <= FLOOR_SLACK * fl)
            print(f"| {n_layers} | {r['weights_mb'] + r['optimizer_mb']:.0f} | {r['delta_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{fl:.0f} | {r['peak_mb'] / fl:.3f} |")
    summary(t0, ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
