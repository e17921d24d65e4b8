"""RevMoEForCausalLM: a reversible Mixture-of-Experts causal language model.

    embedding -> revengine.Sequential of reversible decoder layers -> RMSNorm -> LM head

block_type picks the reversible layer (config.py): RevFFN's split-stream cross-branch layer,
the Reformer/RevViT additive coupling, or Gal et al.'s midpoint / leapfrog / Hamiltonian
integrators around the unchanged pre-norm block. reversible_mode picks how backward gets the
activations ("reversible": reconstructed by the C++ executor; "checkpoint"; "plain"). The
cross-entropy of the LM head runs in chunks, so a whole sequence's logits never exist at once.
"""
import contextlib
import dataclasses
import os
import tempfile
from collections import OrderedDict
from typing import List, Optional, Union

import torch
from torch import nn

from revengine import side
from revengine.couplings import AdditiveCoupling, Coupling
from revengine.integrators import BDIA, EulerStart, Hamiltonian, Leapfrog, Midpoint, StochasticMidpoint
from revengine.sequential import Sequential

from .blocks import AttnBranch, BlockIncrement, MoEBranch
from .config import RevMoEConfig
from .layers import KVCache, RMSNorm, embed, init_weights, rope_tables
from .loss import chunked_cross_entropy
from .revffn import RevFFNLayer

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Reversible layers


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """module.eval() for the block, then its previous mode back (bdia's signs and dropout off)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def build_layer(config: RevMoEConfig, i: int) -> Coupling:
    bt, h = config.block_type, config.h
    if bt == "revffn":
        return RevFFNLayer(config, i)
    if bt == "additive":
        return AdditiveCoupling(AttnBranch(config, i), MoEBranch(config))
    if bt == "hamiltonian":
        return Hamiltonian(AttnBranch(config, i), MoEBranch(config), h=h)
    f = BlockIncrement(config, i)
    if bt == "bdia":
        return BDIA(f, gamma=config.bdia_gamma)
    if i == 0 and config.boundary == "euler":
        return EulerStart(f, h=h)
    if bt == "leapfrog":
        return Leapfrog(f, h=h)
    if config.stochastic_gamma not in (None, 1.0):
        return StochasticMidpoint(f, h=h, gamma=config.stochastic_gamma)
    return Midpoint(f, h=h)


STACK_LAYOUT = {  # block_type -> (split, merge)
    "revffn": ("halves", "cat"),
    "additive": ("duplicate", "mean"),
    "midpoint": ("duplicate", "last"),
    "leapfrog": ("duplicate", "last"),
    "hamiltonian": ("duplicate", "last"),
    "bdia": ("duplicate", "last"),
}


# ---------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass
class GenerationDefaults:
    """What generate() uses when not told (transformers' GenerationConfig fields of that name;
    trainers set them from the tokenizer). eos_token_id may be a list: any of them ends."""
    pad_token_id: Optional[int] = None
    eos_token_id: Union[int, List[int], None] = None


class RevMoEOutput(OrderedDict):
    """HF-style output: attribute or key access; integer indexing skips the None fields."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, k):
        if isinstance(k, int):
            return [v for v in self.values() if v is not None][k]
        return super().__getitem__(k)

    def to_tuple(self):
        return tuple(v for v in self.values() if v is not None)


