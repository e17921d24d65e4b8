"""Peak memory of one full AdamW training step of a reversible MoE LM, by block type and mode.

The workload is "qwen-moe-mini": 24 layers, hidden 256, 8 heads, 16 routed
experts top-4 of width 176, a shared expert of width 704, vocab 16384, batch 8 x seq 1024, fp32
AdamW. Contenders: reversible_mode "plain" and "checkpoint" (per layer, the additive block), and
reversible_mode "reversible" for every block type.

Each figure comes from a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536): build the model, one
warm-up step (AdamW state allocated), grads set to None, then the measured step (forward,
backward, optimizer.step()). The steady-state peak is weights + optimizer state + the step's
peak delta; the delta holds the grads (computed: one per weight), so activations = delta - grads
(everything else the step keeps alive at its peak: activations, logits chunks, temporaries).
Step times are those of the measured step in each subprocess (one step each: indicative only).

    python benchmarks/moe_memory.py                 # 24 layers, all contenders, then 12/48 layers
    python benchmarks/moe_memory.py --quick         # a tiny version (seconds), used by the tests

Prints tables and PASS/FAIL lines; never asserts.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)

import torch  # noqa: E402

import revengine  # noqa: E402,F401
from revengine.memory import measure_in_subprocess, training_step_figures  # noqa: E402

MB = float(2**20)
from revengine.models import BLOCK_TYPES  # noqa: E402
# name -> (block_type, reversible_mode)
CONTENDERS = {"plain": ("additive", "plain"), "checkpoint": ("additive", "checkpoint")}
CONTENDERS.update({f"rev-{b}": (b, "reversible") for b in BLOCK_TYPES})


def make_config(block_type, mode, layers, quick=False, overrides=None):
    from revengine.models import RevMoEConfig

    kw = dict(block_type=block_type, reversible_mode=mode, num_hidden_layers=layers, **(overrides or {}))
    return RevMoEConfig.preset("tiny" if quick else "qwen-moe-mini", **kw)


def measure_config(name: str, layers: int, batch: int, seq: int, quick: bool = False, overrides=None,
                   activations_only: bool = False) -> dict:
    """Runs in a fresh subprocess; returns the step's figure and the static breakdown."""
    from revengine.models import RevMoEForCausalLM

    block_type, mode = CONTENDERS[name]
    torch.manual_seed(0)
    model = RevMoEForCausalLM(make_config(block_type, mode, layers, quick, overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)

    r = training_step_figures(model, opt, lambda: model(ids, labels=ids).loss, full_step=not activations_only)
    fig_act = r["figure_activations"]
    fig = r.get("figure_step", fig_act)
    fp = model.fixed_point_report()
    return {
        "name": name, "layers": layers, "figure": fig.as_dict(), "figure_activations": fig_act.as_dict(),
        "params": r["params"],
        "weights_mb": r["weights_mb"], "grads_mb": r["grads_mb"], "optimizer_mb": r["optimizer_state_mb"],
        "fixed_point": {"max_iterations": max((f["iterations"] for f in fp), default=0),
                        "max_residual": max((f["residual"] for f in fp), default=0.0)} if fp else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="depth of the main table (default 24)")
    ap.add_argument("--sweep", type=int, nargs="*", default=None, help="depths of the flatness sweep (default 12 24 48)")
    ap.add_argument("--sweep-batch", type=int, default=None, help="batch of the sweep (default: --batch)")
    ap.add_argument("--sweep-contenders", nargs="*", default=None,
                    help="contenders of the sweep (default checkpoint and every reversible block type)")
    ap.add_argument("--contenders", nargs="*", default=None, help=f"contenders of the main table (default all: {list(CONTENDERS)})")
    ap.add_argument("--batch", type=int, default=None, help="default 8")
    ap.add_argument("--seq", type=int, default=None, help="default 1024")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the subprocesses")
    ap.add_argument("--quick", action="store_true", help="a tiny model (seconds)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="RevMoEConfig overrides for every contender, e.g. loss_chunk_size=256")
    ap.add_argument("--json", default=None, help="dump the results as JSON")
    args = ap.parse_args(argv)
    # Experts recomputed in chunks of 1024 tokens in every contender (RevMoEConfig.moe_chunk_size).
    overrides = {} if args.quick else {"moe_chunk_size": 1024}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tfn\"" else value
    if args.quick:
        d = dict(layers=4, sweep=[2, 4], batch=2, seq=32, threads=1,
                 contenders=["plain", "checkpoint", "rev-revffn", "rev-additive"], sweep_contenders=["rev-additive"])
    else:
        d = dict(layers=24, sweep=[12, 24, 48], batch=8, seq=1024, threads=None, contenders=list(CONTENDERS),
                 sweep_contenders=["checkpoint", "rev-revffn", "rev-additive", "rev-leapfrog"])
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    target = os.path.abspath(__file__) + ":measure_config"
    t0 = time.perf_counter()
    workload = "tiny" if args.quick else "qwen-moe-mini"
    print(f"{workload}: {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32 AdamW, one full step "
          f"(forward + backward + optimizer.step), fresh subprocess per figure, MALLOC_MMAP_THRESHOLD_=65536, "
          f"config overrides {overrides}")

    def run(name, layers, batch=None, activations_only=False):
        r = measure_in_subprocess(target, dict(name=name, layers=layers, batch=batch or args.batch, seq=args.seq, quick=args.quick,
                                                        overrides=overrides, activations_only=activations_only),
                                  env=env, timeout=3600)
        r["delta_mb"] = r["figure"]["peak_delta_mb"]
        r["activations_mb"] = r["figure_activations"]["peak_delta_mb"]
        r["peak_mb"] = r["weights_mb"] + r["optimizer_mb"] + r["delta_mb"]
        return r

    main_rows = {}
    for name in args.contenders:
        main_rows[name] = run(name, args.layers)
        print(f"  measured {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    verdicts = []
    if main_rows:
        base_t = main_rows.get("checkpoint", next(iter(main_rows.values())))["figure"]["seconds"]
        ckpt_act = main_rows["checkpoint"]["activations_mb"] if "checkpoint" in main_rows else None
        print()
        print("| contender | weights | optimizer | grads | activations | steady-state peak | act / ckpt | time / ckpt | fixed point (iters, residual) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in main_rows.items():
            ratio = f"{r['activations_mb'] / ckpt_act:.3f}" if ckpt_act else "-"
            fp = r["fixed_point"]
            fps = f"{fp['max_iterations']}, {fp['max_residual']:.1e}" if fp else "-"
            print(f"| {name} | {r['weights_mb']:.0f} | {r['optimizer_mb']:.0f} | {r['grads_mb']:.0f} | {r['activations_mb']:.1f} | "
                  f"{r['peak_mb']:.0f} | {ratio} | {r['figure']['seconds'] / base_t:.2f} | {fps} |")
        print("(MB = MiB; activations = peak delta of forward + backward with grads pre-allocated; peak = weights + "
              "optimizer + full-step delta; time from one measured step per subprocess)")
        if ckpt_act:
            for name, r in main_rows.items():
                if name.startswith("rev-"):
                    ok = r["activations_mb"] <= 0.5 * ckpt_act
                    verdicts.append(ok)
                    print(f"{'PASS' if ok else 'FAIL'}: {name} activations {r['activations_mb']:.1f} MB <= 0.5 x checkpoint "
                          f"({0.5 * ckpt_act:.1f} MB)")

    if args.sweep:
        sweep_batch = args.sweep_batch or args.batch
        sweep = {name: {} for name in args.sweep_contenders}
        for layers in args.sweep:
            for name in args.sweep_contenders:
                if layers == args.layers and name in main_rows and sweep_batch == args.batch:
                    sweep[name][layers] = main_rows[name]
                else:
                    sweep[name][layers] = run(name, layers, sweep_batch, activations_only=True)
                    print(f"  measured {name} at {layers} layers ({time.perf_counter() - t0:.0f} s)", flush=True)
        print()
        print(f"activations (MB) by depth, batch {sweep_batch} x seq {args.seq}:")
        print("| contender | " + " | ".join(f"{d} layers" for d in args.sweep) + " |")
        print("|---|" + "---|" * len(args.sweep))
        for name, rows in sweep.items():
            print(f"| {name} | " + " | ".join(f"{rows[d]['activations_mb']:.1f}" for d in args.sweep) + " |")
        lo, hi = min(args.sweep), max(args.sweep)
        for name, rows in sweep.items():
            if not name.startswith("rev-"):
                continue
            growth = rows[hi]["activations_mb"] - rows[lo]["activations_mb"]
            # Flat: from lo to hi layers, growth below 10% of the checkpoint activations at lo layers
            # (what checkpointing adds per layer is its stored layer inputs; reversible stores none).
            ref = sweep.get("checkpoint", {}).get(lo, rows[lo])["activations_mb"]
            ok = growth <= 0.1 * ref
            verdicts.append(ok)
            print(f"{'PASS' if ok else 'FAIL'}: {name} grows {growth:+.1f} MB from {lo} to {hi} layers "
                  f"(allowance {0.1 * ref:.1f} MB)")
    print(f"total {time.perf_counter() - t0:.0f} s; {sum(verdicts)}/{len(verdicts)} PASS")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"main": main_rows, "args": vars(args)}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
