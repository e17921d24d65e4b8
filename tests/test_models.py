"""revengine.models: the reversible MoE transformer family against reversible_mode="plain"."""
import json
import os

import pytest
import torch

import revengine as rev
from revengine.models import BLOCK_TYPES, RevMoEConfig, RevMoEForCausalLM, chunked_cross_entropy

MODES = ["reversible", "checkpoint"]


def tiny(block_type, mode="reversible", layers=8, **kw):
    base = dict(block_type=block_type, reversible_mode=mode, num_hidden_layers=layers, router_aux_loss_coef=0.1,
                router_z_loss_coef=0.01, norm_topk_prob=True)
    return RevMoEConfig.preset("tiny", **{**base, **kw})


def build(cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return RevMoEForCausalLM(cfg).to(dtype)


def batch(cfg, B=2, S=12, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[0, :3] = 0  # left padding in the first row
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def grads(model, ids, mask, labels, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same random draws (bdia's signs) in every mode
    out = model(ids, attention_mask=mask, labels=labels)
    (0.5 * out.loss).backward()  # a scaled loss: the aux grads must follow the scale
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_grad_equals_plain_float64(block_type, mode):
    ref = build(tiny(block_type, "plain"))
    model = build(tiny(block_type, mode))
    model.load_state_dict(ref.state_dict())
    ids, mask, labels = batch(ref.config)
    o0, g0 = grads(ref, ids, mask, labels)
    o1, g1 = grads(model, ids, mask, labels)
    for k in ("loss", "lm_loss", "aux_loss", "z_loss"):
        assert rel(o1[k], o0[k]) < 1e-12, k
    assert g0.keys() == g1.keys()
    names = set(g0)
    assert any(".gate.weight" in n for n in names)  # the router gets grads (through the aux loss too)
    if block_type == "revffn":
        assert any("up_q" in n for n in names) and any("down_moe" in n for n in names)
    worst = max((rel(g1[n], g0[n]), n) for n in g0)
    assert worst[0] <= 1e-9, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the models' CUDA path runs only on a GPU")
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_grads_equal_plain_and_cpu(block_type, mode):
    # on the GPU: the executor, the MoE CUDA kernels (permute/gather/grouped mm/combine), bdia_step_
    ref = build(tiny(block_type, "plain")).cuda()
    model = build(tiny(block_type, mode)).cuda()
    model.load_state_dict(ref.state_dict())
    ids, mask, labels = (t.cuda() for t in batch(ref.config))
    o0, g0 = grads(ref, ids, mask, labels)
    o1, g1 = grads(model, ids, mask, labels)
    assert o1["loss"].device.type == "cuda" and g0.keys() == g1.keys()
    assert rel(o1["loss"], o0["loss"]) < 1e-12
    worst = max((rel(g1[n], g0[n]), n) for n in g0)
    assert worst[0] <= 1e-9, worst
    if block_type != "bdia":  # the CPU's numbers (bdia's signs are per-device draws)
        cpu = build(tiny(block_type, mode))
        cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        o2, g2 = grads(cpu, *(t.cpu() for t in (ids, mask, labels)))
        assert rel(o1["loss"].cpu(), o2["loss"]) < 1e-12
        worst = max((rel(g1[n].cpu(), g2[n]), n) for n in g2)
        assert worst[0] <= 1e-9, worst


def test_aux_losses_reach_the_router():
    cfg = tiny("additive", "reversible", layers=2)
    model = build(cfg)
    ids, mask, labels = batch(cfg)
    _, with_aux = grads(model, ids, mask, labels)
    model.config.router_aux_loss_coef = model.config.router_z_loss_coef = 0.0
    _, without = grads(model, ids, mask, labels)
    name = next(n for n in with_aux if n.endswith("mlp.gate.weight"))
    assert rel(with_aux[name], without[name]) > 1e-3


def test_routing_replay_prevents_diverging_grads():
    """A reconstruction a little off can flip a top-k choice. Simulated by nudging the routing
    decision's input in the recompute: without replay the grads diverge from plain; with replay
    the recompute takes the forward's choice and they agree to 1e-9."""
    errs = {}
    for replay in (True, False):
        ref = build(tiny("additive", "plain", layers=2))
        model = build(tiny("additive", "reversible", layers=2, replay_routing=replay))
        model.load_state_dict(ref.state_dict())
        for m in model.modules():
            if hasattr(m, "choose"):
                choose = m.choose
                offset = 0.05 * torch.arange(m.config.num_experts, dtype=torch.float64)
                m.choose = lambda p, choose=choose: choose(p + offset if rev.is_recomputing() else p)
        ids, mask, labels = batch(ref.config, S=24)
        _, g0 = grads(ref, ids, mask, labels)
        _, g1 = grads(model, ids, mask, labels)
        errs[replay] = max(rel(g1[n], g0[n]) for n in g0)
    assert errs[True] <= 1e-9 and errs[False] > 1e-2, errs


@pytest.mark.parametrize("slice_elements", [None, 64, 200], ids=["one slice", "13 slices", "5 slices"])
def test_chunked_cross_entropy_equals_full_logits(slice_elements, monkeypatch):
    """In float64 the loss and grads of the blocked cross-entropy (token chunks x vocabulary slices:
    the log-sum-exp folded over the slices, each slice's gradient accumulated over the chunks) equal
    those of the full logits, whatever the chunks and slices (the last ones short)."""
    if slice_elements is not None:
        monkeypatch.setattr(rev.optim, "SLICE_ELEMENTS", slice_elements)
        monkeypatch.setattr(rev.optim, "SLICE_ALIGN", 16)  # slices of a few rows of 16
    assert len(rev.optim.row_slices_of(torch.empty(50, 16))) == {None: 1, 64: 13, 200: 5}[slice_elements]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    for ignored in (slice(0, 0), slice(None, None, 5), slice(2, None)):  # none, some (the prompt rows), most
        lab = labels.clone()
        lab[ignored] = -100
        ref = torch.nn.functional.cross_entropy(h @ w.t(), lab, ignore_index=-100)
        gh, gw = torch.autograd.grad(3 * ref, (h, w))
        for chunk in (1, 8, 37, 100):
            out = chunked_cross_entropy(h, w, lab, chunk)
            ch, cw = torch.autograd.grad(3 * out, (h, w))
            assert rel(out, ref) < 1e-14 and rel(ch, gh) < 1e-13 and rel(cw, gw) < 1e-13
    out = chunked_cross_entropy(h, w, torch.full_like(labels, -100), 8)  # nothing labelled: 0, zero grads
    ch, cw = torch.autograd.grad(out, (h, w))
    assert float(out) == 0.0 and not ch.any() and not cw.any()


def test_chunked_cross_entropy_hands_over_its_saved_head_gradient():
    """The loss's grads are computed in forward and saved; for the loss itself (incoming grad 1) the
    head's gradient is the saved tensor, not a copy (one [vocab, hidden] tensor, not two), and the
    saved grads are not changed: a retained graph's second backward, and a scaled loss, are right."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    ref_h, ref_w = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.t(), labels), (h, w))
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_cross_entropy(h, w, labels, 8)
    out.backward()
    assert w.grad.data_ptr() in saved and h.grad.data_ptr() in saved
    assert rel(w.grad, ref_w) < 1e-13 and rel(h.grad, ref_h) < 1e-13
    h.grad = w.grad = None
    out = chunked_cross_entropy(h, w, labels, 8)
    out.backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    (out * 0.5).backward()
    assert torch.equal(w.grad, first * 0.5) and rel(first, ref_w) < 1e-13


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_generate_with_kv_cache_equals_recomputing(block_type):
    model = build(tiny(block_type, layers=3), dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    with_cache = model.generate(ids, max_new_tokens=6, attention_mask=mask)
    without = model.generate(ids, max_new_tokens=6, attention_mask=mask, use_cache=False)
    assert torch.equal(with_cache, without)
    assert model.training  # generate ran in eval mode and restored the mode
    model.eval()  # the forwards below compare as inference (bdia: g = 0)
    # Logits of the incremental path equal the full forward's.
    full = model(with_cache, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)).logits
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    nxt = model(with_cache[:, 5:6], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                past_key_values=cache).logits
    assert rel(nxt[:, 0], full[:, 5]) < 1e-4


def test_left_padding_does_not_change_the_real_tokens():
    model = build(tiny("revffn", layers=3))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    out = model(padded, attention_mask=mask).logits
    assert rel(out[:, 3:], alone) < 1e-12


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_save_and_from_pretrained_round_trip(block_type, tmp_path):
    model = build(tiny(block_type, layers=2, tie_word_embeddings=block_type == "additive"), dtype=torch.float32)
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = RevMoEForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config == model.config
    ids = torch.randint(0, 128, (2, 6))
    model.eval(), loaded.eval()  # bdia draws random signs in training mode
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    other = RevMoEForCausalLM.from_pretrained(str(tmp_path), reversible_mode="plain").eval()
    assert other.config.reversible_mode == "plain" and torch.equal(other(ids).logits, model(ids).logits)


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    build(tiny("additive", layers=2), dtype=torch.float32).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        RevMoEForCausalLM.from_pretrained(str(tmp_path), moe_intermediate_size=16)
    with pytest.raises(ValueError, match="does not fit"):
        RevMoEForCausalLM.from_pretrained(str(tmp_path), block_type="revffn")
    with pytest.raises(FileNotFoundError, match="config.json"):
        RevMoEForCausalLM.from_pretrained(str(tmp_path / "nowhere"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a revmoe config"):
        RevMoEForCausalLM.from_pretrained(str(tmp_path))


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="block_type"):
        RevMoEConfig.preset("tiny", block_type="cnn")
    with pytest.raises(ValueError, match="exact=True"):
        RevMoEConfig.preset("tiny", block_type="revffn", exact=True)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        RevMoEConfig.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="even"):
        RevMoEConfig.preset("tiny", block_type="revffn", hidden_size=33, num_attention_heads=3, num_key_value_heads=3,
                            head_dim=10)
    model = build(tiny("additive", layers=1), dtype=torch.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 500]]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))


def test_revffn_fixed_point_reports_and_fails_clearly():
    cfg = tiny("revffn", layers=2, fixed_point_fallback="error")
    model = build(cfg)
    ids, mask, labels = batch(cfg)
    grads(model, ids, mask, labels)
    report = model.fixed_point_report()
    assert len(report) == 2 and all(r["residual"] <= 1e-12 and 1 <= r["iterations"] <= 50 for r in report)
    # Adapters too large for a contraction: a clear error naming the layer, or a warning.
    for m in model.modules():
        if hasattr(m, "up_q"):
            with torch.no_grad():
                m.attn.self_attn.q_proj.weight.normal_(0, 3.0)
                m.down_attn.weight.normal_(0, 3.0)
    # raised in Python inside the executor's backward, and still a ReconstructionError out of it (the
    # layer named is the first whose inverse fails, Anderson-accelerated: layer 1 is inverted first)
    with pytest.raises(rev.ReconstructionError, match="RevFFN layer [01]: the fixed-point inverse .* did not converge"):
        grads(model, ids, mask, labels)
    for m in model.modules():
        if hasattr(m, "fallback"):
            m.fallback = "warn"
    with pytest.warns(RuntimeWarning, match="did not converge"):
        grads(model, ids, mask, labels)
    # "store": the forward finds out and keeps those layers' inputs: grads exact again.
    ref = build(tiny("revffn", "plain", layers=2))
    ref.load_state_dict(model.state_dict())
    for m in model.modules():
        if hasattr(m, "fallback"):
            m.fallback = "store"
    _, g0 = grads(ref, ids, mask, labels)
    _, g1 = grads(model, ids, mask, labels)
    assert any(r.get("stored") for r in model.fixed_point_report())
    assert max(rel(g1[n], g0[n]) for n in g0) <= 1e-9


@pytest.mark.parametrize("block_type", ["additive", "leapfrog"])
def test_exact_reconstruction_bit_exact_48_layers_bf16(block_type):
    cfg = tiny(block_type, layers=48, exact=True, num_experts=2, num_experts_per_tok=1, shared_expert_intermediate_size=0)
    model = build(cfg, dtype=torch.float32)
    ids, mask, labels = batch(cfg, B=1, S=6, pad=False)
    seq = model.model.layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, ctx = model.model.prepare(ids, mask)
        seq.merge = None
        with torch.no_grad():
            y = seq(x, **ctx)
            x1, x2 = seq.inverse(y, **ctx)
        xq = rev.couplings.quantize_ste(x.detach(), cfg.exact_bits)
        assert torch.equal(x1, xq) and torch.equal(x2, xq)
        # And inside backward: every layer's reconstruction equals its true input bit for bit.
        seq.debug = True
        seq(x, **ctx)[1].sum().backward()
    assert seq.last_report.reconstruction_errors == [0.0] * 48


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_a_few_adamw_steps_lower_the_loss(block_type):
    cfg = tiny(block_type, layers=2)
    model = build(cfg, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(5))  # a small vocabulary to learn
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("mode", ["reversible", "plain"])
def test_moe_chunked_experts_give_the_same_grads(mode):
    assert_same_loss_and_grads(build(tiny("revffn", "plain", layers=2)),
                               build(tiny("revffn", mode, layers=2, moe_chunk_size=5)))


def assert_same_loss_and_grads(ref, model):
    """model, given ref's weights, has ref's loss (1e-12) and grads (1e-9) on one batch."""
    model.load_state_dict(ref.state_dict())
    ids, mask, labels = batch(ref.config)
    o0, g0 = grads(ref, ids, mask, labels)
    o1, g1 = grads(model, ids, mask, labels)
    assert rel(o1.loss, o0.loss) < 1e-12
    assert max(rel(g1[n], g0[n]) for n in g0) <= 1e-9


@pytest.mark.parametrize("block_type", ["revffn", "additive", "leapfrog", "hamiltonian"])
@pytest.mark.parametrize("mode", ["reversible", "checkpoint", "plain"])
def test_attention_recompute_gives_the_same_grads(block_type, mode):
    """attention_recompute keeps only each attention branch's input inside the re-run: same grads
    (with chunked experts too, the smallest working set)."""
    ref = build(tiny(block_type, "plain", layers=2))
    model = build(tiny(block_type, mode, layers=2, attention_recompute=True, moe_chunk_size=5))
    without = build(tiny(block_type, mode, layers=2, moe_chunk_size=5))
    calls = {}
    for name, m in (("with", model), ("without", without)):
        for mod in m.modules():
            if type(mod).__name__ == "Attention":
                # A pre-hook: the checkpoint's recompute stops early, before the forward would return.
                mod.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    without.load_state_dict(ref.state_dict())
    grads(without, *batch(ref.config))
    assert_same_loss_and_grads(ref, model)
    # The option is in effect: one more attention forward per layer (its recompute in backward).
    assert calls["with"] == calls["without"] + 2, calls
    ids = batch(ref.config)[0]
    with torch.no_grad():  # generation with a KV cache skips the recompute path
        assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=3), ref.generate(ids[:1, :4], max_new_tokens=3))


def test_save_load_faults_are_clear(tmp_path):
    """A saved model is readable by others (0644 under umask 022); a damaged config.json or weights
    file is a ValueError naming the file, at load time."""
    import json
    import os
    import stat

    model = build(tiny("additive", layers=1), dtype=torch.float32)
    old = os.umask(0o022)
    try:
        model.save_pretrained(str(tmp_path / "m"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m" / "model.safetensors").st_mode) == 0o644
    RevMoEForCausalLM.from_pretrained(str(tmp_path / "m"))

    cfg = tmp_path / "m" / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config.json:\d+: not a valid config.json"):
        RevMoEForCausalLM.from_pretrained(str(tmp_path / "m"))
    cfg.write_text(text)

    weights = tmp_path / "m" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)  # the header intact, every float a NaN
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors: .* hold NaN or Inf"):
        RevMoEForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert json.loads(cfg.read_text())["block_type"] == "additive"


# -- the automatic working set and the attention kernels --------------------------------------------


def test_working_set_options_are_chosen_from_the_tokens():
    cfg = RevMoEConfig.preset("qwen-moe-mini")
    assert (cfg.moe_chunk_size, cfg.attention_recompute, cfg.loss_chunk_size) == (None, None, None)
    small, big = cfg.working_set(256), cfg.working_set(8 * 1024)
    assert small == {"moe_chunk_size": 0, "attention_recompute": False, "loss_chunk_size": 64}
    assert big == {"moe_chunk_size": 256, "attention_recompute": True, "loss_chunk_size": 64}
    assert RevMoEConfig.preset("tiny").working_set(10)["loss_chunk_size"] == 1024  # 128-token vocabulary
    fixed = RevMoEConfig.preset("qwen-moe-mini", moe_chunk_size=0, attention_recompute=False, loss_chunk_size=256)
    assert fixed.working_set(8 * 1024) == {"moe_chunk_size": 0, "attention_recompute": False, "loss_chunk_size": 256}
    # The automatic fields stay automatic through save / load.
    assert RevMoEConfig.from_dict(cfg.to_dict()).working_set(8 * 1024) == big
    with pytest.raises(ValueError, match="moe_chunk_size"):
        RevMoEConfig.preset("tiny", moe_chunk_size=-1)


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_automatic_working_set_grads_equal_plain_float64(block_type, mode, monkeypatch):
    """A model with no working-set options, on a batch big enough for every automatic option (2 x 300
    tokens: experts in chunks, also without grad; attention recomputed; cross-entropy in chunks), has
    the loss and the grads of reversible_mode="plain" with every option off (1e-9, float64); with
    padding, the attention's masks cover blocks of query rows (forced small here)."""
    from revengine.models import layers

    monkeypatch.setattr(layers, "MASK_BLOCK_ELEMENTS", 64 * 300)  # 64 query rows per mask
    ref = build(tiny(block_type, "plain", layers=2, moe_chunk_size=0, attention_recompute=False,
                     loss_chunk_size=100000))
    model = build(tiny(block_type, mode, layers=2))
    assert model.config.working_set(2 * 300) == {"moe_chunk_size": 256, "attention_recompute": True,
                                                 "loss_chunk_size": 1024}
    model.load_state_dict(ref.state_dict())
    checkpoints = _count_calls(monkeypatch, layers, "checkpoint")  # the experts' chunks
    ids, mask, labels = batch(ref.config, B=2, S=300)
    o0, g0 = grads(ref, ids, mask, labels)
    assert not checkpoints
    o1, g1 = grads(model, ids, mask, labels)
    assert checkpoints  # the automatic options were in effect
    assert rel(o1.loss, o0.loss) < 1e-12
    assert max(rel(g1[n], g0[n]) for n in g0) <= 1e-9
    # Without padding: is_causal, no mask (checked in test_causal_attention_never_builds_a_token_square)
    ids, mask, labels = batch(ref.config, B=2, S=300, pad=False)
    o0, g0 = grads(ref, ids, None, labels)
    o1, g1 = grads(model, ids, None, labels)
    assert rel(o1.loss, o0.loss) < 1e-12
    assert max(rel(g1[n], g0[n]) for n in g0) <= 1e-9


def test_causal_attention_never_builds_a_token_square(monkeypatch):
    """Causal attention: is_causal (no mask) without padding; with padding or past keys, blocks of
    query rows with masks of at most MASK_BLOCK_ELEMENTS per sample; the same output as one
    explicit [S, K] boolean mask (float64)."""
    import torch.nn.functional as F

    from revengine.models import layers

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 50, 8
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S + 7, D, generator=g, dtype=torch.float64) for _ in range(2))
    keys = torch.ones(B, S + 7, dtype=torch.long)
    keys[0, :10] = 0
    calls = _count_calls(monkeypatch, layers.F, "scaled_dot_product_attention")

    def explicit(past, key_mask):
        full = layers.attention_mask_4d(key_mask, B, S, past, q.device)
        return F.scaled_dot_product_attention(q, k[:, :, :past + S], v[:, :, :past + S], attn_mask=full,
                                              enable_gqa=True)

    out = layers.causal_attention(q, k[:, :, :S], v[:, :, :S], None, enable_gqa=True)
    assert calls[-1].get("is_causal") and calls[-1].get("attn_mask") is None
    assert torch.allclose(out, explicit(0, None), rtol=0, atol=1e-12)
    monkeypatch.setattr(layers, "MASK_BLOCK_ELEMENTS", 16 * (S + 7))
    for past, key_mask in ((0, keys[:, 7:]), (7, None), (7, keys)):
        calls.clear()
        out = layers.causal_attention(q, k[:, :, :past + S], v[:, :, :past + S], key_mask, enable_gqa=True)
        rows = 16 * (S + 7) // (past + S)
        assert len(calls) == -(-S // rows) > 1 and all(c["attn_mask"].shape[-2:].numel() <= 16 * (S + 7) for c in calls)
        assert torch.allclose(out, explicit(past, key_mask), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="key mask must have shape"):
        layers.causal_attention(q, k, v, keys[:, :3])
