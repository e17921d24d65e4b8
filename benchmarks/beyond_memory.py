"""A model larger than this machine's memory, trained with its layers on disk: a synthetic
Qwen2-MoE-shaped checkpoint whose fp32 weights + AdamW state exceed the machine's RAM is written
shard by shard, converted into a layer store one decoder layer at a time
(revengine.convert.stream_from_hf) and trained with the store (revengine.offload.LayerStore,
AdamW inside backward), never whole in memory.

Default model (--layers 48): HF Qwen2-MoE, hidden 1024, 16 heads, 60 routed experts of width 256
(top-4) and a shared expert of width 1024 per layer, vocabulary 32768, untied head: 2.69 billion
parameters, 5.4 GB in bf16 on disk, 10.75 GB of fp32 weights + 21.5 GB of AdamW state = 32.3 GB
(30.0 GiB) in the store. Each layer's file holds its weights and state; the store keeps two slots
per layer (the last completed step's and the one being written), so it needs about 65 GB of disk.

Three phases, each with its own peak resident set size (VmHWM), in two fresh processes
(MALLOC_MMAP_THRESHOLD_=65536):
    create   the checkpoint: config.json, one bf16 safetensors shard per decoder layer (random
             init, std 0.02), the index; one layer in memory at a time
    convert  (second process) stream_from_hf(..., dtype=float32) into the store; the checkpoint is
             then deleted (--keep-checkpoint keeps it)
    train    (the same process, as a user would) --steps AdamW steps (lr --lr) on one fixed batch of --tokens random token ids, loss
             printed per step (the loss of a step is computed before that step's update), then a
             forward of the same batch after the last update

    python benchmarks/beyond_memory.py --dir /big/disk/folder          # about 7 min on 2 cores
    python benchmarks/beyond_memory.py --dir /big/disk/folder --cli    # the same through `revengine finetune`
    python benchmarks/beyond_memory.py --quick                          # 4 tiny layers, seconds

--cli: instead of the second process, `revengine finetune --offload disk --in-backward --scheme bdia
--stage1-steps 0` on generated arithmetic (byte tokens, batch 1), which streams the checkpoint into
its store itself, evaluates before and after, and writes the finished model a layer at a time; its
peak is the finetune process's (RUSAGE_CHILDREN). Needs the checkpoint, the store's two slots and
the final model on disk at once (about 81 GB at 48 layers).

Prints the phases' figures and PASS/FAIL lines (peak under --budget-gb, loss falling); never asserts.
"""
import json
import os
import shutil
import tempfile
import time

import torch

from _common import parser, summary, verdict
from revengine.memory import measure_in_subprocess, proc_status_kb

HERE = os.path.abspath(__file__)
GB = 1e9


def qwen2_moe_config(quick: bool, layers: int) -> dict:
    if quick:
        return dict(vocab_size=512, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=64, intermediate_size=64)
    return dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=256,
                shared_expert_intermediate_size=1024, intermediate_size=2816)


def _peak_gb() -> float:
    return proc_status_kb("VmHWM")["VmHWM"] * 1024 / GB


def create(directory: str, config: dict, seed: int = 0) -> dict:
    """An HF Qwen2-MoE checkpoint folder written one decoder layer at a time (the hub's layout: one
    matrix per expert), bf16, with its index. Runs in a fresh process."""
    import transformers
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    cfg = transformers.Qwen2MoeConfig(qkv_bias=True, tie_word_embeddings=False, dtype="bfloat16", **config)
    os.makedirs(directory, exist_ok=True)
    cfg.save_pretrained(directory)
    g = torch.Generator().manual_seed(seed)
    d, E, inner, shared = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def w(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0

    def shard(name, tensors):
        nonlocal total
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() for t in tensors.values())

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": w(heads * hd, d), p + "self_attn.q_proj.bias": w(heads * hd),
             p + "self_attn.k_proj.weight": w(kv * hd, d), p + "self_attn.k_proj.bias": w(kv * hd),
             p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.v_proj.bias": w(kv * hd),
             p + "self_attn.o_proj.weight": w(d, heads * hd), p + "mlp.gate.weight": w(E, d),
             p + "mlp.shared_expert.gate_proj.weight": w(shared, d), p + "mlp.shared_expert.up_proj.weight": w(shared, d),
             p + "mlp.shared_expert.down_proj.weight": w(d, shared), p + "mlp.shared_expert_gate.weight": w(1, d)}
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = w(inner, d)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = w(inner, d)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = w(d, inner)
        shard(f"model-layer-{i:03d}.safetensors", t)
        del t
    shard("model-rest.safetensors", {"model.embed_tokens.weight": w(cfg.vocab_size, d),
                                     "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
                                     "lm_head.weight": w(cfg.vocab_size, d)})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, fh)
    return {"params": total, "bytes": 2 * total, "seconds": time.perf_counter() - t0, "peak_gb": _peak_gb()}


