"""Conversion between Hugging Face transformers MoE models and RevMoEForCausalLM.

    from_hf(model_or_path, scheme="bdia", reversible_mode="reversible", **config_overrides)
        MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM or OlmoeForCausalLM ->
        RevMoEForCausalLM. Every pretrained tensor is copied (the user's model is never modified):
        embeddings, per-layer norms, q/k/v/o (with q/k/v biases), q/k norms, router, fused experts,
        shared expert and its sigmoid gate, final norm, LM head (or the tied embedding).
    stream_from_hf(model_dir, store_dir, ...)
        the same conversion from a checkpoint folder into a `revengine.offload.LayerStore`, one
        decoder layer at a time: a model larger than memory is converted without ever being whole.
    to_hf(model, hf_config=None, allow_function_change=False)
        RevMoEForCausalLM -> the HF class, where that is the same function (see below).
    upcycle(dense_model, num_experts, top_k)
        a dense LlamaForCausalLM (SmolLM2, TinyLlama, ...) -> a MixtralForCausalLM with the same loss:
        the MLP is copied into every expert and the top-k weights are renormalised, so they sum to
        one and the MoE output is the dense MLP's output whatever the (random) router picks.

transformers is an optional dependency (`pip install revengine[hf]`); it is imported lazily.

What is preserved (measured by tests/test_convert.py and benchmarks/convert_gap.py):

* Every scheme keeps the pretrained sub-blocks unchanged: the attention branch
  A(x) = attn(input_layernorm(x)) and the MoE branch M(x) = moe(post_attention_layernorm(x)) equal
  the HF layer's (float64, ~1e-15). What differs is how the layers are chained:
    - midpoint (h = 1/2) / leapfrog (h = 1): f(p) = A(p) + M(p + A(p)) is the unchanged pre-norm
      block; with split="duplicate" the first layer equals HF's x + f(x) exactly, later layers use
      the integrator's two-step update instead of the residual x + f(x);
    - hamiltonian: q += A(p); p += M(q) -- the MoE reads the attention update of the other stream;
    - additive: y1 = x + A(x), y2 = x + M(y1), outputs averaged;
    - revffn: half-width streams with projection adapters (see `init_revffn_adapters`);
    - bdia: p_next = g p_prev + (1-g) p + (1+g) f(p) with g = +-bdia_gamma drawn per sample in
      training and g = 0 in eval, where it is HF's x + f(x) at any depth (up to the fixed-point
      rounding of each increment to 2^-24; exact=True is its default, which makes it invertible).
  Apart from bdia in eval mode, none of them is the HF function for more than one layer: those
  converted models are meant to be fine-tuned / distilled (Gal et al. distil with KL for 1-2 epochs;
  RevFFN warms up the adapters); a bdia model needs no stage 1 (it has no new parameters and starts
  as the original).
  benchmarks/convert_gap.py prints the loss and KL gap against the original at step 0.

* to_hf: an HF model computes the residual chain x_{l+1} = x_l + f_l(x_l). A reversible model
  computes that same function with block_type bdia (in eval mode, any depth), and for one layer
  with midpoint (h = 1/2, p_-1 = p_0), leapfrog (h = 1, p_-1 = p_0) or either with the Euler start
  at h = 1; everything else raises a
  ValueError naming why. allow_function_change=True exports the pretrained-shaped weights anyway
  for the full-width schemes (additive, midpoint, leapfrog, hamiltonian: their A and M are HF's
  sub-blocks, so the weights fit, but the HF model then computes a different function). revffn
  cannot be exported at all: its adapters and half-width streams have no HF counterpart.
"""
import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from revengine.models import BLOCK_TYPES, RevMoEConfig, RevMoEForCausalLM
from revengine.models.blocks import AttnBranch, MoEBranch
from revengine.models.config import read_config_json
from revengine.models.revffn import RevFFNLayer

__all__ = ["from_hf", "stream_from_hf", "to_hf", "upcycle", "init_revffn_adapters", "conversion_gap", "hf_family", "revmoe_config_from_hf",
           "hf_config_from_revmoe", "hf_parameter_map", "new_parameters", "load_hf", "read_model_config", "Family",
           "FAMILIES"]


@dataclass(frozen=True)
class Family:
    """What one supported HF MoE architecture does differently; everything not named here is shared
    (RoPE attention with GQA, RMSNorm, softmax-then-top-k routing, fused SwiGLU experts)."""

    hf_class: str                   # the transformers *ForCausalLM class
    config_class: str               # and its config class
    num_experts: str                # the config field holding the number of routed experts
    expert_width: str               # the config field holding a routed expert's intermediate size
    shared_expert: bool = False     # a shared expert behind a sigmoid gate (shared_expert_intermediate_size)
    qk_norm: Union[bool, str] = False  # RMSNorm on queries and keys: "head" (per head) or "full" (all heads)
    always_renormalise: bool = False   # top-k weights renormalised whatever norm_topk_prob says
    qkv_bias: Optional[str] = None  # the config field that adds q/k/v biases, if the family has one
    head_dim_field: bool = True     # the config has head_dim (else head_dim = hidden_size / heads)
    # a checkpoint file's experts (what save_pretrained writes and the hub holds): one matrix per
    # expert, "{block}.experts.{e}.{gate|up|down}.weight" inside decoder layer i
    expert_files: Tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")


