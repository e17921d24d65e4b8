"""revengine.convert: HF MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) -> RevMoEForCausalLM,
back where exact, and dense Llama -> Mixtral upcycling. Tiny random configs, no download."""
import math
import types

import pytest
import torch

tf = pytest.importorskip("transformers")

from revengine.convert import FAMILIES as FAMILY_TABLE, conversion_gap, from_hf, to_hf, upcycle  # noqa: E402
from revengine.models import BLOCK_TYPES as SCHEMES  # noqa: E402
from revengine.models import RevMoEForCausalLM  # noqa: E402
from revengine.models.layers import rope_tables  # noqa: E402
from revengine.models.blocks import AttnBranch, MoEBranch  # noqa: E402

FAMILIES = tuple(FAMILY_TABLE)
CLASSES = {name: fam.hf_class for name, fam in FAMILY_TABLE.items()}


def hf_config(family, layers=2, **kw):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, rms_norm_eps=1e-6, pad_token_id=None,
                  eos_token_id=None, bos_token_id=None, experts_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if family == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, intermediate_size=24, **{**common, **kw})
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                 intermediate_size=40, qkv_bias=True, norm_topk_prob=False, **{**common, **kw})
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, norm_topk_prob=True, head_dim=12,
                                 **{**common, **kw})
    return tf.OlmoeConfig(num_experts=4, intermediate_size=24, norm_topk_prob=False, **{**common, **kw})


def _rope64(module, x, position_ids):
    """HF's default RoPE computed in float64 (HF computes cos/sin in float32 whatever the model's
    dtype, ~3e-8 off the exact tables that RevMoE computes in float64; tests compare in float64)."""
    cfg = module.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = position_ids.double()[..., None] * inv
    emb = torch.cat([emb, emb], -1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _norm64(module, x):
    """HF's RMSNorm without its cast to float32 (HF normalises in float32 whatever the dtype)."""
    return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))


def _router64(module, x):
    """HF's top-k router with the softmax in the input's dtype (HF computes it in float32)."""
    logits = torch.nn.functional.linear(x.reshape(-1, module.hidden_dim), module.weight)
    top, idx = logits.softmax(-1).topk(module.top_k, dim=-1)
    if getattr(module, "norm_topk_prob", True):  # Mixtral's router always renormalises
        top = top / top.sum(-1, keepdim=True)
    return logits, top, idx


def float64_reference(m):
    """Makes a float64 HF model float64 throughout (RoPE tables, RMSNorm, router softmax), so that
    comparing it with the converted model at ~1e-10 tests the weight mapping, not HF's float32
    internals (which are ~1e-8 off in a float64 model)."""
    m.double()
    for mod in m.modules():
        name = type(mod).__name__
        if name.endswith("RotaryEmbedding"):
            mod.forward = types.MethodType(_rope64, mod)
        elif name.endswith("RMSNorm"):
            mod.forward = types.MethodType(_norm64, mod)
        elif name.endswith("TopKRouter"):
            mod.forward = types.MethodType(_router64, mod)
    return m.eval()


def hf_model(family, layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = float64_reference(getattr(tf, CLASSES[family])(hf_config(family, layers, **kw)))
    with torch.no_grad():  # HF inits norms at 1 and biases at 0: perturb so the mapping is tested
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)  # routers that actually discriminate between experts
    return m


def _pos_emb(hf, x):
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return hf.model.rotary_emb(x, pos), pos


def _assert_close(a, b, tol=1e-10, what=""):
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.3g}"


