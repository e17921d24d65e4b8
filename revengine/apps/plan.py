"""`revengine plan`: the peak memory of one training step of an MoE model, predicted from its
config.json for each training strategy, broken into parts, with what fits a given device.

    revengine plan --config qwen3-30b-a3b --seq 4096 --batch 1 --memory 80GB,24GB
    revengine plan --config path/to/model_dir --seq 2048 --memory 24GiB --json

Nothing is built or run: the figures come from formulas over the config's shapes (below), whose
few constants were fitted to peaks measured in fresh processes on two small MoE models and checked
on lengths and a model not used to fit them (`python benchmarks/plan_check.py`).

A strategy is `BASE/OPTIMIZER/WEIGHTS[/in-backward]`:

    BASE       hf-plain        Hugging Face training as is: every layer's activations stored
               hf-checkpoint   HF + gradient checkpointing: one hidden state per layer and token stored,
                               one layer recomputed at a time in backward
               rev-bdia        converted to a reversible BDIA model (revengine.convert.from_hf): two
                               fixed-point streams and 4 bits per element and layer stored
               rev-revffn      converted to RevFFN: two half-width streams, projection adapters added
                               (both with REV_DEFAULTS and the model's own loss chunk, which
                               --moe-chunk-size, --loss-chunk-size and --no-attention-recompute change)
    OPTIMIZER  adamw (two fp32 moments: 8 bytes per parameter), adamw8bit (~2), adamw4bit (~1)
    WEIGHTS    fp32 (4 bytes per parameter) or bf16 (2, no fp32 master copy: stochastic rounding);
               activations in the weights' dtype, the loss in fp32
    in-backward  the optimizer steps each parameter as soon as its grad is complete
               (revengine.optim.InBackwardOptimizer): the model's grads never exist at once
    offload-disk / offload-host  (reversible, in-backward) the layers and their optimizer state live on
               disk or in host memory between uses (revengine.offload.LayerStore): the device holds
               at most two layers' weights, one layer's state and one layer's grads (at the ends
               of backward an end in place of a layer: store_phases) and what stays; printed
               below the table: the store's bytes and the bytes moved per step (with --bandwidth,
               the step time they bound)

The parts, in the phase of the step that holds the peak:

    weights, optimizer   bytes per parameter x parameters (the reversible schemes' own parameters included)
    grads                every parameter's grad (all of them at the end of backward; in the optimizer
                         step with the update temporaries of the largest tensor), or under in-backward
                         the largest tensor's grad and its update temporaries
    stored activations   what forward keeps for backward across all layers
    layer working set    one layer re-run with grad in backward (checkpointing, reversible) or
                         one layer's backward temporaries (plain)
    logits               LM head + cross-entropy: HF materialises [tokens, vocab] fp32 logits, their
                         log-softmax and grad; revengine's chunked loss holds one chunk at a time

The peak is the largest of the step's phases (the loss at the top of backward, the last layer's
re-run, the end of backward where every grad exists, the optimizer step with its temporaries of the
largest tensor); the longest sequence that fits solves
peak(seq) = memory for the batch given. Attention runs causal without a mask in both (no term
quadratic in seq: the batches planned have no padding).
"""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from revengine.convert import FAMILIES
from revengine.optim import SLICE_ELEMENTS
from revengine.models.config import RevMoEConfig, auto_loss_chunk, read_config_json

PROG = "revengine plan"
GiB = float(2**30)
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")

