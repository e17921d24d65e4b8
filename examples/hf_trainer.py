"""A converted HF MoE model trained by transformers.Trainer (gradient accumulation, its own loop,
logging and checkpointing), with the reversible backward underneath.

Builds a small random Qwen2-MoE (no download; a real checkpoint directory works the same way:
`from_hf("path/to/checkpoint", scheme=...)`), converts it and fine-tunes it on generated arithmetic.

    python examples/hf_trainer.py [--steps 60] [--scheme leapfrog] [--out /tmp/hf-trainer-run]
"""
import argparse
import os
import sys
import tempfile

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout; an installed revengine wins

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from revengine.apps import finetune as ft  # noqa: E402
from revengine.convert import from_hf  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--scheme", default="leapfrog")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(vocab_size=260, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                            shared_expert_intermediate_size=96, intermediate_size=96, experts_implementation="eager")
    model = from_hf(tf.Qwen2MoeForCausalLM(cfg), scheme=a.scheme)
    tok = ft.ByteTokenizer()
    examples = ft.encode_records(ft.arithmetic_records(512, seed=3), tok, 32, cfg.vocab_size, "arithmetic")
    train, held = examples[:448], examples[448:]
    args = tf.TrainingArguments(output_dir=a.out or tempfile.mkdtemp(prefix="hf-trainer-"), max_steps=a.steps,
                                per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=3e-3,
                                logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                                remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=train,
                         data_collator=lambda b: ft.collate(b, tok.pad_token_id))
    before = ft.evaluate(model, held, tok)["loss"]
    trainer.train()
    after = ft.evaluate(model, held, tok)["loss"]
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    return before, after


if __name__ == "__main__":
    main()