@pytest.fixture(scope="module")
def models():
    return {f: hf_model(f) for f in FAMILIES}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sub_blocks_equal_the_originals(models, family, scheme):
    hf = models[family]
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = from_hf(hf, scheme=scheme)
    assert isinstance(model, RevMoEForCausalLM) and model.config.block_type == scheme
    assert next(model.parameters()).dtype == torch.float64
    torch.manual_seed(1)
    x = torch.randn(2, 7, hf.config.hidden_size, dtype=torch.float64)
    (cos, sin), pos = _pos_emb(hf, x)
    ours_cos, ours_sin = rope_tables(model.config, pos, dtype=torch.float64)
    _assert_close(ours_cos, cos, 1e-14, "rope cos")
    _assert_close(ours_sin, sin, 1e-14, "rope sin")
    hf_cos, hf_sin = type(hf.model.rotary_emb).forward(hf.model.rotary_emb, x, pos)  # HF's own, float32 inside
    _assert_close(ours_cos, hf_cos, 1e-6, "rope cos vs HF's float32 tables")
    layers = model.model.layers.layers
    with torch.no_grad():
        for i, hl in enumerate(hf.model.layers):
            attn = [m for m in layers[i].modules() if isinstance(m, AttnBranch)][0]
            moe = [m for m in layers[i].modules() if isinstance(m, MoEBranch)][0]
            a_hf = hl.self_attn(hl.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=None)[0]
            _assert_close(attn(x, position_embeddings=(cos, sin)), a_hf, what=f"{family}/{scheme} layer {i} attention")
            m_hf = hl.mlp(hl.post_attention_layernorm(x))
            _assert_close(moe(x), m_hf, what=f"{family}/{scheme} layer {i} MoE")
            if scheme in ("midpoint", "leapfrog"):  # the integrators' f is HF's whole pre-norm block increment
                f_hf = hl(x, position_embeddings=(cos, sin), attention_mask=None) - x
                _assert_close(layers[i].f(x, position_embeddings=(cos, sin)), f_hf, what=f"{family} layer {i} block")
        _assert_close(model.model.embed_tokens.weight, hf.model.embed_tokens.weight, 0.0)
        _assert_close(model.model.norm.weight, hf.model.norm.weight, 0.0)
        _assert_close(model.lm_head.weight, hf.lm_head.weight, 0.0)
    # a copy: the user's model is untouched, and training ours never reaches it
    assert model.model.embed_tokens.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_integrators_are_the_hf_model_and_export_back(family):
    """With one layer, midpoint (h=1/2) and leapfrog (h=1) compute HF's x + f(x): the whole model
    (embedding, final norm, LM head) matches, and to_hf gives back an identical HF model."""
    hf = hf_model(family, layers=1, seed=3)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for scheme in ("midpoint", "leapfrog"):
        model = from_hf(hf, scheme=scheme, reversible_mode="plain").eval()
        gap = conversion_gap(hf, model, ids)
        assert abs(gap["loss_rev"] - gap["loss_hf"]) < 1e-10 and abs(gap["kl"]) < 1e-10, gap
        back = float64_reference(to_hf(model, experts_implementation="eager"))
        assert type(back) is type(hf)
        with torch.no_grad():
            _assert_close(back(ids).logits, hf(ids).logits, 1e-12, f"{family} {scheme} round trip")


