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
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)

import torch  # noqa: E402

import revengine  # noqa: E402,F401
from revengine.memory import breakdown, device_arg, measure_in_subprocess, measure_step  # noqa: E402

sys.path.insert(0, HERE)
from hf_memory import REV_OPTIONS, hf_model, parse_options  # noqa: E402

FLOOR_SLACK = 1.10
TARGET = 0.42


def measure(name: str, quick: bool, layers: int, batch: int, seq: int, overrides=None, device: str = "cpu") -> dict:
    """Runs in a fresh subprocess: one contender's steady-state step."""
    from revengine.convert import from_hf
    from revengine.optim import InBackwardOptimizer

    model = hf_model(quick, layers)
    fused = name.endswith("-fused")
    if name == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        scheme = name[4:].removesuffix("-fused")
        hf = model
        model = from_hf(hf, scheme=scheme, **(overrides or {}))
        del hf
    model.to(device).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scheme", default="leapfrog", help="conversion scheme (default leapfrog)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--sweep", type=int, nargs="*", default=None, help="depths of the fused sweep (default 12 24 48)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--sweep-batch", type=int, default=None, help="batch of the sweep (default --batch)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", type=device_arg, default="cpu",
                    help="cpu (peak RSS) or cuda[:i] (peak allocated GPU memory); default cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip the hf-ckpt contender")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                    help=f"RevMoEConfig options of the converted models (default {REV_OPTIONS}, as in hf_memory.py)")
    a = ap.parse_args(argv)
    overrides = parse_options(a.set)
    layers = a.layers or (4 if a.quick else 24)
    batch = a.batch or (2 if a.quick else 8)
    seq = a.seq or (32 if a.quick else 1024)
    sweep = a.sweep if a.sweep is not None else ([2, 4] if a.quick else [12, 24, 48])
    threads = a.threads or (1 if a.quick else None)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
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
    print("| contender | weights | AdamW | step delta | steady-state peak | / floor | / hf-ckpt |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['weights_mb']:.0f} | {r['optimizer_mb']:.0f} | {r['delta_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / floor:.3f} | {r['peak_mb'] / base['peak_mb']:.3f} |" if base else
              f"| {n} | {r['weights_mb']:.0f} | {r['optimizer_mb']:.0f} | {r['delta_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / floor:.3f} | - |")
    print(f"floor = weights + AdamW + one layer's working set ({one['delta_mb']:.0f} MiB, the step delta at 1 layer) "
          f"= {floor:.0f} MiB")
    ok = [rows[fused]["peak_mb"] <= FLOOR_SLACK * floor]
    print(f"{'PASS' if ok[-1] else 'FAIL'}: {fused} peak {rows[fused]['peak_mb']:.0f} MiB <= {FLOOR_SLACK} x floor "
          f"({FLOOR_SLACK * floor:.0f} MiB)")
    if base:
        ratio = rows[fused]["peak_mb"] / base["peak_mb"]
        ok.append(ratio <= TARGET)
        print(f"{'PASS' if ok[-1] else 'FAIL'}: {fused} peak = {ratio:.3f} x hf-ckpt; target <= {TARGET} (paper: 0.51)")
    if sweep:
        sb = a.sweep_batch or batch
        print()
        print(f"{fused} by depth (batch {sb} x seq {seq}):")
        print("| layers | weights + AdamW | step delta | peak | floor | peak / floor |")
        print("|---|---|---|---|---|---|")
        one_s = one if sb == batch else run(fused, 1, sb)
        for n_layers in sweep:
            r = rows[fused] if (n_layers == layers and sb == batch) else run(fused, n_layers, sb)
            fl = r["weights_mb"] + r["optimizer_mb"] + one_s["delta_mb"]
            ok.append(r["peak_mb"] <= FLOOR_SLACK * fl)
            print(f"| {n_layers} | {r['weights_mb'] + r['optimizer_mb']:.0f} | {r['delta_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{fl:.0f} | {r['peak_mb'] / fl:.3f} |")
    print(f"total {time.perf_counter() - t0:.0f} s; {sum(ok)}/{len(ok)} PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