class RevMoEModel(nn.Module):
    def __init__(self, config: RevMoEConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        split, merge = STACK_LAYOUT[config.block_type]
        self.layers = Sequential(
            *[build_layer(config, i) for i in range(config.num_hidden_layers)],
            split=split, merge=merge, mode=config.reversible_mode, exact=config.exact, exact_bits=config.exact_bits,
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def prepare(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None):
        """Checks the inputs; returns the embeddings and the context every layer receives."""
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {tuple(input_ids.shape)} {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {cfg.vocab_size}): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        B, S = input_ids.shape
        past = cache.length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + S):
            raise ValueError(f"attention_mask must have shape {(B, past + S)} (batch, past + new tokens), got "
                             f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -S:]
            else:
                position_ids = torch.arange(past, past + S, device=input_ids.device)[None].expand(B, S)
        x = embed(self.embed_tokens, input_ids)
        cos, sin = rope_tables(cfg, position_ids, dtype=x.dtype)
        ctx = dict(
            position_embeddings=(cos, sin),
            # None when no token is padding: causal attention needs no mask at all (is_causal)
            attention_mask=None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool(),
            token_mask=None if attention_mask is None else attention_mask[:, -S:].to(x.dtype),
        )
        if cache is not None:
            ctx["cache"] = cache
        return x, ctx

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, **unused) -> RevMoEOutput:
        """last_hidden_state [B, S, d] (final norm applied), router_stats [L, 2] (each layer's aux
        loss and z-loss, side outputs of the reversible stack) and their means aux_loss, z_loss.
        Other keywords (use_cache, output_router_logits: what HF callers pass) are accepted and
        ignored: the router terms are always returned."""
        x, ctx = self.prepare(input_ids, attention_mask, position_ids, cache)
        with side.collect_aux() as aux:
            h = self.layers(x, **ctx)
        stats = torch.stack(list(aux)) if len(aux) else x.new_zeros(0, 2)
        return RevMoEOutput(last_hidden_state=self.norm(h), router_stats=stats,
                            aux_loss=stats[:, 0].mean(), z_loss=stats[:, 1].mean())


