"""A converted HF MoE model fine-tuned by TRL's SFTTrainer on chat-formatted records.

SFTTrainer applies the tokenizer's chat template, masks padding, accumulates gradients and computes
the loss with its own fused LM head on the model's backbone (`model.base_model`); the reversible
backward runs underneath. Builds a small random Qwen2-MoE and a byte-level chat tokenizer here (no
download); with a real checkpoint use `from_hf("path/to/checkpoint", scheme=...)` and
`AutoTokenizer.from_pretrained("path/to/checkpoint")`.

    pip install ".[trl]"
    python examples/trl_sft.py [--steps 40] [--scheme bdia] [--out /tmp/trl-sft-run]
"""
import argparse
import os
import random
import sys
import tempfile

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout; an installed revengine wins

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from revengine.convert import from_hf  # noqa: E402

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer() -> tf.PreTrainedTokenizerFast:
    """One token per byte plus the chat markers (ChatML, as SmolLM2 and Qwen use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {bytes([i]).decode("latin-1"): i for i in range(256)}
    vocab.update({t: 256 + j for j, t in enumerate(SPECIALS)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                     additional_special_tokens=SPECIALS[1:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_records(n: int, seed: int):
    """Two-digit additions as a user/assistant exchange."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"messages": [{"role": "user", "content": f"{a}+{b}="},
                                 {"role": "assistant", "content": str(a + b)}]})
    return out


def build(scheme: str = "bdia", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    tok = chat_tokenizer()
    cfg = tf.Qwen2MoeConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                            shared_expert_intermediate_size=96, intermediate_size=96,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return from_hf(tf.Qwen2MoeForCausalLM(cfg), scheme=scheme).to(dtype), tok


def make_trainer(model, tok, out: str, steps: int, n_train: int = 512, seed: int = 0):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
                     report_to=[], use_cpu=True, max_length=64, seed=seed, dataloader_num_workers=0)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_records(n_train, seed)),
                      processing_class=tok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--scheme", default="bdia")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    model, tok = build(a.scheme)
    trainer = make_trainer(model, tok, a.out or tempfile.mkdtemp(prefix="trl-sft-"), a.steps)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"training loss (every 5 steps): {' '.join(f'{x:.3f}' for x in losses)}")
    prompt = tok.apply_chat_template([{"role": "user", "content": "23+45="}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(prompt["input_ids"], max_new_tokens=4)
    print(f"23+45= -> {tok.decode(out[0, prompt['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    return losses


if __name__ == "__main__":
    main()