@pytest.mark.parametrize("family", FAMILIES)
def test_bdia_is_the_hf_model_in_eval_and_exports_back(family):
    """BDIA at any depth: eval mode (g = 0) is HF's residual chain, up to the fixed-point rounding of
    each increment to 2^-24; to_hf exports it without allow_function_change. Training mode draws
    random signs, so it differs from HF and between forwards."""
    hf = hf_model(family, layers=4, seed=6)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model = from_hf(hf, scheme="bdia")
    assert model.config.exact and model.config.exact_bits == 24 and model.config.reversible_mode == "reversible"
    model.eval()
    gap = conversion_gap(hf, model, ids)
    assert abs(gap["loss_rev"] - gap["loss_hf"]) < 1e-7 and abs(gap["kl"]) < 1e-9, gap  # 2^-24 per increment
    back = float64_reference(to_hf(model, experts_implementation="eager"))
    for k, v in back.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k
    model.train()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        assert not torch.equal(a, b)
        _assert_close(back(ids).logits, hf(ids).logits, 1e-12, f"{family} bdia round trip")


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_gap_is_finite_and_reported(family, capsys):
    """The step-0 gap vs the original (tiny random models; real numbers: benchmarks/convert_gap.py)."""
    hf = hf_model(family, layers=2, seed=4)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    rows = []
    for scheme in SCHEMES:
        gap = conversion_gap(hf, from_hf(hf, scheme=scheme, reversible_mode="plain").eval(), ids)
        assert all(math.isfinite(v) for v in gap.values()) and gap["kl"] >= -1e-12, gap
        rows.append(f"{family:10s} {scheme:12s} loss_hf {gap['loss_hf']:.4f} loss_rev {gap['loss_rev']:.4f} "
                    f"KL {gap['kl']:.2e}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_converted_model_trains_reversibly(scheme):
    """The converted model runs the reversible backward (RevFFN's fixed-point inverse converges
    from the coordinate adapter init) and its grads equal mode='plain'."""
    hf = hf_model("qwen2_moe", layers=2, seed=5)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in ("reversible", "plain"):
        model = from_hf(hf, scheme=scheme, reversible_mode=mode)
        torch.manual_seed(0)  # the same random draws (bdia's signs) in both modes
        model(ids, labels=ids).loss.backward()
        grads[mode] = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    for k, g in grads["plain"].items():
        _assert_close(grads["reversible"][k], g, 1e-8, f"{scheme} grad {k}")


def test_tied_embeddings_and_overrides():
    hf = hf_model("qwen3_moe", tie_word_embeddings=True)
    model = from_hf(hf, scheme="additive", exact=True, moe_chunk_size=4)
    assert model.config.tie_word_embeddings and model.config.exact and model.config.moe_chunk_size == 4
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_close(model.lm_head.weight, hf.model.embed_tokens.weight, 0.0)
    assert model.config.norm_topk_prob and model.config.head_dim == 12 and model.config.rope_theta == 5000.0
    cfg = from_hf(hf_model("mixtral"), scheme="midpoint").config
    assert cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 0 and cfg.step_size == 0.5


def test_to_hf_refuses_inexact_exports():
    hf = hf_model("mixtral")
    with pytest.raises(ValueError, match="revffn.*adapters"):
        to_hf(from_hf(hf, scheme="revffn"), allow_function_change=True)
    for scheme in ("additive", "hamiltonian", "midpoint", "leapfrog"):
        model = from_hf(hf, scheme=scheme)
        with pytest.raises(ValueError, match="cannot export exactly"):
            to_hf(model)
        back = to_hf(model, allow_function_change=True)  # the weights fit; the function differs
        for k, v in back.state_dict().items():
            assert torch.equal(v, hf.state_dict()[k]), k


def test_errors():
    with pytest.raises(ValueError, match="unsupported architecture LlamaForCausalLM"):
        from_hf(tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2)))
    with pytest.raises(ValueError, match="scheme must be one of"):
        from_hf(hf_model("mixtral"), scheme="euler")
    with pytest.raises(ValueError, match="do not fit the RevMoE config.*gate_up_proj"):
        from_hf(hf_model("mixtral"), moe_intermediate_size=16)
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(hf_model("olmoe", hidden_act="gelu"))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        from_hf(hf_model("qwen2_moe", mlp_only_layers=[1]))
    with pytest.raises(ValueError, match="o_proj"):
        from_hf(hf_model("qwen3_moe", attention_bias=True))
    with pytest.raises(ValueError, match="rope_type"):
        from_hf(hf_model("mixtral", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="upcycle: expected a dense LlamaForCausalLM"):
        upcycle(hf_model("mixtral"), 4, 2)


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None, **kw)
    return float64_reference(tf.LlamaForCausalLM(cfg))