# -- calibration ---------------------------------------------------------------------------------
# Element counts per token come from the models' code (what autograd saves, counted with
# torch.autograd.graph.saved_tensors_hooks on small models; tests/test_plan.py checks them). Four
# constants below are fitted to measured peaks (`python benchmarks/plan_check.py --fit 256 1024`:
# least squares on qwen-moe-mini at seq 256 and 1024), checked on seq 512 and on the SmolLM2-upcycled
# MoE, which were not used to fit.
CAL = {
    "hf_store": 0.99,      # HF plain: stored activations / the saved elements counted below
    "hf_logits": 2.94,     # HF loss: [tokens, vocab] fp32 tensors alive at the top of backward
    "hf_layer": 1.605,     # one HF layer's recompute + backward temporaries / its saved elements
    "rev_layer": 0.525,    # one reversible layer's re-run + backward / its saved elements (the attention
                           # branch is recomputed, the experts run in chunks: not all alive at once)
    "rev_stream_bytes": 16.0,  # not fitted: bytes per token and hidden unit a reversible stack keeps in the
                               # weights' dtype, at fp32, besides its two streams (the stack's input and
                               # output, the head's normed input and the streams' grad)
    "rev_loss_chunks": 3.0,    # not fitted: blocks of chunk x vocab fp32 logits of the chunked loss at once
                               # (a block and log-sum-exp's temporaries of it)
    # one reversible layer's vector-Jacobian product while the optimizer steps inside backward / the
    # attention's saved elements + one MoE chunk's + the chunk inputs: least squares on the resident
    # memory sampled mid-product with the store (qwen-moe-mini, fp32, 256-2048 tokens: 15-43 MiB, the
    # saved activations and their grads alive together). Without in-backward every grad is alive at
    # the end of backward and rev_layer, fitted on those peaks, stands in for it.
    "rev_layer_in_backward": 1.78,
    # the disk tier runs a CPU model, whose device memory is the process's: it also holds each layer's
    # Python objects (modules, parameters without storage, optimizer and store entries), measured as
    # resident memory above every live tensor's storage after a step (qwen-moe-mini, 12 and 48 layers)
    "disk_layer_objects": 0.22 * 2**20,
}
# Options of the converted models (RevMoEConfig fields) the reversible strategies assume.
# loss_chunk_size None: the converted model's own (auto_loss_chunk: 2^20 logits, 64 tokens at a 16384 vocabulary)
REV_DEFAULTS = dict(moe_chunk_size=256, loss_chunk_size=None, attention_recompute=True)


def rev_options_for(shapes: "Shapes", rev_options: Optional[dict] = None) -> dict:
    """The reversible model's working-set options: REV_DEFAULTS under the given ones, the loss chunk
    resolved for the vocabulary when none is set."""
    o = dict(REV_DEFAULTS, **(rev_options or {}))
    if o["loss_chunk_size"] is None:
        o["loss_chunk_size"] = auto_loss_chunk(shapes.vocab)
    return o
# BDIA's default gamma 2^-k: exact inversion keeps the k bits per element and layer that g * p drops
BDIA_DROPPED_BITS = round(-math.log2(RevMoEConfig().bdia_gamma))

BASES = ("hf-plain", "hf-checkpoint", "rev-bdia", "rev-revffn")
OPTIMIZERS = {"adamw": 8.0, "adamw8bit": 2.0 + 8.0 / 256, "adamw4bit": 1.0 + 8.0 / 128}  # state bytes per parameter
# Temporaries of one tensor's update, bytes per element. torch's AdamW (fp32 weights) stepping after
# backward, as torch builds it by default on CPU: two fp32 tensors (its per-tensor update builds the
# denominator out of place: sqrt, then the division; measured). Inside backward InBackwardOptimizer
# gives it fused=True (one kernel, no temporaries), and low-bit states and bf16 weights make none
# either, since revengine's CPU update (and torchao's compiled one on a GPU) reads and writes each
# element once (measured: the plan_check in-backward rows). The largest tensor sets the step's
# peak: the whole optimizer step after backward.
def update_temps(strategy: "Strategy") -> float:
    return 8.0 if torch_adamw(strategy) and not strategy.in_backward else 0.0


def torch_adamw(strategy: "Strategy") -> bool:
    """Whether the optimizer is torch's AdamW (fp32 weights), which InBackwardOptimizer steps in row
    slices; with bf16 weights or low-bit state it is torchao's."""
    return (strategy.optimizer, strategy.weights) == ("adamw", "fp32")


WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0}
DEFAULT_STRATEGIES = (
    "hf-plain/adamw/fp32",
    "hf-checkpoint/adamw/fp32",
    "hf-plain/adamw8bit/bf16/in-backward",
    "hf-checkpoint/adamw8bit/bf16/in-backward",
    "hf-checkpoint/adamw4bit/bf16/in-backward",
    "rev-bdia/adamw/fp32",
    "rev-bdia/adamw/fp32/in-backward",
    "rev-bdia/adamw8bit/bf16/in-backward",
    "rev-bdia/adamw4bit/bf16/in-backward",
)
PARTS = ("weights", "optimizer", "grads", "stored", "layer", "logits")
PART_TITLES = ("weights", "optimizer", "grads", "stored act.", "layer WS", "logits")


class PlanError(ValueError):
    """Bad input to the planner: the message names the flag or file:line."""


# -- configs -------------------------------------------------------------------------------------


def presets() -> List[str]:
    """The named configs shipped with revengine (config.json files, no weights)."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def resolve_config(spec: str) -> str:
    """The config.json path of a preset name, a model folder or a config.json file."""
    if spec in presets():
        return os.path.join(PRESET_DIR, spec + ".json")
    if os.path.isdir(spec):
        path = os.path.join(spec, "config.json")
        if not os.path.isfile(path):
            raise PlanError(f"--config {spec}: the folder has no config.json")
        return path
    if os.path.isfile(spec):
        return spec
    raise PlanError(f"--config {spec!r}: not a preset ({', '.join(presets())}), a model folder or a config.json")


def _line_of(path: str, key: str) -> int:
    """The line of `"key"` in a JSON file (1 when absent), for file:line messages."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if re.search(rf'"{re.escape(key)}"\s*:', line):
                    return i
    except OSError:
        pass
    return 1


