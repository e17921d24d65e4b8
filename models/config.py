"""RevMoEConfig: the configuration of a reversible MoE causal language model.

Field names follow Hugging Face's (Qwen2-MoE / Mixtral / OLMoE) so that converted checkpoints
keep their numbers; the reversible fields (block_type, reversible_mode, exact, ...) are ours.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from revengine.integrators import BDIA
from revengine.sequential import MODES


def read_config_json(path: str) -> Dict[str, Any]:
    """A model's config.json (ours or Hugging Face's) as a dict; a file that is not JSON text is a
    ValueError naming path:line."""
    with open(path) as fh:
        try:
            return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise ValueError(f"{path}{where}: not a valid config.json ({e})") from None


# The automatic working-set options (RevMoEConfig.working_set).
AUTO_MOE_CHUNK = 256  # tokens per expert chunk
AUTO_LOGITS_ELEMENTS = 1 << 20  # logits per cross-entropy chunk (4 MiB in fp32)


def auto_loss_chunk(vocab_size: int) -> int:
    """Tokens per cross-entropy chunk when none is set: AUTO_LOGITS_ELEMENTS logits, 16 to 1024 tokens."""
    return max(16, min(1024, AUTO_LOGITS_ELEMENTS // vocab_size))

BLOCK_TYPES = ("revffn", "additive", "midpoint", "leapfrog", "hamiltonian", "bdia")
FIXED_POINT_FALLBACKS = ("error", "warn", "store")
EXACT_BLOCK_TYPES = ("additive", "midpoint", "leapfrog", "hamiltonian", "bdia")


@dataclass
class RevMoEConfig:
    vocab_size: int = 16384
    hidden_size: int = 256
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    num_experts: int = 16
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 176
    shared_expert_intermediate_size: int = 704  # 0 = no shared expert
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    # RMSNorm on queries and keys: False (none), True or "head" (per head, over head_dim: Qwen3-MoE),
    # "full" (over the whole projection width before the head split: OLMoE)
    qk_norm: Any = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # -- reversible architecture ------------------------------------------------------------
    block_type: str = "revffn"
    reversible_mode: str = "reversible"
    exact: Optional[bool] = None  # None: True for block_type='bdia' (its reversible mode needs it), else False
    exact_bits: Optional[int] = None  # None: 24 for bdia (below fp32's resolution of O(1) states), else 16
    step_size: Optional[float] = None  # integrators' h; None: 0.5 for midpoint, 1.0 otherwise
    boundary: str = "duplicate"  # integrators' p_-1: "duplicate" (= p_0) or "euler" (bootstrap)
    stochastic_gamma: Optional[float] = None  # midpoint only: < 1 makes it the stochastic midpoint
    # bdia: g = +-bdia_gamma per sample in training, 0 in eval (the residual network). 2^-k for
    # exact=True, which reversible mode needs (the float inverse multiplies the error by 2^k per
    # layer); exact keeps k bits per element and layer. 1/16 by default: the paper's 1/2 perturbs a
    # converted pretrained model far more (benchmarks/bdia_gamma.py, SmolLM2 upcycled, answer loss in
    # training mode: 13.3 at 1/2, 7.5 at 1/4, 5.39 at 1/16, 5.26 at 1/256; 5.25 in eval).
    bdia_gamma: float = 0.0625
    fixed_point_iters: int = 50  # revffn: iterations of the attention branch's inverse
    fixed_point_tol: Optional[float] = None  # revffn: relative residual that counts as converged
    # revffn: history length of the inverse's Anderson acceleration (per token; converges where the
    # attention branch is not a contraction, benchmarks/revffn_contraction.py); 0: damped plain iteration
    fixed_point_memory: int = 6
    # (None: by the stream dtype, 1e-12 for float64, 1e-5 for float32, 1e-2 below)
    # revffn, when the inverse does not converge: "store" (the default: checked in forward, such layers
    # keep their left input, exact, at the cost of memory and F evaluations; a training run goes on),
    # "warn" or "error"
    fixed_point_fallback: str = "store"
    replay_routing: bool = True
    # -- the working set of one layer (and of the loss) per token. Each option left None is chosen
    # from the number of tokens in the batch (see working_set); set one to fix it.
    # Tokens per chunk of the LM-head cross-entropy (its logits exist one chunk at a time).
    loss_chunk_size: Optional[int] = None
    # Tokens per chunk in which the experts (and the shared expert) run with grad, each chunk keeping
    # only its input and recomputed in backward (0: off). Caps a layer's working set in backward at
    # one chunk's, for one extra expert forward per layer.
    moe_chunk_size: Optional[int] = None
    # Attention branches (every block type) keep only their inputs when run with grad and recompute
    # the rest in backward, so a layer's re-run holds the attention's and the MoE's intermediates one
    # after the other instead of together. Costs one extra attention forward per layer in backward.
    attention_recompute: Optional[bool] = None
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    model_type: str = field(default="revmoe", init=False)

    def __post_init__(self):
        if self.exact is None:
            self.exact = self.block_type == "bdia"
        if self.exact_bits is None:
            self.exact_bits = 24 if self.block_type == "bdia" else 16
        self.validate()

    def get_text_config(self, decoder=None, encoder=None) -> "RevMoEConfig":
        """The text model's config, as transformers' PretrainedConfig answers (this is one)."""
        return self

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def h(self) -> float:
        if self.step_size is not None:
            return float(self.step_size)
        return 0.5 if self.block_type == "midpoint" else 1.0

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"RevMoEConfig: {msg}")

        need(self.block_type in BLOCK_TYPES, f"block_type must be one of {BLOCK_TYPES}, got {self.block_type!r}")
        need(self.reversible_mode in MODES,
             f"reversible_mode must be one of {MODES}, got {self.reversible_mode!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads}) "
             "or head_dim given")
        need(self.head_size % 2 == 0, f"the head dimension must be even for RoPE, got {self.head_size}")
        if self.block_type == "revffn":
            need(self.hidden_size % 2 == 0, f"block_type='revffn' splits the hidden state in halves: hidden_size must be "
                 f"even, got {self.hidden_size}")
        need(self.boundary in ("duplicate", "euler"), f"boundary must be 'duplicate' or 'euler', got {self.boundary!r}")
        need(self.fixed_point_fallback in FIXED_POINT_FALLBACKS,
             f"fixed_point_fallback must be one of {FIXED_POINT_FALLBACKS}, got {self.fixed_point_fallback!r}")
        need(self.fixed_point_iters >= 1, "fixed_point_iters must be >= 1")
        need(self.fixed_point_memory >= 0, "fixed_point_memory must be >= 0")
        if self.exact:
            need(self.block_type in EXACT_BLOCK_TYPES and self.stochastic_gamma in (None, 1.0),
                 f"exact=True needs a block type that only adds and subtracts increments {EXACT_BLOCK_TYPES}; "
                 f"{self.block_type!r} does not")
        if self.block_type == "bdia":
            need(0.0 < self.bdia_gamma <= 1.0, f"bdia_gamma must be in (0, 1], got {self.bdia_gamma}")
            need(self.step_size is None, "block_type='bdia' has no step size (its eval mode is x + f(x))")
            need(self.exact or self.reversible_mode != "reversible",
                 "block_type='bdia' in reversible mode needs exact=True: its floating-point inverse divides by "
                 f"g = +-{self.bdia_gamma} and multiplies the rounding error by {1 / self.bdia_gamma:g} per layer")
            if self.exact:
                need(BDIA.exact_shift(self.bdia_gamma) > 0,
                     f"exact=True needs bdia_gamma = 2^-k (k = 1..8), got {self.bdia_gamma}")
        if self.stochastic_gamma is not None:
            need(self.block_type == "midpoint", "stochastic_gamma applies to block_type='midpoint' only")
            need(self.stochastic_gamma != 0.0, "stochastic_gamma = 0 is forward Euler, which is not invertible")
        need(self.qk_norm in (False, True, "head", "full"),
             f"qk_norm must be False, True/'head' (per head) or 'full' (whole projection), got {self.qk_norm!r}")
        need(self.loss_chunk_size is None or self.loss_chunk_size > 0, "loss_chunk_size must be positive (or None: automatic)")
        need(self.moe_chunk_size is None or self.moe_chunk_size >= 0,
             "moe_chunk_size must be >= 0 (0 = off; None: automatic)")
        need(self.attention_recompute in (None, True, False, 0, 1),
             f"attention_recompute must be True, False or None (automatic), got {self.attention_recompute!r}")

    # -- the working set ------------------------------------------------------------------------

    def working_set(self, tokens: int) -> Dict[str, Any]:
        """The working-set options a batch of `tokens` tokens (batch x sequence) runs with: each field
        that is set, else its automatic value.

        Automatic: the experts run in chunks of AUTO_MOE_CHUNK tokens and the attention branches are
        recomputed in backward once the batch has more tokens than one such chunk (below that a
        chunk would be the whole batch, and recomputing buys nothing); the cross-entropy runs in
        chunks of AUTO_LOGITS_ELEMENTS // vocab_size tokens (64 for a 16384-token vocabulary; at
        least 16, at most 1024). With these a layer's working set in backward grows with the
        tokens only by the tensors every token needs (its hidden states and the attention's keys
        and values), and the loss's by one hidden state: bytes per token stay low and flat in depth.
        """
        big = tokens > AUTO_MOE_CHUNK
        moe = self.moe_chunk_size if self.moe_chunk_size is not None else (AUTO_MOE_CHUNK if big else 0)
        attn = bool(self.attention_recompute) if self.attention_recompute is not None else big
        loss = self.loss_chunk_size if self.loss_chunk_size is not None else auto_loss_chunk(self.vocab_size)
        return {"moe_chunk_size": int(moe), "attention_recompute": attn, "loss_chunk_size": int(loss)}

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], **overrides) -> "RevMoEConfig":
        d = {**d, **overrides}
        if d.get("model_type", "revmoe") != "revmoe":
            raise ValueError(f"RevMoEConfig: not a revmoe config (model_type={d.get('model_type')!r})")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - names - {"model_type"})
        if unknown:
            raise ValueError(f"RevMoEConfig: unknown fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str, **overrides) -> "RevMoEConfig":
        path = os.path.join(directory, "config.json") if os.path.isdir(directory) else directory
        return cls.from_dict(read_config_json(path), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "RevMoEConfig":
        """Named shapes: "qwen-moe-mini" (Qwen1.5-MoE-A2.7B's proportions scaled down, 76M parameters) and "tiny" (tests)."""
        presets = {
            "qwen-moe-mini": dict(),
            "tiny": dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                         shared_expert_intermediate_size=32, max_position_embeddings=256),
        }
        if name not in presets:
            raise ValueError(f"RevMoEConfig.preset: unknown preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})