def _reset_peak() -> None:
    """Starts VmHWM again from the current resident set (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def convert_and_train(checkpoint: str, store: str, steps: int, tokens: int, lr: float, keep_checkpoint: bool) -> dict:
    """stream_from_hf into the store (fp32), then the steps on one fixed batch through the store.
    Runs in a fresh process; each part's peak is its own."""
    from revengine.convert import stream_from_hf
    from revengine.offload import LayerStore
    from revengine.optim import InBackwardOptimizer

    t0 = time.perf_counter()
    model = stream_from_hf(checkpoint, store, dtype=torch.float32)
    out = {"convert_s": time.perf_counter() - t0, "convert_peak_gb": _peak_gb(),
           "params": sum(p.numel() for p in model.parameters())}
    if not keep_checkpoint:
        shutil.rmtree(checkpoint)  # the disk the store's second slot needs
    _reset_peak()
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=lr)
    st = LayerStore.open(model, opt, store)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    losses, times = [], []
    for s in range(steps):
        torch.manual_seed(1234)  # BDIA's per-sample signs: the same draw every step
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"step {s + 1}: loss {losses[-1]:.5f}, {times[-1]:.0f} s", flush=True)
    torch.manual_seed(1234)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    st.detach()
    out.update(losses=losses, after=after, step_s=times, train_peak_gb=_peak_gb(), read_gb=st.bytes_read / GB,
               written_gb=st.bytes_written / GB, steps_done=st.step)
    return out


