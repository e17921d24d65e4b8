"""Two-stage fine-tuning of a converted MoE checkpoint (the RevFFN recipe), behind `revengine finetune`.

    revengine finetune --model DIR --data FILE.jsonl --scheme revffn --stage1-steps N --steps M --out DIR

--model is a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; a dense Llama with
--upcycle-experts), converted with `revengine.convert.from_hf(scheme=...)`, or a revengine model
directory (save_pretrained). `--scheme none` fine-tunes the HF model itself (the baseline, with
`--gradient-checkpointing` for HF's checkpointing).

Stage 1 (N optimizer steps) trains only the parameters the conversion added (RevFFN's adapters);
for schemes that reuse every weight it trains all of them, which with distillation is Gal et al.'s
KL recipe. The original model's logits are the teacher (`--distill stage1|all|none`). Stage 2 (M
steps) trains every parameter.

Data: one JSON object per line, {"text": ...} (every token is a target) or {"prompt": ...,
"answer": ...} (only the answer and the end token are targets; the eval split also reports greedy
exact-match accuracy). Tokenizer: the model directory's HF tokenizer if it has one, else UTF-8 bytes
(ids 0..255, 256 = end), which needs a vocabulary of at least 257.

--out receives checkpoints (checkpoints/step-NNNNNN: weights as safetensors, optimizer state, RNG
state, data position, and last complete.json with their sha256), log.jsonl (losses and evals) and, only
when the run finishes, the model (config.json last). `--resume` continues from the newest intact
checkpoint (a damaged one is reported and set aside) and ends bit-identical to an uninterrupted run; a
run is identified by the content of its data and model files, not their paths, and may raise --steps.
Ctrl-C finishes the current step, saves a checkpoint and exits with status 130. A run that stops before
its first checkpoint leaves only its log.jsonl, and --out may be used again. A run killed at any moment
(kill -9) resumes the same way; a --resume first removes what it left (the temporary folders of unfinished
saves, checkpoints past --keep-checkpoints).
"""

from .args import DISTILL, FinetuneArgs, FinetuneError
from .checkpoint import STATE_FILE, checkpoint_dirs, load_checkpoint_weights, save_checkpoint
from .command import add_arguments, cmd_finetune
from .data import (IGNORE, ByteTokenizer, DataStream, Example, HFTokenizer, arithmetic_records, collate,
                   encode_records, load_splits, load_tokenizer, read_jsonl, write_jsonl)
from .evaluate import evaluate, greedy_continue
from .loss import model_losses, token_kl
from .model import load_source, new_parameters, vocab_size_of
from .recipe import FinetuneRecipe, run

__all__ = [
    "DISTILL",
    "IGNORE",
    "STATE_FILE",
    "ByteTokenizer",
    "DataStream",
    "Example",
    "FinetuneArgs",
    "FinetuneError",
    "FinetuneRecipe",
    "HFTokenizer",
    "add_arguments",
    "arithmetic_records",
    "checkpoint_dirs",
    "cmd_finetune",
    "collate",
    "encode_records",
    "evaluate",
    "greedy_continue",
    "load_checkpoint_weights",
    "load_source",
    "load_splits",
    "load_tokenizer",
    "model_losses",
    "new_parameters",
    "read_jsonl",
    "run",
    "save_checkpoint",
    "token_kl",
    "vocab_size_of",
    "write_jsonl",
]