@pytest.mark.parametrize("tied", [False, True])
def test_upcycle_gives_the_dense_loss(tied):
    dense = llama(tie_word_embeddings=tied)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, num_experts=4, top_k=2, generator=torch.Generator().manual_seed(0),
                  experts_implementation="eager")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    float64_reference(moe)
    with torch.no_grad():
        la, lb = dense(ids).logits, moe(ids).logits  # float64 (HF's own loss is computed in float32)
        loss = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))  # noqa
        a, b = loss(la), loss(lb)
    assert abs(float(a) - float(b)) < 1e-10, (float(a), float(b))
    _assert_close(lb, la, 1e-10, "upcycled logits")
    # the random router does send tokens to different experts (the test is not vacuous)
    with torch.no_grad():
        idx = moe.model.layers[0].mlp.gate(moe.model.embed_tokens(ids))[2]
    assert len(set(map(tuple, idx.sort(-1).values.tolist()))) > 1
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), k
    # and on to a reversible model: its sub-blocks are the dense model's
    rev = from_hf(moe, scheme="midpoint")
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    hl = dense.model.layers[0]
    with torch.no_grad():
        _assert_close(rev.model.layers.layers[0].f.moe(x), hl.mlp(hl.post_attention_layernorm(x)), what="upcycled MoE")
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense, num_experts=2, top_k=3)


def test_from_a_path_and_in_bfloat16(tmp_path):
    hf = hf_model("olmoe", layers=1)
    hf.save_pretrained(tmp_path)
    model = from_hf(str(tmp_path), scheme="hamiltonian")
    assert model.config.qk_norm == "full"
    for k, v in hf.state_dict().items():
        if k.endswith("q_norm.weight"):
            assert torch.equal(model.model.layers.layers[0].f.self_attn.q_norm.weight.double(), v)
    bf = from_hf(hf_model("qwen2_moe", layers=1).to(torch.bfloat16), scheme="revffn")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    ids = torch.randint(0, 64, (1, 6))
    assert torch.isfinite(bf(ids, labels=ids).loss)


def test_convert_gap_benchmark_quick(capsys):
    from conftest import load_benchmark

    mod = load_benchmark("convert_gap.py")
    assert mod.main(["--quick", "--steps", "3", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("revffn (coordinate)", "revffn (zero)", "additive", "midpoint", "leapfrog", "hamiltonian", "bdia",
                 "skip-layers"):
        assert f"| {name} |" in out, out
    bdia_kl = float(out.split("| bdia |")[1].split("|")[3])
    assert bdia_kl < 1e-9, out  # the HF model itself in eval mode


@pytest.mark.parametrize("family", FAMILIES)
def test_every_scheme_trains_with_the_library_defaults(family):
    """A converted tiny model of every family x scheme, with no options, trains 15 AdamW steps at lr
    3e-3 on a fixed batch: no exception (RevFFN layers that stop being contractions keep their input,
    the default fallback) and the loss falls by more than 0.1."""
    import warnings

    hf = hf_model(family).float()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for scheme in SCHEMES:
        torch.manual_seed(0)
        model = from_hf(hf, scheme=scheme).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "RevFFN layer i ... keeps its input"
            for _ in range(15):
                loss = model(ids, labels=ids).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss))
        assert losses[0] - losses[-1] > 0.1, (scheme, losses)