@dataclass(frozen=True)
class Shapes:
    """What the formulas read from a config: HF field names, resolved for the model's family."""

    name: str
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_width: int
    shared_width: int
    tied: bool
    qk_norm: object
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg: dict, path: str = "config.json", name: Optional[str] = None) -> "Shapes":
        mt = cfg.get("model_type")
        if mt not in FAMILIES:
            raise PlanError(f"{path}:{_line_of(path, 'model_type')}: model_type {mt!r} is not supported "
                            f"(supported: {', '.join(sorted(FAMILIES))})")
        fam = FAMILIES[mt]

        def field(key, default=None):
            v = cfg.get(key, default)
            if v is None or isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                if key not in cfg and default is None:
                    raise PlanError(f"{path}: the {mt} config has no {key!r}")
                raise PlanError(f"{path}:{_line_of(path, key)}: {key} must be a positive integer, got {v!r}")
            return v

        hidden, heads = field("hidden_size"), field("num_attention_heads")
        head_dim = cfg.get("head_dim") if fam.head_dim_field else None
        return cls(
            name=name or path, model_type=mt, vocab=field("vocab_size"), hidden=hidden,
            layers=field("num_hidden_layers"), heads=heads, kv_heads=field("num_key_value_heads", heads),
            head_dim=head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads,
            experts=field(fam.num_experts), top_k=field("num_experts_per_tok"), expert_width=field(fam.expert_width),
            shared_width=field("shared_expert_intermediate_size") if fam.shared_expert else 0,
            tied=bool(cfg.get("tie_word_embeddings", False)), qk_norm=fam.qk_norm,
            qkv_bias=bool(cfg.get(fam.qkv_bias, True)) if fam.qkv_bias else False,
        )

    # parameters ---------------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self, scheme: str = "") -> int:
        H, Nq, Nk = self.hidden, self.q_width, self.kv_width
        attn = 2 * H * Nq + 2 * H * Nk + (Nq + 2 * Nk if self.qkv_bias else 0)
        attn += {"head": 2 * self.head_dim, "full": Nq + Nk}.get(self.qk_norm, 0) + 2 * H  # q/k norms, layer norms
        moe = self.experts * H + 3 * self.experts * H * self.expert_width
        if self.shared_width:
            moe += 3 * H * self.shared_width + H
        adapters = 5 * H * (H // 2) if scheme == "revffn" else 0
        return attn + moe + adapters

    def params(self, scheme: str = "") -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.hidden + self.layers * self.layer_params(scheme)

    def stored_end(self) -> int:
        """The parameters of one end of the model (the embedding or the head) that the layer store
        keeps off the device: vocab x hidden when they are untied; a tied one stays (0)."""
        return 0 if self.tied else self.vocab * self.hidden

    def _large_tensors(self) -> List[Tuple[int, int]]:
        """(elements, elements per row) of the tensors that can be the largest: the embedding or head,
        an expert stack (gate and up), the shared expert's."""
        H = self.hidden
        return [(self.vocab * H, H), (2 * self.experts * self.expert_width * H, 2 * self.expert_width * H),
                (H * self.shared_width, H)]

    def largest_tensor(self) -> int:
        return max(n for n, _ in self._large_tensors())

    def end_slice(self) -> int:
        """Elements of the stored embedding's or head's row slice (its state on disk is read and
        stepped one slice at a time: revengine.offload)."""
        n, row = self._large_tensors()[0]
        return min(n, max(row, SLICE_ELEMENTS // row * row))

    # activations: elements per token ---------------------------------------------------------------
    def attn_elements(self) -> float:
        """Saved for backward by one pre-norm attention block, per token: the norm's input and output,
        q, k, v after RoPE, the attention output (twice: the kernel's and o_proj's input), log-sum-exp."""
        H, Nq, Nk = self.hidden, self.q_width, self.kv_width
        extra = 2 * (Nq + Nk) if self.qk_norm else 0
        return 2 * H + 3 * Nq + 2 * Nk + self.heads + extra

    def moe_elements(self) -> float:
        """Saved by one pre-norm MoE block, per token: the norm, router probabilities and top-k, and per
        routed copy the gathered input, gate/up projection (2I), SwiGLU (2I), down output; the shared
        expert's four I_s-wide tensors and its gated output; the residual sum."""
        H, I, k = self.hidden, self.expert_width, self.top_k
        shared = 4 * self.shared_width + H + 1 if self.shared_width else 0
        return 3 * H + self.experts + 5 * k + k * (2 * H + 4 * I) + shared

    def layer_elements(self) -> float:
        return self.attn_elements() + self.moe_elements()


def load_shapes(spec: str) -> Shapes:
    path = resolve_config(spec)
    cfg = read_config_json(path)  # ValueError naming path:line for a file that is not JSON
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}:1: a config.json holds a JSON object, got {type(cfg).__name__}")
    name = spec if spec in presets() else os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    return Shapes.from_config(cfg, path, name=name)


# -- strategies ------------------------------------------------------------------------------------


OFFLOAD = ("offload-disk", "offload-host")


@dataclass(frozen=True)
class Strategy:
    base: str
    optimizer: str = "adamw"
    weights: str = "fp32"
    in_backward: bool = False
    offload: str = ""  # "disk" or "host": the layers live there between uses (revengine.offload)

    @classmethod
    def parse(cls, text: str) -> "Strategy":
        parts = text.strip().split("/")
        bad = lambda why: PlanError(f"--strategy {text!r}: {why} (BASE/OPTIMIZER/WEIGHTS[/in-backward[/offload-disk"  # noqa: E731
                                    "|offload-host]], e.g. rev-bdia/adamw8bit/bf16/in-backward)")
        if not 1 <= len(parts) <= 5:
            raise bad("expected 1 to 5 parts")
        base = parts[0]
        opt = parts[1] if len(parts) > 1 else "adamw"
        w = parts[2] if len(parts) > 2 else "fp32"
        if base not in BASES:
            raise bad(f"base must be one of {', '.join(BASES)}")
        if opt not in OPTIMIZERS:
            raise bad(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if w not in WEIGHT_BYTES:
            raise bad(f"weights must be one of {', '.join(WEIGHT_BYTES)}")
        if len(parts) >= 4 and parts[3] != "in-backward":
            raise bad("the fourth part can only be in-backward")
        offload = ""
        if len(parts) == 5:
            if parts[4] not in OFFLOAD:
                raise bad(f"the fifth part can only be {' or '.join(OFFLOAD)}")
            if not base.startswith("rev-"):
                raise bad("only a reversible model's layers can live off the device between uses")
            offload = parts[4][len("offload-"):]
        return cls(base, opt, w, len(parts) >= 4, offload)

    @property
    def name(self) -> str:
        return (f"{self.base}/{self.optimizer}/{self.weights}" + ("/in-backward" if self.in_backward else "")
                + (f"/offload-{self.offload}" if self.offload else ""))

    @property
    def scheme(self) -> str:
        return self.base[4:] if self.base.startswith("rev-") else ""


# -- the formulas ------------------------------------------------------------------------------------


def phases(shapes: Shapes, strategy: Strategy, batch: int, seq: int, rev_options: Optional[dict] = None,
           cal: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
    """{phase: {part: bytes}} of one training step; its peak is the phase with the largest sum."""
    c = dict(CAL, **(cal or {}))
    o = rev_options_for(shapes, rev_options)
    s, st = shapes, strategy
    T = float(batch) * float(seq)
    H, V, L = s.hidden, s.vocab, s.layers
    wb = WEIGHT_BYTES[st.weights]
    ab = wb  # activations in the weights' dtype
    P = s.params(st.scheme)
    layer_p = s.layer_params(st.scheme)
    head_p = V * H
    ob = OPTIMIZERS[st.optimizer]
    base = {"weights": P * wb, "optimizer": P * ob}

    def grads(held_params: float) -> float:
        if st.in_backward:  # one tensor's grad at a time (the update makes no temporaries)
            return s.largest_tensor() * wb
        return held_params * wb

    def phase(grads_b, stored=0.0, layer=0.0, logits=0.0):
        return dict(base, grads=grads_b, stored=stored, layer=layer, logits=logits)

    # the optimizer step after backward: every grad, and one tensor's update temporaries
    step = {} if st.in_backward else {
        "optimizer step": phase(P * wb + s.largest_tensor() * update_temps(st))}

    if st.base.startswith("hf-"):
        per_layer = s.layer_elements() * T * ab
        logits = c["hf_logits"] * T * V * 4.0
        hf_layer = c["hf_layer"] * per_layer
        if st.base == "hf-plain":
            stored = c["hf_store"] * L * per_layer + T * H * ab
            return {"loss": phase(grads(head_p), stored=stored, logits=logits),
                    "end of backward": phase(grads(P), stored=T * H * ab, layer=hf_layer), **step}
        ck = T * H * ab  # one hidden state per layer and token
        return {"loss": phase(grads(head_p), stored=(L + 1) * ck, logits=logits),
                "last layer's recompute": phase(grads(head_p + layer_p), stored=(L + 1) * ck, layer=hf_layer),
                "end of backward": phase(grads(P), stored=ck, layer=hf_layer), **step}

    # reversible: the stack keeps its streams and per-layer records, one layer is re-run at a time
    width = H / 2 if st.scheme == "revffn" else H
    bdia = st.scheme == "bdia"
    # per layer: the replayed top-k ids (uint8 up to 256 experts) and BDIA's dropped bits (k per element)
    records = L * T * (s.top_k * (1 if s.experts <= 256 else 2) + (H * BDIA_DROPPED_BITS / 8 if bdia else 0.0))
    # the two streams: int64 fixed point under BDIA (whatever the weights' dtype), else the weights' dtype
    streams = 16.0 * T * width if bdia else c["rev_stream_bytes"] * T * width * ab / 4.0
    stored = c["rev_stream_bytes"] * T * width * ab / 4.0 + streams + records
    Tc = min(T, o["moe_chunk_size"]) if o["moe_chunk_size"] else T
    attn = s.attn_elements() * T * ab
    moe = s.moe_elements() * Tc * ab
    chunk_inputs = T * H * ab if o["moe_chunk_size"] else 0.0
    if st.in_backward:
        layer = c["rev_layer_in_backward"] * (attn + moe + chunk_inputs)
    else:
        layer = c["rev_layer"] * ((max(attn, moe) if o["attention_recompute"] else attn + moe) + chunk_inputs)
    logits = c["rev_loss_chunks"] * min(T, o["loss_chunk_size"]) * V * 4.0 + 2 * T * H * 4.0
    if st.offload:
        objects = c["disk_layer_objects"] * L if st.offload == "disk" else 0.0
        return store_phases(s, st, stored, layer, logits, objects=objects)
    return {"loss": phase(grads(head_p), stored=stored, logits=logits),
            "end of backward": phase(grads(P), stored=stored, layer=layer), **step}


def store_phases(s: Shapes, st: Strategy, stored: float, layer: float, logits: float,
                 objects: float = 0.0) -> Dict[str, Dict[str, float]]:
    """The phases of a step whose layers live in the store between uses (revengine.offload): what is
    in memory then, besides the parameters outside the stacks and the ends (the final norm, a tied
    embedding) and their state.
      - loss: the last layer's weights (backward re-runs it first), the head's weights, its gradient
        and, for its step, its state; on disk a vocabulary slice of each at a
        time (the loss reads the head's weight slice by slice and steps each slice's gradient);
      - a layer's re-run: its weights and state, the weights of the layer below (read ahead), the
        gradients of all its parameters (its vector-Jacobian product returns them together), its
        working set;
      - the embedding's step, the last: its weights (read once layer 0's write-back freed its
        memory), its gradient and its state; on disk a row slice of each at a
        time (the models' lookup reads the weight slice by slice and steps each slice's gradient).
    objects: bytes of the layers' Python objects, counted with the weights (on disk: a CPU model)."""
    wb, ob = WEIGHT_BYTES[st.weights], OPTIMIZERS[st.optimizer]
    L, layer_p, head_p, end = s.layers, s.layer_params(st.scheme), s.vocab * s.hidden, s.stored_end()
    rest = s.params(st.scheme) - L * layer_p - 2 * end
    sliced = st.offload == "disk"  # the ends' weights, grads and state in row slices (on the host tier whole)
    end_in = min(end, s.end_slice()) if sliced else end  # what of a stored end is in memory at once
    end_state = end_in * ob
    head_grad = end_in if end else head_p  # a tied head stays with the rest: its gradient whole

    def ph(w, o, g, layer_b=0.0, logits_b=0.0):
        return {"weights": (rest + w) * wb + objects, "optimizer": rest * ob + o, "grads": g, "stored": stored,
                "layer": layer_b, "logits": logits_b}
    return {"loss": ph(layer_p + end_in, end_state, head_grad * wb, logits_b=logits),
            "layer re-run": ph(2 * layer_p, layer_p * ob, layer_p * wb, layer_b=layer),
            "embedding's step": ph(end_in, end_state, end_in * wb)}


@dataclass
class Prediction:
    strategy: str
    phase: str
    parts: Dict[str, float]  # bytes
    total: float
    fits: Dict[str, bool]      # per device memory given (its GiB as a string)
    max_seq: Dict[str, int]    # the longest sequence that fits each, 0 if none
    params: int
    store: Dict[str, float]    # offload strategies: store_figures (bytes)

    def as_dict(self) -> dict:
        g = {k: v / GiB for k, v in self.parts.items()}
        return {"strategy": self.strategy, "peak_phase": self.phase, "params": self.params,
                "parts_gib": g, "total_gib": self.total / GiB, "fits": self.fits, "max_seq": self.max_seq,
                **{k.replace("_bytes", "_gib"): v / GiB for k, v in self.store.items()}}


def store_figures(shapes: Shapes, strategy: Strategy) -> Dict[str, float]:
    """Bytes the layer store keeps off the device and moves per step (revengine.offload): each layer's
    weights read twice (forward, re-run), its state once, both written back once; an untied embedding
    and head are read (weights twice: forward, step) and written once each, like a layer; the disk tier
    keeps two slots per file and writes the other parameters outside the stacks every step."""
    if not strategy.offload:
        return {}
    L, layer_p = shapes.layers, shapes.layer_params(strategy.scheme)
    wb, ob = WEIGHT_BYTES[strategy.weights], OPTIMIZERS[strategy.optimizer]
    ends = 2 * shapes.stored_end()
    rest = shapes.params(strategy.scheme) - L * layer_p - ends
    disk = strategy.offload == "disk"
    kept = (L * layer_p + ends) * (wb + ob) * (2 if disk else 1) + (2 * rest * (wb + ob) if disk else 0.0)
    moved = (L * layer_p + ends) * (3 * wb + 2 * ob) + (rest * (wb + ob) if disk else 0.0)
    return {"store_bytes": kept, "moved_bytes_per_step": moved}


def peak(shapes: Shapes, strategy: Strategy, batch: int, seq: int, **kw) -> Tuple[str, Dict[str, float], float]:
    ph = phases(shapes, strategy, batch, seq, **kw)
    name = max(ph, key=lambda n: sum(ph[n].values()))
    return name, ph[name], sum(ph[name].values())


def max_seq(shapes: Shapes, strategy: Strategy, batch: int, memory: float, limit: int = 1 << 24, **kw) -> int:
    """The longest sequence (tokens per sample) whose peak fits `memory` bytes; 0 when none does.
    The peak is piecewise linear in seq (the chunk sizes cap some terms), so it is bisected."""
    if peak(shapes, strategy, batch, 1, **kw)[2] > memory:
        return 0
    lo, hi = 1, limit
    if peak(shapes, strategy, batch, hi, **kw)[2] <= memory:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak(shapes, strategy, batch, mid, **kw)[2] <= memory:
            lo = mid
        else:
            hi = mid
    return lo


def _label(memory: float) -> str:
    return f"{memory / GiB:g}"


def plan(shapes: Shapes, strategies, batch: int, seq: int, memories=(), **kw) -> List[Prediction]:
    """One Prediction per strategy; `memories`: device sizes in bytes to check (fits, longest sequence)."""
    out = []
    for st in strategies:
        name, parts, total = peak(shapes, st, batch, seq, **kw)
        fits = {_label(m): total <= m for m in memories}
        ms = {_label(m): max_seq(shapes, st, batch, m, **kw) for m in memories}
        out.append(Prediction(st.name, name, parts, total, fits, ms, shapes.params(st.scheme), store_figures(shapes, st)))
    return out


# -- the command -----------------------------------------------------------------------------------

# A GPU sold as "80 GB" has 80 GiB: GB, G and GiB all mean 2^30 bytes here (a plain number of bytes: 141e9).
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '24g' (2^30 bytes each: a GPU's "80 GB" is 80 GiB), '141e9' (bytes) -> bytes.
    A bare number under 10^4 means GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"--memory {text!r}: expected a size such as 80GB, 24GiB or 141e9")
    value = float(m.group(1))
    unit = m.group(2).lower()
    if unit == "" and value < 1e4:
        unit = "gib"
    b = value * _UNITS[unit]
    if not math.isfinite(b) or b <= 0:
        raise PlanError(f"--memory {text!r}: must be positive")
    return b


def _positive(flag):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v <= 0:
            raise PlanError(f"{flag} {text!r}: must be a positive integer")
        return v
    return conv


def _positive_or_zero(flag):
    def conv(text):
        return 0 if str(text).strip() == "0" else _positive(flag)(text)
    return conv


def format_table(shapes: Shapes, preds: List[Prediction], batch: int, seq: int, memories=(),
                 rev_options: Optional[dict] = None, bandwidth: Optional[float] = None) -> str:
    lines = [f"{shapes.name} ({shapes.model_type}): {shapes.params() / 1e9:.2f}B parameters, {shapes.layers} layers, "
             f"hidden {shapes.hidden}, {shapes.experts} experts top-{shapes.top_k}, vocab {shapes.vocab}; "
             f"batch {batch} x seq {seq}"]
    labels = [_label(m) for m in memories]
    cols = ["strategy"] + list(PART_TITLES) + ["peak"]
    for lb in labels:
        cols += [f"fits {lb} GiB", f"longest seq @ {lb} GiB"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for p in preds:
        row = [p.strategy] + [f"{p.parts[k] / GiB:.2f}" for k in PARTS] + [f"**{p.total / GiB:.2f}**"]
        for lb in labels:
            row += ["yes" if p.fits[lb] else "no", str(p.max_seq[lb]) if p.max_seq[lb] else "none"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"(GiB at the peak of one step; reversible models with {rev_options_for(shapes, rev_options)}; "
                 "parts of the phase that holds the peak)")
    for p in preds:
        if p.store:
            where = p.strategy.rsplit("-", 1)[1]
            moved = p.store["moved_bytes_per_step"]
            bound = f": at least {moved / (bandwidth * 1e9):.1f} s per step at {bandwidth:g} GB/s" if bandwidth else ""
            place = "on disk (two slots per layer)" if where == "disk" else "in host memory"
            lines.append(f"{p.strategy}: {p.store['store_bytes'] / GiB:.2f} GiB {place}, {moved / GiB:.2f} GiB "
                         f"moved per step{bound}")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    try:
        shapes = load_shapes(args.config)
        seq = _positive("--seq")(args.seq)
        batch = _positive("--batch")(args.batch)
        memories = [parse_memory(m) for m in args.memory.split(",")] if args.memory is not None else []
        strategies = [Strategy.parse(t) for t in (args.strategy or DEFAULT_STRATEGIES)]
        rev_options = dict(moe_chunk_size=_positive_or_zero("--moe-chunk-size")(args.moe_chunk_size),
                           loss_chunk_size=None if args.loss_chunk_size == "auto"
                           else _positive("--loss-chunk-size")(args.loss_chunk_size),
                           attention_recompute=not args.no_attention_recompute)
    except ValueError as e:  # PlanError, and read_config_json's file:line errors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    preds = plan(shapes, strategies, batch, seq, memories, rev_options=rev_options)
    if args.json:
        print(json.dumps({"config": shapes.name, "model_type": shapes.model_type, "batch": batch, "seq": seq,
                          "memory_gib": [m / GiB for m in memories], "rev_options": rev_options_for(shapes, rev_options),
                          "strategies": [p.as_dict() for p in preds]}, indent=2))
    else:
        print(format_table(shapes, preds, batch, seq, memories, rev_options, args.bandwidth))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help=f"a preset ({', '.join(presets())}), a model folder or a config.json")
    p.add_argument("--seq", default="4096", help="tokens per sample (default 4096)")
    p.add_argument("--batch", default="1", help="samples per step (default 1)")
    p.add_argument("--memory", default=None, help="device memory, e.g. 80GB or 24GiB (both 2^30 bytes per G, as GPUs are sold; a bare number is GiB); "
                        "several: 80GB,24GB")
    p.add_argument("--strategy", action="append", metavar="BASE/OPTIMIZER/WEIGHTS[/in-backward]",
                   help=f"repeatable; default: {', '.join(DEFAULT_STRATEGIES)}")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                   help="offload strategies: the disk's or host copies' bandwidth, for the step time's lower bound")
    p.add_argument("--moe-chunk-size", default=str(REV_DEFAULTS["moe_chunk_size"]),
                   help="reversible models: tokens per expert chunk (0: off; default %(default)s)")
    p.add_argument("--loss-chunk-size", default="auto",
                   help="reversible models: tokens per cross-entropy chunk (default auto: the converted model's, "
                        "2^20 // vocabulary, 16 to 1024)")
    p.add_argument("--no-attention-recompute", action="store_true",
                   help="reversible models: keep the attention's intermediates in the re-run (default: recomputed)")