# model_type -> Family: the one table every conversion, check and CLI choice reads.
FAMILIES: Dict[str, Family] = {
    "mixtral": Family("MixtralForCausalLM", "MixtralConfig", "num_local_experts", "intermediate_size",
                      always_renormalise=True, expert_files=("block_sparse_moe", "w1", "w3", "w2")),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", "Qwen2MoeConfig", "num_experts", "moe_intermediate_size",
                        shared_expert=True, qkv_bias="qkv_bias", head_dim_field=False),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", "Qwen3MoeConfig", "num_experts", "moe_intermediate_size", qk_norm="head"),
    "olmoe": Family("OlmoeForCausalLM", "OlmoeConfig", "num_experts", "intermediate_size", qk_norm="full",
                    head_dim_field=False),
}

# The key map. Tensors outside the decoder layers keep their HF names. Inside decoder layer i, an HF
# name starts with the sub-block that holds it; a RevMoE layer holds those sub-blocks whole, under the
# same names, inside its attention branch or its MoE branch, whatever the scheme's wrapping.
MODEL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LAYER_KEY_BRANCH = {"input_layernorm": AttnBranch, "self_attn": AttnBranch,
                    "post_attention_layernorm": MoEBranch, "mlp": MoEBranch}
ADAPTER_INITS = ("coordinate", "zero")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("revengine.convert needs transformers: pip install 'revengine[hf]'") from e
    return transformers


def _unsupported(family: str, what: str):
    raise ValueError(f"revengine.convert: this {family} model cannot be represented by RevMoEForCausalLM: {what}")


# ---------------------------------------------------------------------------------------------
# Loading