def _attn_branch_lipschitz(model, ids):
    """Per RevFFN layer: the largest over the tokens of ||dF/dx1||_2 (dF/dx1 is block diagonal over
    tokens: each token's x1 enters F only through its own query), read off by d/2 vjps."""
    x, ctx = model.model.prepare(ids)
    x1, x2 = x.chunk(2, -1)
    out = []
    for layer in model.model.layers.layers:
        a = x1.detach().requires_grad_(True)
        y = layer.attn_increment(a, x2, **ctx)
        rows = [torch.autograd.grad(y, a, torch.nn.functional.one_hot(torch.full(y.shape[:-1], i), y.shape[-1]).to(y),
                                    retain_graph=True)[0] for i in range(y.shape[-1])]
        out.append(float(torch.linalg.matrix_norm(torch.stack(rows, -2), ord=2).max()))
        with torch.no_grad():
            x1, x2 = layer(x1, x2, **ctx)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_revffn_inverts_q_k_normed_attention_that_is_no_contraction(family):
    """With q/k RMSNorm the converted attention branch is no contraction in x1 (the norm undoes the
    small query weights that keep Mixtral's and Qwen2-MoE's below 1): the plain iteration does not
    converge and the layers kept their inputs. The per-token Anderson-accelerated inverse does: no
    layer stores at conversion, and the grads are plain autograd's."""
    hf = hf_model(family)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = from_hf(hf, scheme="revffn", reversible_mode="plain")
    assert max(_attn_branch_lipschitz(ref, ids)) > 1.0
    model = from_hf(hf, scheme="revffn")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert not any(r["stored"] for r in model.fixed_point_report())
    assert all(r["residual"] <= 1e-12 for r in model.fixed_point_report())
    ref(ids, labels=ids).loss.backward()
    g0 = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    worst = max(float((p.grad - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-300))
                for n, p in model.named_parameters() if p.grad is not None)
    assert worst <= 1e-9, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_from_hf_is_from_hf_one_layer_at_a_time(family, tmp_path):
    """A sharded checkpoint (one matrix per expert, as the hub holds it) streamed into a layer store
    is from_hf's model bit for bit, and no decoder layer keeps memory after its turn."""
    from revengine.convert import stream_from_hf
    from revengine.offload import MIN_ELEMENTS, LayerStore
    from revengine.optim import InBackwardOptimizer

    hf = hf_model(family, layers=3, tie_word_embeddings=family == "qwen3_moe").float()
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    expect = from_hf(hf, scheme="bdia").state_dict()
    model = stream_from_hf(str(tmp_path / "ckpt"), str(tmp_path / "store"))
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(p.untyped_storage().nbytes() == 0 for p in model.model.layers.parameters() if p.numel() >= MIN_ELEMENTS)
    if family == "qwen3_moe":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    store = LayerStore.open(model, opt, str(tmp_path / "store"))
    store.close()
    got = model.state_dict()
    assert got.keys() == expect.keys()
    for k in expect:
        assert torch.equal(got[k], expect[k]), k


def test_stream_from_hf_reads_one_file_and_casts(tmp_path):
    """An unsharded model.safetensors, converted to bfloat16 on the way: from_hf's model cast the same way."""
    from revengine.convert import stream_from_hf
    from revengine.offload import LayerStore
    from revengine.optim import InBackwardOptimizer

    hf = hf_model("olmoe", layers=2).float()
    hf.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    expect = from_hf(hf, scheme="bdia").to(torch.bfloat16).state_dict()
    model = stream_from_hf(str(tmp_path / "ckpt"), str(tmp_path / "store"), dtype=torch.bfloat16)
    LayerStore.open(model, InBackwardOptimizer(model.parameters(), torch.optim.AdamW), str(tmp_path / "store")).close()
    got = model.state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v) for k, v in expect.items())


def test_stream_from_hf_errors_name_the_file_and_write_nothing(tmp_path):
    from revengine.convert import stream_from_hf

    hf = hf_model("mixtral", layers=2).float()
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt, max_shard_size="40KB")
    shards = sorted(p for p in ckpt.iterdir() if p.suffix == ".safetensors")
    with pytest.raises(ValueError, match="no config.json"):
        stream_from_hf(str(tmp_path), str(tmp_path / "s0"))
    # a checkpoint of another shape: refused before anything is written
    import json
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8}))
    with pytest.raises(ValueError, match="missing"):
        stream_from_hf(str(ckpt), str(tmp_path / "s1"))
    assert not (tmp_path / "s1" / "store.json").exists()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    # a shard cut short: named
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shards[-1].name):
        stream_from_hf(str(ckpt), str(tmp_path / "s2"))
    assert not (tmp_path / "s2" / "store.json").exists()
    # a shard the index names but the folder lacks
    shards[-1].unlink()
    with pytest.raises(ValueError, match=f"{shards[-1].name}: named by the checkpoint's index but missing"):
        stream_from_hf(str(ckpt), str(tmp_path / "s3"))
