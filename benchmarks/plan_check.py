"""`revengine plan`'s predictions against measured peaks: for each model x sequence length x
training strategy, one full fine-tuning step in a fresh process (CPU, peak RSS), beside the
planner's figure for the same shapes.

    python benchmarks/plan_check.py --jobs 3 --threads 1 # qwen-moe-mini and smollm2-moe, seq 256/512/1024 (+2048)
    python benchmarks/plan_check.py --results r.json     # keep the measurements; --reuse reads them back
    python benchmarks/plan_check.py --results benchmarks/plan_check_results.json --reuse   # the README's table
    python benchmarks/plan_check.py --quick              # a tiny config, seconds (the tests run it)

Models (random weights of the real shapes: memory does not depend on the values):
    qwen-moe-mini  Qwen2-MoE, 24 layers, hidden 256, 16 experts top-4 + shared expert, vocab 16384 (batch 2)
    smollm2-moe    SmolLM2-135M-Instruct upcycled to Mixtral, 4 experts top-2, hidden 576, vocab 49152,
                   tied embeddings, here with 12 of its 30 layers (fp32 AdamW on all 30 would need 6 GB
                   before activations; batch 1; also seq 2048, where fewer rows peak in the optimizer step)
Strategies measured:
    hf-plain        HF model, torch.optim.AdamW
    hf-checkpoint   the same with gradient_checkpointing_enable() (non-reentrant)
    rev-bdia        from_hf(scheme="bdia", moe_chunk_size=256, attention_recompute=True; the loss chunk its own: 64), AdamW
    rev-bdia-ib     the same with revengine.optim.InBackwardOptimizer(AdamW)
    rev-bdia-8bit   rev-bdia-ib with bf16 weights (stochastic rounding) and 8-bit AdamW (revengine.optim)
    rev-bdia-4bit   the same with 4-bit AdamW
Each child: build, one warm-up step (optimizer state allocated), grads set to None, then one measured
step; measured peak = weights + optimizer state + the step's peak RSS delta (MALLOC_MMAP_THRESHOLD_=65536).
The planner's constants were fitted on qwen-moe-mini at seq 256 and 1024 (`--fit` prints the
least-squares refit); seq 512, smollm2-moe and the low-bit rows were not used to fit. Prints a table, never asserts.
"""
import concurrent.futures
import json
import os
import sys
import time

import torch

from _common import child_env, parser, random_ids, table_header, verdict
from revengine.apps import plan as planner
from revengine.memory import measure_in_subprocess, measure_step

STRATEGIES = {"hf-plain": "hf-plain/adamw/fp32", "hf-checkpoint": "hf-checkpoint/adamw/fp32",
              "rev-bdia": "rev-bdia/adamw/fp32", "rev-bdia-ib": "rev-bdia/adamw/fp32/in-backward",
              "rev-bdia-8bit": "rev-bdia/adamw8bit/bf16/in-backward",
              "rev-bdia-4bit": "rev-bdia/adamw4bit/bf16/in-backward"}
# smollm2-moe also at 2048 tokens: with batch 1 its shorter rows peak in the optimizer step
MODELS = {"qwen-moe-mini": dict(layers=24, batch=2, seqs=[256, 512, 1024]),
          "smollm2-moe": dict(layers=12, batch=1, seqs=[256, 512, 1024, 2048])}
QUICK = {"qwen-moe-mini": dict(layers=2, batch=1, hidden_size=64, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64, intermediate_size=64, vocab_size=512,
                               num_attention_heads=4, num_key_value_heads=4)}
TOLERANCE = 0.10


def model_config(model: str, layers: int, overrides=None) -> dict:
    cfg = planner.read_config_json(planner.resolve_config(model))
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    return dict(cfg, num_hidden_layers=layers, **(overrides or {}))