def read_model_config(model_dir: str) -> dict:
    """The config.json of a model folder (HF or revengine) as a dict; ValueError naming the file
    when it is missing or not valid JSON."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir}: no config.json (expected a Hugging Face or revengine model directory)")
    return read_config_json(path)


def load_hf(model_dir: str, dtype: Union[torch.dtype, str] = "auto"):
    """AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype) ("auto": the checkpoint's dtype), refusing a checkpoint whose tensors do not fit
    its config (another shape, or missing: HF would initialise those at random) with one ValueError."""
    tf = _transformers()
    model, info = tf.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, ignore_mismatched_sizes=True, output_loading_info=True)
    bad = [f"{m[0]}: checkpoint {tuple(m[1])} vs config {tuple(m[2])}" if isinstance(m, (tuple, list)) and len(m) == 3
           else str(m) for m in info.get("mismatched_keys", [])]
    missing = [k for k in info.get("missing_keys", []) if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if bad or missing:
        raise ValueError(f"{model_dir}: the checkpoint does not fit its config.json: "
                         + "; ".join(bad[:4] + [f"missing {k}" for k in missing[:4]]))
    return model


# ---------------------------------------------------------------------------------------------
# Config mapping


def hf_family(model) -> str:
    """The supported model_type of an HF model (or config); ValueError for anything else."""
    cfg = getattr(model, "config", model)
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        name = type(model).__name__
        raise ValueError(
            f"revengine.convert: unsupported architecture {name} (model_type={mt!r}); from_hf converts "
            f"{', '.join(f.hf_class for f in FAMILIES.values())}. A dense LlamaForCausalLM can be upcycled to "
            "Mixtral first with revengine.convert.upcycle")
    if isinstance(model, nn.Module) and not hasattr(model, "lm_head"):
        raise ValueError(f"revengine.convert: {type(model).__name__} has no lm_head; pass the *ForCausalLM model "
                         f"({FAMILIES[mt].hf_class})")
    return mt


def _rope_theta(cfg, family: str) -> float:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        if any(isinstance(v, dict) for v in rp.values()):  # per-layer-type parameters
            _unsupported(family, f"per-layer-type rope parameters {rp}")
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype != "default":
            _unsupported(family, f"rope_type={rtype!r} (only the default RoPE is implemented)")
        if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
            _unsupported(family, f"partial_rotary_factor={rp['partial_rotary_factor']}")
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling:
        _unsupported(family, f"rope_scaling={scaling}")
    return float(getattr(cfg, "rope_theta", 10000.0))


def revmoe_config_from_hf(hf_config, scheme: str = "revffn", reversible_mode: str = "reversible", **overrides):
    """The RevMoEConfig of an HF MoE config (ValueError when a feature has no counterpart)."""
    fam = hf_family(hf_config)
    spec = FAMILIES[fam]
    c = hf_config
    if getattr(c, "hidden_act", "silu") != "silu":
        _unsupported(fam, f"hidden_act={c.hidden_act!r} (the experts are SwiGLU: silu only)")
    if getattr(c, "use_sliding_window", False) or (fam == "mixtral" and getattr(c, "sliding_window", None)):
        _unsupported(fam, f"sliding-window attention (sliding_window={c.sliding_window})")
    if getattr(c, "mlp_only_layers", None):
        _unsupported(fam, f"dense layers mlp_only_layers={c.mlp_only_layers} (every layer must be MoE)")
    if getattr(c, "decoder_sparse_step", 1) != 1:
        _unsupported(fam, f"decoder_sparse_step={c.decoder_sparse_step} (every layer must be MoE)")
    if getattr(c, "clip_qkv", None) is not None:
        _unsupported(fam, f"clip_qkv={c.clip_qkv}")
    if getattr(c, "pretraining_tp", 1) != 1:
        _unsupported(fam, f"pretraining_tp={c.pretraining_tp}")
    if spec.qkv_bias is None and getattr(c, "attention_bias", False):
        _unsupported(fam, "attention_bias=True puts a bias on o_proj, which RevMoE's attention does not have")
    for name in ("attention_dropout",):
        if float(getattr(c, name, 0.0) or 0.0) != 0.0:
            warnings.warn(f"revengine.convert: {name}={getattr(c, name)} is dropped (RevMoE has no attention dropout)",
                          stacklevel=3)
    if float(getattr(c, "router_jitter_noise", 0.0) or 0.0) != 0.0:
        warnings.warn(f"revengine.convert: router_jitter_noise={c.router_jitter_noise} (a training-time "
                      "regulariser) is dropped", stacklevel=3)

    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    if spec.qk_norm == "full" and head_dim * n_heads != c.hidden_size:
        _unsupported(fam, "its q_norm spans hidden_size, so head_dim * num_attention_heads must equal it")
    eos = getattr(c, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    fields = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        head_dim=None if head_dim * n_heads == c.hidden_size else head_dim,
        num_experts=getattr(c, spec.num_experts),
        num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=getattr(c, spec.expert_width),
        shared_expert_intermediate_size=c.shared_expert_intermediate_size if spec.shared_expert else 0,
        norm_topk_prob=True if spec.always_renormalise else bool(c.norm_topk_prob),
        router_aux_loss_coef=float(getattr(c, "router_aux_loss_coef", 0.0) or 0.0),
        router_z_loss_coef=0.0,
        rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=_rope_theta(c, fam),
        max_position_embeddings=c.max_position_embeddings,
        attention_bias=bool(getattr(c, spec.qkv_bias, False)) if spec.qkv_bias else False,
        qk_norm=spec.qk_norm,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        initializer_range=float(getattr(c, "initializer_range", 0.02)),
        pad_token_id=getattr(c, "pad_token_id", None),
        eos_token_id=eos,
        block_type=scheme,
        reversible_mode=reversible_mode,
    )
    if scheme in ("midpoint", "leapfrog"):
        fields["step_size"] = 0.5 if scheme == "midpoint" else 1.0  # layer 0 = HF's x + f(x)
    fields.update(overrides)
    return RevMoEConfig(**fields)


# ---------------------------------------------------------------------------------------------
# Weights


def _branches(layer) -> Dict[type, nn.Module]:
    """{AttnBranch: ..., MoEBranch: ...} of one reversible layer, whatever the scheme's wrapping."""
    found = {kind: [m for m in layer.modules() if isinstance(m, kind)] for kind in (AttnBranch, MoEBranch)}
    if any(len(v) != 1 for v in found.values()):
        raise ValueError(f"revengine.convert: layer {type(layer).__name__} holds {len(found[AttnBranch])} attention "
                         f"and {len(found[MoEBranch])} MoE branches; expected one of each")
    return {kind: v[0] for kind, v in found.items()}


def hf_parameter_map(model) -> Dict[str, nn.Parameter]:
    """HF state-dict name -> the parameter of the RevMoEForCausalLM `model` that holds that tensor
    (read by from_hf, to_hf and new_parameters alike)."""
    t = {}
    for name in MODEL_KEYS:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t[name] = model.get_parameter(name)
    for i, layer in enumerate(model.model.layers.layers):
        for kind, branch in _branches(layer).items():
            for name, p in branch.named_parameters():
                if LAYER_KEY_BRANCH.get(name.split(".")[0]) is not kind:
                    raise ValueError(f"revengine.convert: {kind.__name__}.{name} has no place in the HF key map")
                t[f"model.layers.{i}.{name}"] = p
    return t


def new_parameters(model) -> List[nn.Parameter]:
    """The parameters of a converted model that have no pretrained counterpart (RevFFN's adapters),
    in module order."""
    pretrained = {id(p) for p in hf_parameter_map(model).values()}
    return [p for p in model.parameters() if id(p) not in pretrained]


def _hf_state(hf_model) -> Dict[str, torch.Tensor]:
    sd = dict(hf_model.state_dict())
    if getattr(hf_model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq") and "original_inv_freq" not in k}


@torch.no_grad()
def init_revffn_adapters(model, method: str = "coordinate", scale: float = 1.0) -> None:
    """Initialises the RevFFN projection adapters of every layer.

    "coordinate" (default): the two d/2 streams are the two halves of the pretrained d-wide hidden
        state h = [x1, x2] (Sequential's split="halves" of the embedding). The up-projections put a
        half back at its coordinates (U_q x1 = [x1, 0], U_kv x2 = [0, x2], U_m y1 = [y1, 0]); the
        down-projections keep the half of the branch output that belongs to the stream it updates
        (D_a = [I 0] -> x1, D_m = [0 I] -> x2), times `scale`. RMSNorm is scale-invariant, so the
        pretrained norms see the half-zero input at the usual scale. Each branch sees half of the
        state the original layer saw, which is the closest a d/2 stream gets without training.
    "zero": D_* = 0 (every layer starts as the identity: the model is embed -> norm -> head), U_*
        as above. Trivially invertible; the pretrained layers enter as the adapters train.
    Measured gaps: benchmarks/convert_gap.py.
    """
    if method not in ADAPTER_INITS:
        raise ValueError(f"init_revffn_adapters: method must be one of {ADAPTER_INITS}, got {method!r}")
    for layer in model.modules():
        if not isinstance(layer, RevFFNLayer):
            continue
        half = layer.up_q.in_features
        eye = torch.eye(half, dtype=layer.up_q.weight.dtype, device=layer.up_q.weight.device)
        zero = torch.zeros_like(eye)
        top, bottom = torch.cat([eye, zero], 0), torch.cat([zero, eye], 0)  # [d, d/2]
        layer.up_q.weight.copy_(top)
        layer.up_kv.weight.copy_(bottom)
        layer.up_moe.weight.copy_(top)
        s = 0.0 if method == "zero" else float(scale)
        layer.down_attn.weight.copy_(s * top.t())
        layer.down_moe.weight.copy_(s * bottom.t())


def _build_dtype(dtype):
    """The dtype to construct in (float64 stays float64; half types build in float32, then cast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def from_hf(model_or_path, scheme: str = "bdia", reversible_mode: str = "reversible",
            adapter_init: str = "coordinate", adapter_scale: float = 1.0, **config_overrides):
    """A RevMoEForCausalLM holding copies of an HF MoE causal LM's weights.

    Args:
        model_or_path: a MixtralForCausalLM / Qwen2MoeForCausalLM / Qwen3MoeForCausalLM /
            OlmoeForCausalLM instance, or a folder that `load_hf` loads (in its own dtype).
        scheme: the reversible layer, one of `revengine.models.BLOCK_TYPES` (RevMoEConfig.block_type).
            The default, "bdia", is the only one that starts as the original model (eval mode is
            the HF function; no new parameters), so fine-tuning starts from the pretrained loss.
        reversible_mode: "reversible", "checkpoint" or "plain" (`revengine.MODES`).
        adapter_init, adapter_scale: RevFFN's projection adapters (see `init_revffn_adapters`).
        **config_overrides: further RevMoEConfig fields (e.g. exact=True, moe_chunk_size).

    Returns:
        The converted model, with the source's dtype, device and train/eval mode. The source
        model is not modified: every tensor is copied.

    Raises:
        ValueError: an unknown scheme, an unsupported architecture or feature (named), or a
            config override that changes a shape (the message names the tensor).
        TypeError: model_or_path is neither a model nor a path.
    """
    if scheme not in BLOCK_TYPES:
        raise ValueError(f"from_hf: scheme must be one of {BLOCK_TYPES}, got {scheme!r}")
    hf = load_hf(model_or_path) if isinstance(model_or_path, str) else model_or_path
    if not isinstance(hf, nn.Module):
        raise TypeError(f"from_hf: expected an HF model or a path, got {type(hf).__name__}")
    fam = hf_family(hf)
    config = revmoe_config_from_hf(hf.config, scheme, reversible_mode, **config_overrides)
    src = _hf_state(hf)
    emb = src["model.embed_tokens.weight"]
    # Build on the source's device and dtype (init then overwritten: its cost is one init pass).
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_build_dtype(emb.dtype))
        with torch.device(emb.device):
            model = RevMoEForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype=emb.dtype)
    targets = hf_parameter_map(model)
    problems, missing = [], []
    for name, dst in targets.items():
        if name not in src:
            missing.append(name)
        elif tuple(src[name].shape) != tuple(dst.shape):
            problems.append(f"{name}: HF {tuple(src[name].shape)} vs RevMoE {tuple(dst.shape)}")
    unused = sorted(set(src) - set(targets))
    if missing or unused:
        _unsupported(fam, f"parameters without a counterpart: HF-only {unused[:6]}, RevMoE-only {missing[:6]}")
    if problems:
        raise ValueError(f"revengine.convert: {len(problems)} tensors do not fit the RevMoE config "
                         f"(check the config overrides): " + "; ".join(problems[:6]))
    for name, dst in targets.items():
        dst.copy_(src[name])  # a copy: training the result never touches the source
    if scheme == "revffn":
        init_revffn_adapters(model, adapter_init, adapter_scale)
    model.hf_model_type = fam  # remembered for to_hf
    model.train(hf.training)
    return model


# ---------------------------------------------------------------------------------------------
# Streaming conversion: a checkpoint larger than memory, one decoder layer at a time


class _CheckpointFiles:
    """The tensors of a safetensors checkpoint folder (model.safetensors, or the shards that
    model.safetensors.index.json names), read by name without mapping the whole folder."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self._open = safe_open
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                weight_map = read_config_json(index)["weight_map"]
            except (KeyError, TypeError):
                raise ValueError(f"{index}: no weight_map (not a safetensors index)") from None
            self.file_of = {k: os.path.join(model_dir, f) for k, f in weight_map.items()}
        elif os.path.isfile(single):
            self.file_of = {k: single for k in self._keys(single)}
        else:
            raise ValueError(f"{model_dir}: no model.safetensors or model.safetensors.index.json (stream_from_hf "
                             "reads safetensors checkpoints)")
        for path in sorted(set(self.file_of.values())):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: named by the checkpoint's index but missing")

    def _keys(self, path: str) -> List[str]:
        try:
            with self._open(path, "pt") as fh:
                return list(fh.keys())
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None

    def read(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        """The named tensors (copies), each file opened once and closed again."""
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for path, names in by_file.items():
            try:
                with self._open(path, "pt") as fh:
                    for k in names:
                        out[k] = fh.get_tensor(k).clone()  # a copy: the file's mapping goes with the close
            except Exception as e:
                raise ValueError(f"{path}: cannot read {names[0]} ({e}); a truncated or damaged shard?") from None
        return out


def _checkpoint_sources(fam: str, target: str, shape: Tuple[int, ...]) -> Tuple[List[str], Callable]:
    """The checkpoint file's keys that make the converted model's tensor `target` (HF's in-memory
    name), and how: the fused experts stack one matrix per expert ([E, 2I, d] = gate rows, then up
    rows, per expert; [E, d, I] = down), everything else is one key under its own name."""
    block, gate, up, down = FAMILIES[fam].expert_files
    prefix, sep, leaf = target.rpartition(".mlp.experts.")
    if sep and leaf in ("gate_up_proj", "down_proj"):
        base = f"{prefix}.{block}.experts"
        if leaf == "down_proj":
            keys = [f"{base}.{e}.{down}.weight" for e in range(shape[0])]
            return keys, lambda ts: torch.stack(ts)
        keys = [f"{base}.{e}.{w}.weight" for e in range(shape[0]) for w in (gate, up)]
        return keys, lambda ts: torch.stack([torch.cat(ts[i:i + 2]) for i in range(0, len(ts), 2)])
    if block != "mlp" and ".mlp." in target:
        target = target.replace(".mlp.", f".{block}.")
    return [target], lambda ts: ts[0]


@torch.no_grad()
def stream_from_hf(model_dir: str, store_dir: str, scheme: str = "bdia", reversible_mode: str = "reversible",
                   dtype: Union[torch.dtype, str] = "auto", build: bool = True, **config_overrides):
    """Converts an HF MoE checkpoint folder into a `revengine.offload.LayerStore` in `store_dir`,
    one decoder layer at a time: each layer is given memory, filled from the checkpoint's
    safetensors files (the hub's one-matrix-per-expert layout, or HF's fused one), written to the
    store and released, so that peak memory is one layer plus the embeddings and the LM head,
    whatever the model's size. The result is what `from_hf` makes, bit for bit.

    Args:
        model_dir: a folder with config.json and model.safetensors (or sharded files with
            model.safetensors.index.json).
        store_dir: the store's folder (created; must not hold a store already).
        scheme, reversible_mode, **config_overrides: as `from_hf`.
        dtype: the converted model's dtype ("auto": the checkpoint's, from config.json).
        build: False: write nothing and read no weights: the model of a store built before, for
            `LayerStore.open` to fill (a resumed run).

    Returns:
        The RevMoEForCausalLM, in training mode, with its embeddings, final norm and LM head in
        memory (`open` releases an untied embedding and head too) and its decoder layers released
        (empty): train it through the store,

            model = stream_from_hf("ckpt", "run/store", dtype=torch.float32)
            opt = revengine.optim.InBackwardOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-5)
            store = revengine.offload.LayerStore.open(model, opt, "run/store")

    Raises:
        ValueError: no config.json or safetensors files, an unsupported architecture, a tensor the
            checkpoint lacks or has in another shape, or one the model has no place for (named);
            nothing is written then. A truncated or damaged shard (named), found while reading.
        revengine.offload.OffloadError: the store folder cannot be written or holds a store already.
    """
    from revengine.offload import LayerStore

    if scheme not in BLOCK_TYPES:
        raise ValueError(f"stream_from_hf: scheme must be one of {BLOCK_TYPES}, got {scheme!r}")
    if scheme == "revffn":
        raise ValueError("stream_from_hf: scheme 'revffn' adds adapters that are initialised from the whole model; "
                         "convert it with from_hf, or stream a scheme without new parameters (bdia)")
    read_model_config(model_dir)  # a clear error for a folder without config.json
    hf_config = _transformers().AutoConfig.from_pretrained(model_dir)
    fam = hf_family(hf_config)
    config = revmoe_config_from_hf(hf_config, scheme, reversible_mode, **config_overrides)
    if dtype == "auto":
        dtype = getattr(hf_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_build_dtype(dtype))
        with torch.device("meta"):  # shapes only: no layer has memory until its turn
            model = RevMoEForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype=dtype)
    model.hf_model_type = fam
    if not build:
        for name in MODEL_KEYS:
            model.get_submodule(name.rpartition(".")[0]).to_empty(device="cpu", recurse=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        LayerStore.empty_layers(model)
        return model.train()
    files = _CheckpointFiles(model_dir)
    targets = hf_parameter_map(model)
    sources = {name: _checkpoint_sources(fam, name, tuple(p.shape)) for name, p in targets.items()}
    wanted = {k for keys, _ in sources.values() for k in keys}
    missing = sorted(wanted - set(files.file_of))
    unused = sorted(k for k in set(files.file_of) - wanted
                    if not k.endswith("rotary_emb.inv_freq") and not (k == "lm_head.weight" and config.tie_word_embeddings))
    if missing or unused:
        _unsupported(fam, f"checkpoint tensors without a counterpart: file-only {unused[:6]}, missing {missing[:6]}")

    def fill(name: str, dst: torch.Tensor) -> None:
        keys, combine = sources[name]
        got = files.read(keys)
        src = combine([got[k] for k in keys])
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{model_dir}: {name} is {tuple(src.shape)} in the checkpoint, the RevMoE config "
                             f"makes it {tuple(dst.shape)} (check the config overrides)")
        dst.copy_(src)

    # the tensors outside the decoder layers: real now, and filled (a tied head is the embedding)
    for name in MODEL_KEYS:
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name in MODEL_KEYS:
        if name in targets:
            fill(name, model.get_parameter(name))

    def fill_layer(i: int, layer: nn.Module) -> None:
        filled = set()
        for kind, branch in _branches(layer).items():
            for name, p in branch.named_parameters():
                fill(f"model.layers.{i}.{name}", p)
                filled.add(id(p))
        left = [n for n, p in layer.named_parameters() if id(p) not in filled]
        if left:  # no scheme but revffn has any; a new one must say how they start
            raise ValueError(f"stream_from_hf: layer {i}'s {left[0]} has no pretrained counterpart")
    LayerStore.build(model, store_dir, fill_layer)
    return model.train()


# ---------------------------------------------------------------------------------------------
# Export


def _exact_export(cfg) -> Optional[str]:
    """None when the reversible stack computes HF's residual chain exactly, else why not."""
    bt = cfg.block_type
    if bt == "revffn":
        return ("block_type='revffn' runs half-width streams through projection adapters, which have no "
                "counterpart in the HF architecture")
    if bt == "bdia":
        return None  # eval mode is HF's x + f(x) (exact=True only rounds each increment to 2^-exact_bits)
    if cfg.exact:
        return "exact=True rounds every increment to a fixed-point grid, which the HF model does not"
    why = (f"block_type={bt!r} chains the layers differently from the HF residual x + f(x) "
           f"({'the MoE branch reads the other stream' if bt in ('additive', 'hamiltonian') else 'a two-step update'})")
    if bt in ("additive", "hamiltonian"):
        return why
    if cfg.num_hidden_layers != 1:
        return why + f"; only a single layer matches it, this model has {cfg.num_hidden_layers}"
    if cfg.stochastic_gamma not in (None, 1.0):
        return "the stochastic midpoint mixes p_prev and p"
    h = cfg.h
    if cfg.boundary == "euler":
        return None if h == 1.0 else f"the Euler start adds h*f(x) with h={h}, not f(x)"
    want = 0.5 if bt == "midpoint" else 1.0
    return None if h == want else f"{bt} with p_-1 = p_0 adds {'2h' if bt == 'midpoint' else 'h^2'} f(x) with h={h}"


def _guess_family(cfg) -> str:
    if cfg.qk_norm == "full":
        return "olmoe"
    if cfg.qk_norm:
        return "qwen3_moe"
    if cfg.shared_expert_intermediate_size > 0 or cfg.attention_bias:
        return "qwen2_moe"
    return "mixtral" if cfg.norm_topk_prob else "qwen3_moe"


def hf_config_from_revmoe(cfg, family: str, **hf_kwargs):
    """The transformers config of `family` (a model_type of FAMILIES) with a RevMoEConfig's shapes;
    ValueError when the RevMoE model has a feature the family lacks, or lacks one it has."""
    if family not in FAMILIES:
        raise ValueError(f"to_hf: unknown family {family!r}; one of {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    tf = _transformers()
    hd = cfg.head_size
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  num_experts_per_tok=cfg.num_experts_per_tok, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                  initializer_range=cfg.initializer_range, router_aux_loss_coef=cfg.router_aux_loss_coef,
                  pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    fields[spec.num_experts] = cfg.num_experts
    fields[spec.expert_width] = cfg.moe_intermediate_size
    problems = []
    if spec.always_renormalise:
        if not cfg.norm_topk_prob:
            problems.append("it always renormalises the top-k weights (norm_topk_prob=False)")
    else:
        fields["norm_topk_prob"] = cfg.norm_topk_prob
    if bool(cfg.shared_expert_intermediate_size) != spec.shared_expert:
        problems.append("it has a shared expert" if spec.shared_expert else "it has no shared expert")
    if spec.shared_expert:
        fields["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        fields["intermediate_size"] = cfg.shared_expert_intermediate_size
    qk_norm = "head" if cfg.qk_norm is True else cfg.qk_norm
    if qk_norm != spec.qk_norm:
        problems.append(f"its q/k norm is {spec.qk_norm or 'absent'}, the model's {qk_norm or 'absent'}")
    if spec.qkv_bias:
        fields[spec.qkv_bias] = cfg.attention_bias
    elif cfg.attention_bias:
        problems.append("it has no q/k/v-only bias")
    if spec.head_dim_field:
        fields["head_dim"] = hd
    elif hd * cfg.num_attention_heads != cfg.hidden_size:
        problems.append("it derives head_dim from hidden_size")
    if problems:
        raise ValueError(f"to_hf: the model does not fit {spec.hf_class}: " + "; ".join(problems))
    return getattr(tf, spec.config_class)(**fields, **hf_kwargs)


@torch.no_grad()
def to_hf(model, family: Optional[str] = None, allow_function_change: bool = False, **hf_config_kwargs):
    """The HF causal LM (Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE) holding copies of `model`'s weights.

    Raises ValueError when the HF model would compute a different function (see the module
    docstring: exact only for a one-layer midpoint/leapfrog stack) unless allow_function_change=True,
    which exports the full-width schemes' pretrained-shaped weights anyway; revffn never exports.
    family: the HF model_type; default the one from_hf converted from, else inferred from the config.
    hf_config_kwargs: passed to the HF config (e.g. experts_implementation="eager" for float64 on CPU).
    """
    tf = _transformers()
    cfg = model.config
    why = _exact_export(cfg)
    if why is not None and (cfg.block_type == "revffn" or not allow_function_change):
        raise ValueError(f"to_hf: cannot export exactly: {why}. "
                         + ("" if cfg.block_type == "revffn" else
                            "Pass allow_function_change=True to export the weights into the HF residual architecture "
                            "anyway (a different function)."))
    family = family or getattr(model, "hf_model_type", None) or _guess_family(cfg)
    hfc = hf_config_from_revmoe(cfg, family, **hf_config_kwargs)
    p0 = model.model.embed_tokens.weight
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_build_dtype(p0.dtype))
        with torch.device(p0.device):
            hf = getattr(tf, FAMILIES[family].hf_class)(hfc)
    finally:
        torch.set_default_dtype(prev)
    hf.to(dtype=p0.dtype)
    dst = _hf_state(hf)
    src = hf_parameter_map(model)
    if set(dst) != set(src):
        raise ValueError(f"to_hf: parameter names differ: HF-only {sorted(set(dst) - set(src))[:6]}, "
                         f"RevMoE-only {sorted(set(src) - set(dst))[:6]}")
    for name, t in dst.items():
        if t.shape != src[name].shape:
            raise ValueError(f"to_hf: {name}: RevMoE {tuple(src[name].shape)} vs HF {tuple(t.shape)}")
        t.copy_(src[name])
    hf.train(model.training)
    return hf


# ---------------------------------------------------------------------------------------------
# Upcycling a dense model


def _no_init_weights():
    """transformers' context that skips weight initialisation, where this version has it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def upcycle(dense_model, num_experts: int, top_k: int, router_std: Optional[float] = None,
            generator: Optional[torch.Generator] = None, **mixtral_config_kwargs):
    """A MixtralForCausalLM whose every expert is a copy of the dense LlamaForCausalLM's MLP.

    The router is random (normal, std `router_std`, default the config's initializer_range); Mixtral
    renormalises the top-k weights to sum to one, so each MoE layer outputs the dense MLP's output
    and the loss equals the dense model's (up to rounding). The dense model is not modified.
    mixtral_config_kwargs: passed to MixtralConfig (e.g. experts_implementation="eager": HF's default
    grouped-GEMM experts do not run in float64 on CPU).
    """
    tf = _transformers()
    c = dense_model.config
    if getattr(c, "model_type", None) != "llama" or not hasattr(dense_model, "lm_head"):
        raise ValueError(f"upcycle: expected a dense LlamaForCausalLM, got {type(dense_model).__name__} "
                         f"(model_type={getattr(c, 'model_type', None)!r})")
    if not (1 <= top_k <= num_experts):
        raise ValueError(f"upcycle: need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    for name, bad in (("attention_bias", getattr(c, "attention_bias", False)), ("mlp_bias", getattr(c, "mlp_bias", False)),
                      ("pretraining_tp != 1", getattr(c, "pretraining_tp", 1) != 1),
                      (f"hidden_act={getattr(c, 'hidden_act', 'silu')!r}", getattr(c, "hidden_act", "silu") != "silu")):
        if bad:
            raise ValueError(f"upcycle: Mixtral has no counterpart for the Llama model's {name}")
    d = c.to_dict()
    for k in ("architectures", "model_type", "transformers_version", "attention_bias", "mlp_bias", "pretraining_tp",
              "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    d["head_dim"] = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d.update(num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0)
    d.update(mixtral_config_kwargs)
    mc = tf.MixtralConfig(**d)
    p0 = dense_model.model.embed_tokens.weight
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(_build_dtype(p0.dtype))
        # every weight is written below: skip HF's random init (seconds for a real model)
        with torch.device(p0.device), _no_init_weights():
            moe = tf.MixtralForCausalLM(mc)
    finally:
        torch.set_default_dtype(prev)
    moe.to(dtype=p0.dtype)
    src = dense_model.state_dict()
    dst = moe.state_dict()
    std = float(router_std if router_std is not None else getattr(c, "initializer_range", 0.02))
    for name, t in dst.items():
        if "rotary_emb" in name:
            continue
        if ".mlp." not in name:
            if name not in src or src[name].shape != t.shape:
                raise ValueError(f"upcycle: {name} has no counterpart of shape {tuple(t.shape)} in the dense model")
            t.copy_(src[name])
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("mlp.gate.weight"):
            r = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
            t.copy_(r.to(t.dtype))
        elif name.endswith("experts.gate_up_proj"):
            gu = torch.cat([src[prefix + "gate_proj.weight"], src[prefix + "up_proj.weight"]], 0)  # gate rows first
            t.copy_(gu[None].expand_as(t))
        elif name.endswith("experts.down_proj"):
            t.copy_(src[prefix + "down_proj.weight"][None].expand_as(t))
        else:
            raise ValueError(f"upcycle: unexpected Mixtral parameter {name}")
    if mc.tie_word_embeddings:
        moe.tie_weights()
    moe.train(dense_model.training)
    return moe


# ---------------------------------------------------------------------------------------------
# Measuring the gap


@torch.no_grad()
def conversion_gap(hf_model, model, input_ids: torch.Tensor) -> Dict[str, float]:
    """Next-token loss of the HF model and of the converted model on `input_ids`, and the mean
    per-token KL(p_hf || p_rev) of their next-token distributions (nats)."""
    lp_hf = hf_model(input_ids=input_ids, use_cache=False).logits.double().log_softmax(-1)
    lp = model(input_ids, return_logits=True).logits.double().log_softmax(-1)
    kl = (lp_hf.exp() * (lp_hf - lp)).sum(-1).mean()
    tgt = input_ids[:, 1:, None]
    nll = lambda logp: float(-logp[:, :-1].gather(-1, tgt).mean())  # noqa: E731  (HF's loss is float32)
    return {"loss_hf": nll(lp_hf), "loss_rev": nll(lp), "kl": float(kl)}