def finetune_cli(ckpt: str, work: str, steps: int, lr: float) -> dict:
    """`revengine finetune --offload disk` on the checkpoint, in a child process."""
    import resource
    import subprocess
    import sys

    from revengine.apps import finetune as ft

    data, out = os.path.join(work, "train.jsonl"), os.path.join(work, "out")
    ft.write_jsonl(ft.arithmetic_records(200, digits=2, seed=1), data)
    cmd = [sys.executable, "-m", "revengine", "finetune", "--model", ckpt, "--data", data, "--out", out,
           "--scheme", "bdia", "--stage1-steps", "0", "--steps", str(steps), "--in-backward", "--offload", "disk",
           "--batch-size", "1", "--lr", str(lr), "--eval-max-examples", "4", "--eval-batch-size", "4", "--no-progress"]
    t0 = time.perf_counter()
    # cwd: `python -m` puts it first on sys.path, where a source checkout's revengine/ would shadow the install
    subprocess.run(cmd, check=True, cwd=work, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    evals = {r["eval"]: r["loss"] for r in log if "eval" in r}
    return {"losses": [r["loss"] for r in log if "eval" not in r], "start": evals["start"], "final": evals["final"],
            "peak_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB, "seconds": seconds,
            "model_gb": os.path.getsize(os.path.join(out, "model.safetensors")) / GB}


def predicted(ckpt: str, tokens: int) -> dict:
    """`revengine plan`'s figures for this step, from the checkpoint's config.json (GB)."""
    from revengine.apps import plan as planner
    from revengine.convert import read_model_config

    shapes = planner.Shapes.from_config(read_model_config(ckpt), os.path.join(ckpt, "config.json"))
    disk = "rev-bdia/adamw/fp32/in-backward/offload-disk"
    out = {name: planner.peak(shapes, planner.Strategy.parse(name), 1, tokens)[2] / GB
           for name in (disk, "rev-bdia/adamw/fp32/in-backward")}
    out.update({k: v / GB for k, v in planner.store_figures(shapes, planner.Strategy.parse(disk)).items()})
    return out


def main():
    ap = parser(__doc__)
    ap.add_argument("--dir", default=None, help="the working folder (checkpoint + store; default a temporary folder)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--budget-gb", type=float, default=4.0, help="the peak resident memory to stay under")
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 tiny layers (seconds)")
    ap.add_argument("--cli", action="store_true", help="train with `revengine finetune --offload disk`")
    args = ap.parse_args()
    layers = 4 if args.quick else args.layers
    t_all = time.perf_counter()
    work = args.dir or tempfile.mkdtemp(prefix="revengine-beyond-")
    os.makedirs(work, exist_ok=True)
    ckpt, store = os.path.join(work, "checkpoint"), os.path.join(work, "store")
    for d in (ckpt, store):
        if os.path.exists(d):
            shutil.rmtree(d)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    print(f"machine: {mem:.1f} GB of memory, {os.cpu_count()} cores; folder {work} "
          f"({shutil.disk_usage(work).free / GB:.0f} GB free)", flush=True)
    long = 4 * 3600
    c = measure_in_subprocess(f"{HERE}:create", {"directory": ckpt, "config": qwen2_moe_config(args.quick, layers)},
                              timeout=long)
    fp32_adamw = 12 * c["params"] / GB
    print(f"create:  {c['params'] / 1e9:.3f} B parameters, {c['bytes'] / GB:.2f} GB bf16 checkpoint in "
          f"{c['seconds']:.0f} s, peak RSS {c['peak_gb']:.2f} GB; fp32 weights + AdamW state = {fp32_adamw:.2f} GB",
          flush=True)
    plan = predicted(ckpt, args.tokens)
    print("plan:    peak " + "; ".join(f"{k}: {v:.2f} GB" for k, v in plan.items()) + " (`revengine plan`, no runtime "
          "memory)", flush=True)
    if args.cli:
        f = finetune_cli(ckpt, work, args.steps, args.lr)
        print(f"finetune: {f['seconds']:.0f} s; step losses {' '.join(f'{x:.4f}' for x in f['losses'])}; eval loss "
              f"{f['start']:.4f} -> {f['final']:.4f}; final model {f['model_gb']:.2f} GB; peak RSS {f['peak_gb']:.2f} GB")
        ok = [verdict(args.quick or fp32_adamw > mem, f"fp32 weights + AdamW state {fp32_adamw:.1f} GB > memory {mem:.1f} GB"),
              verdict(max(c["peak_gb"], f["peak_gb"]) < args.budget_gb,
                      f"peak resident memory {max(c['peak_gb'], f['peak_gb']):.2f} GB < {args.budget_gb} GB"),
              verdict(f["final"] < f["start"], "the eval loss falls")]
        if args.dir is None:
            shutil.rmtree(work)
        summary(t_all, ok)
        return
    r = measure_in_subprocess(f"{HERE}:convert_and_train", {
        "checkpoint": ckpt, "store": store, "steps": args.steps, "tokens": args.tokens, "lr": args.lr,
        "keep_checkpoint": args.keep_checkpoint}, timeout=long)
    store_gb = sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)) / GB
    print(f"convert: {r['convert_s']:.0f} s, peak RSS {r['convert_peak_gb']:.2f} GB", flush=True)
    print(f"train:   losses {' '.join(f'{x:.4f}' for x in r['losses'])}, after {r['after']:.4f}; step "
          f"{' '.join(f'{x:.0f}' for x in r['step_s'])} s; read {r['read_gb']:.1f} GB, written {r['written_gb']:.1f} GB; "
          f"peak RSS {r['train_peak_gb']:.2f} GB; store on disk {store_gb:.1f} GB (two slots)", flush=True)
    peak = max(c["peak_gb"], r["convert_peak_gb"], r["train_peak_gb"])
    ok = [verdict(args.quick or fp32_adamw > mem, f"fp32 weights + AdamW state {fp32_adamw:.1f} GB > memory {mem:.1f} GB"),
          verdict(peak < args.budget_gb, f"peak resident memory {peak:.2f} GB < {args.budget_gb} GB in every phase"),
          verdict(r["steps_done"] == args.steps and all(b < a for a, b in zip(r["losses"], r["losses"][1:] + [r["after"]])),
                  f"{r['steps_done']} steps committed; the loss on the fixed batch falls every step")]
    if args.dir is None:
        shutil.rmtree(work)
    summary(t_all, ok)


if __name__ == "__main__":
    main()
