"""TRL's SFTTrainer on a converted model (examples/trl_sft.py): it trains, and its step is the model's."""
import os
import sys

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra: pip install '.[trl]'")  # a test extra too: runs in the suite

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import trl_sft  # noqa: E402


def test_sft_trainer_lowers_the_loss_of_a_converted_model(tmp_path):
    model, tok = trl_sft.build("bdia")
    trainer = trl_sft.make_trainer(model, tok, str(tmp_path), steps=10)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, losses
    # what it was trained on is what generate() reads
    assert model.generation_config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("scheme", ["bdia", "revffn"])
def test_sft_trainer_step_has_the_grads_of_the_models_own_loss(tmp_path, scheme):
    """One batch of SFTTrainer (chat template, padding, its fused LM head on model.base_model) gives
    the gradients of the same batch run by hand through the model's own loss."""
    model, tok = trl_sft.build(scheme, dtype=torch.float64)
    trainer = trl_sft.make_trainer(model, tok, str(tmp_path), steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # padding is masked
    model.train()
    torch.manual_seed(1)
    trainer.compute_loss(model, dict(batch)).backward()
    by_trl = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # bdia draws its signs per forward
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.lm_loss.backward()  # SFTTrainer's loss is the token-mean NLL (it adds no load balancing, see README)
    by_hand = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert by_trl.keys() == by_hand.keys() and len(by_hand) > 10
    worst = max(float((by_trl[n] - by_hand[n]).abs().max() / by_hand[n].abs().max().clamp_min(1e-300)) for n in by_hand)
    # TRL's fused head computes the log-softmax in float32 (trl/kernels/chunked_logprob.py): agreement
    # is at float32's resolution; a wrong mask or label shift would be O(1)
    assert worst <= 1e-5, worst


def test_gradient_checkpointing_request_keeps_reversible_and_upgrades_plain():
    model, _ = trl_sft.build("bdia")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers.mode == "reversible" and model.is_gradient_checkpointing
    from revengine.convert import from_hf
    import transformers as tf

    plain = from_hf(tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)),
        scheme="bdia", reversible_mode="plain")
    assert not plain.is_gradient_checkpointing
    plain.gradient_checkpointing_enable()
    assert plain.model.layers.mode == "checkpoint"
    plain.gradient_checkpointing_disable()
    assert plain.model.layers.mode == "plain"