def measure(model: str, strategy: str, batch: int, seq: int, layers: int, overrides=None) -> dict:
    """Runs in a fresh subprocess: one steady-state training step's peak."""
    import transformers as tf

    from revengine.convert import from_hf
    from revengine.memory import breakdown
    from revengine.optim import InBackwardOptimizer, optimizer_class

    st = planner.Strategy.parse(STRATEGIES[strategy])
    cfg = model_config(model, layers, overrides)
    torch.manual_seed(0)
    net = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    if st.base == "hf-checkpoint":
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif st.scheme:
        hf = net
        net = from_hf(hf, scheme=st.scheme, **planner.REV_DEFAULTS)
        del hf
    net.train()
    if st.weights == "bf16":
        net.to(torch.bfloat16)
    cls, kw = optimizer_class(st.optimizer, weights=st.weights)
    fused = st.in_backward
    opt = (InBackwardOptimizer(net.parameters(), cls, lr=1e-6, **kw) if fused
           else cls(net.parameters(), lr=1e-6, **kw))
    ids = random_ids(net.config.vocab_size, batch, seq)

    def step():
        net(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if not fused:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state allocated, grads None again
    fig = measure_step(step)
    b = breakdown(net, opt)
    opt_mb = b["optimizer_state_mb"]
    return {"weights_mb": b["weights_mb"], "optimizer_mb": opt_mb, "delta_mb": fig.peak_delta_mb,
            "peak_mb": b["weights_mb"] + opt_mb + fig.peak_delta_mb, "params": b["params"],
            "seconds": fig.seconds, "reliable": fig.reliable}


def predict(model: str, strategy: str, batch: int, seq: int, layers: int, overrides=None, cal=None,
            with_phase=False):
    """The planner's peak in MiB (and, with_phase, the phase that holds it)."""
    cfg = model_config(model, layers, overrides)
    shapes = planner.Shapes.from_config(cfg, model, name=model)
    phase, _, total = planner.peak(shapes, planner.Strategy.parse(STRATEGIES[strategy]), batch, seq, cal=cal)
    return (total / 2**20, phase) if with_phase else total / 2**20


def fit(rows: list, keys=("hf_store", "hf_logits", "hf_layer", "rev_layer")) -> dict:
    """Least-squares (relative error) refit of planner.CAL on the given rows, coordinate by coordinate."""
    cal = dict(planner.CAL)

    def loss(c):
        return sum((predict(r["model"], r["strategy"], r["batch"], r["seq"], r["layers"], r.get("overrides"), c)
                    / r["peak_mb"] - 1) ** 2 for r in rows)

    for _ in range(4):
        for k in keys:
            best = min((cal[k] * f for f in [0.5 + 0.01 * i for i in range(151)]),
                       key=lambda v: loss(dict(cal, **{k: v})))
            cal[k] = round(best, 3)
    return cal


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--seqs", nargs="*", type=int, default=None,
                    help="sequence lengths (default 256 512 1024, and 2048 for smollm2-moe)")
    ap.add_argument("--threads", type=int, default=2, help="threads per child (default 2)")
    ap.add_argument("--jobs", type=int, default=1, help="children at once (default 1; the figures are per process)")
    ap.add_argument("--results", default=None, help="JSON file the measurements are written to")
    ap.add_argument("--reuse", action="store_true", help="read the measurements back from --results")
    ap.add_argument("--fit", nargs="*", type=int, default=None, metavar="SEQ",
                    help="print the constants refitted on qwen-moe-mini at these lengths")
    ap.add_argument("--quick", action="store_true", help="a tiny config at seq 32 (seconds)")
    a = ap.parse_args(argv)
    models = {m: dict(MODELS[m]) for m in a.models}
    seqs = a.seqs
    if a.quick:
        models = {m: dict(layers=v.pop("layers"), batch=v.pop("batch"), overrides=v) for m, v in
                  ((m, dict(v)) for m, v in QUICK.items())}
        for m in models.values():
            m["seqs"] = [32]
    old = {}
    if a.reuse and a.results and os.path.isfile(a.results):
        with open(a.results) as fh:
            old = {(r["model"], r["strategy"], r["seq"]): r for r in json.load(fh)}
    print(f"one fine-tuning step per row, CPU, a fresh process each ({a.threads} threads; "
          f"{len(old)} rows read back from {a.results})" if old else
          f"one fine-tuning step per row, CPU, a fresh process each ({a.threads} threads)", flush=True)
    print(f"reversible options {planner.REV_DEFAULTS}", flush=True)
    t0 = time.perf_counter()
    todo = [(model, m, seq, strategy) for model, m in models.items() for seq in (seqs or m["seqs"])
            for strategy in a.strategies]
    done = {}

    def run(item):
        model, m, seq, strategy = item
        key = (model, strategy, seq)
        if key in old:
            return key, old[key]
        r = dict(model=model, strategy=strategy, seq=seq, batch=m["batch"], layers=m["layers"],
                 overrides=m.get("overrides"))
        r.update(measure_in_subprocess(os.path.abspath(__file__) + ":measure",
                                       dict(model=model, strategy=strategy, batch=m["batch"], seq=seq,
                                            layers=m["layers"], overrides=m.get("overrides")),
                                       env=child_env(a.threads), timeout=3600))
        print(f"  measured {model} seq {seq} {strategy}: {r['peak_mb']:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        return key, r

    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for key, r in pool.map(run, todo):
            done[key] = r
            if a.results:
                with open(a.results, "w") as fh:
                    json.dump(list({**old, **done}.values()), fh, indent=1)
    rows = [done[(model, strategy, seq)] for model, m, seq, strategy in todo]
    if a.fit:
        cal = fit([r for r in rows if r["model"] == "qwen-moe-mini" and r["seq"] in a.fit])
        print(f"refitted constants: {cal}")
    print()
    table_header("model", "layers", "batch x seq", "strategy", "measured MiB", "predicted MiB", "error",
                 "predicted peak phase")
    ok = []
    for r in rows:
        p, phase = predict(r["model"], r["strategy"], r["batch"], r["seq"], r["layers"], r.get("overrides"),
                           with_phase=True)
        err = p / r["peak_mb"] - 1
        r["predicted_mb"], r["error"] = p, err
        print(f"| {r['model']} | {r['layers']} | {r['batch']} x {r['seq']} | {STRATEGIES[r['strategy']]} | "
              f"{r['peak_mb']:.0f} | {p:.0f} | {100 * err:+.1f}% | {phase} |")
    worst = max(abs(r["error"]) for r in rows)
    ok.append(verdict(worst <= TOLERANCE, f"largest error {100 * worst:.1f}% over {len(rows)} rows "
                                          f"(target within {100 * TOLERANCE:.0f}%)"))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