class RevMoEForCausalLM(nn.Module):
    """Reversible MoE causal LM with a Hugging Face-like interface.

    forward(input_ids, attention_mask=None, labels=None) -> RevMoEOutput(loss, logits, lm_loss,
    aux_loss, z_loss, past_key_values). loss = lm_loss + router_aux_loss_coef * aux_loss +
    router_z_loss_coef * z_loss; the aux terms are side outputs of every layer, so their grads
    are exact through the reversible backward.
    """

    def __init__(self, config: RevMoEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = RevMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_config = GenerationDefaults(config.pad_token_id, config.eos_token_id)
        self.model_tags: List[str] = []

    # -- what Hugging Face trainers read (Trainer, TRL's SFTTrainer) -----------------------------

    @property
    def base_model(self) -> RevMoEModel:
        """The backbone (HF's name): its output has last_hidden_state and aux_loss."""
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def add_model_tags(self, tags) -> None:
        """Tags for a model card (TRL adds its own)."""
        for t in [tags] if isinstance(tags, str) else tags:
            if t not in self.model_tags:
                self.model_tags.append(t)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.layers.mode != "plain"

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **unused) -> None:
        """HF trainers call this when asked for gradient checkpointing (TRL by default). The
        reversible and checkpoint modes already recompute in backward: nothing changes. A model in
        mode "plain" switches to "checkpoint"."""
        if self.model.layers.mode == "plain":
            self.model.layers.mode = "checkpoint"

    def activation_checkpointing_disable(self) -> None:
        """Reversible mode stays reversible (it is what this model is for); "checkpoint" goes back to
        "plain" when the config asked for plain."""
        if self.model.layers.mode == "checkpoint" and self.config.reversible_mode == "plain":
            self.model.layers.mode = "plain"

    # the names transformers < 5.25 and other trainers call
    gradient_checkpointing_enable = activation_checkpointing_enable
    gradient_checkpointing_disable = activation_checkpointing_disable

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, return_logits: Optional[bool] = None, logits_to_keep: int = 0,
                **unused) -> RevMoEOutput:
        cfg = self.config
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        backbone = self.model(input_ids, attention_mask, position_ids, past_key_values)
        hidden = backbone.last_hidden_state
        lm_loss = aux_loss = z_loss = loss = logits = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            chunk = cfg.working_set(h.shape[0])["loss_chunk_size"]
            lm_loss = chunked_cross_entropy(h, self.lm_head.weight, labels[:, 1:].reshape(-1), chunk)
            aux_loss, z_loss = backbone.aux_loss, backbone.z_loss
            loss = lm_loss + cfg.router_aux_loss_coef * aux_loss.to(lm_loss.dtype) + \
                cfg.router_z_loss_coef * z_loss.to(lm_loss.dtype)
        if return_logits or (return_logits is None and labels is None):
            keep = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(keep)
        return RevMoEOutput(loss=loss, logits=logits, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss,
                            past_key_values=past_key_values if use_cache or past_key_values is not None else None)

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Optional[Tensor] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Greedy or sampled continuation. With use_cache the keys/values of past tokens are kept
        (inference needs no reconstruction), so each new token costs one position. Runs in eval
        mode (bdia's random signs off: g = 0), then restores the module's mode."""
        with eval_mode(self):
            eos = self.generation_config.eos_token_id if eos_token_id is None else eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])  # any of them ends a sequence
            pad = self.generation_config.pad_token_id if pad_token_id is None else pad_token_id
            pad = (eos[0] if eos else None) if pad is None else pad
            ids = input_ids
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.dtype)
            cache = KVCache() if use_cache else None
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            step_in = ids
            for _ in range(max_new_tokens):
                out = self(step_in, attention_mask=mask, past_key_values=cache, return_logits=True, logits_to_keep=1)
                logits = out.logits[:, -1].float()
                if do_sample:
                    logits = logits / max(temperature, 1e-6)
                    if top_k:
                        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                if eos:
                    nxt = torch.where(done, torch.full_like(nxt, pad if pad is not None else 0), nxt)
                    done = done | torch.isin(nxt, torch.tensor(eos, device=nxt.device))
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step_in = nxt[:, None] if use_cache else ids
                if eos and bool(done.all()):
                    break
            return ids

    # -- reports ------------------------------------------------------------------------------

    def fixed_point_report(self) -> List[dict]:
        """Per RevFFN layer: iterations and relative residual of its last fixed-point inverse."""
        return [dict(layer=m.layer_idx, **m.fixed_point_stats) for m in self.modules() if isinstance(m, RevFFNLayer)]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (HF's signature: Trainer calls it for its FLOP estimate)."""
        skip = {id(self.model.embed_tokens.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        params = {id(p): p for p in self.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)}
        return sum(p.numel() for p in params.values())

    # -- save / load --------------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """config.json + model.safetensors, written to temporary names first and renamed, so an
        interrupted save never leaves something that looks like a finished model."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        try:
            save_model(self, tmp, metadata={"format": "pt", "model_type": "revmoe"})
            cfg_tmp = os.path.join(directory, "config.json.tmp")
            import json

            with open(cfg_tmp, "w") as fh:
                json.dump(self.config.to_dict(), fh, indent=2, sort_keys=True)
            # mkstemp's 0600 is not what a saved model should have (and safetensors replaces the
            # file it writes, so the mode is set on the finished file)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, os.path.join(directory, "model.safetensors"))
            os.replace(cfg_tmp, os.path.join(directory, "config.json"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_pretrained(cls, directory: str, **overrides) -> "RevMoEForCausalLM":
        """Loads save_pretrained's output. Overrides change config fields (e.g. reversible_mode);
        a checkpoint whose tensors do not fit the resulting shapes is a clear error."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(f"{directory}: no config.json (not a save_pretrained directory)")
        weights = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{directory}: no model.safetensors")
        config = RevMoEConfig.load(directory, **overrides)
        model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        with safe_open(weights, framework="pt") as fh:
            found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        problems = [f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in found
                    if k in expected and found[k] != expected[k]]
        problems += [f"unexpected tensor {k}" for k in found if k not in expected]
        if problems:
            raise ValueError(f"{directory}: checkpoint does not fit a RevMoEForCausalLM of this config "
                             f"({len(problems)} problems): " + "; ".join(problems[:6]))
        missing, unexpected = load_model(model, weights, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = [k for k in missing if k not in tied]
        if missing:
            raise ValueError(f"{directory}: checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:  # a damaged file with an intact header: fail here, not steps later inside a kernel
            raise ValueError(f"{weights}: {len(bad)} tensors hold NaN or Inf (a damaged file?), e.g. {bad[:4]}")
        return model
