"""The settings of a fine-tuning run (FinetuneArgs) and the error every bad input raises."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from revengine import memory
from revengine.models import BLOCK_TYPES as SCHEMES, FIXED_POINT_FALLBACKS
from revengine.optim import OPTIMIZER_NAMES, TORCHAO_HINT, WEIGHT_DTYPES, needs_torchao, torchao_available

DISTILL = ("none", "stage1", "all")
# --in-backward's gradient clipping: each parameter's gradient on its own (inside the one backward), or the
# global norm of torch's clip_grad_norm_ (a first forward + backward measures it, a second one steps)
CLIP_CHOICES = ("per-tensor", "global")
# schemes whose reversible layers cannot train with bf16 weights, and why (measured: a 16-layer tiny Mixtral,
# grads of --reversible-mode reversible against plain, both in bf16)
BF16_REFUSED: Dict[str, str] = {
    "leapfrog": "its inverse (p- = 2p - p+ + h^2 f) doubles a stream per layer, so bf16 rounding grows with depth "
                "(gradients 100% off at 16 layers); use --scheme bdia (or additive, revffn), or "
                "--reversible-mode checkpoint",
}


class FinetuneError(ValueError):
    """Bad input to `revengine finetune` (the message names the problem)."""


@dataclass
class FinetuneArgs:
    model: str
    data: str
    out: str
    scheme: str = "revffn"
    stage1_steps: int = 0
    steps: int = 100
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    stage1_lr: Optional[float] = None
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    bf16: bool = False
    optimizer: str = "adamw"
    weights: str = "fp32"
    in_backward: bool = False
    clip: Optional[str] = None  # --in-backward's clipping: "per-tensor" (None: the default) or "global" (two passes)
    state_device: Optional[str] = None  # --in-backward: where the optimizer state lives (None: beside the weights)
    offload: str = "none"  # stage 2: where the layers and their optimizer state live between uses
    offload_dir: Optional[str] = None  # --offload disk: the store's folder (None: <out>/offload)
    distill: str = "stage1"
    kl_weight: float = 1.0
    upcycle_experts: int = 0
    upcycle_top_k: int = 2
    reversible_mode: str = "reversible"
    gradient_checkpointing: bool = False
    moe_chunk_size: Optional[int] = None  # None: chosen from the batch's tokens (RevMoEConfig.working_set)
    fixed_point_fallback: str = "store"
    bdia_gamma: Optional[float] = None  # None: RevMoEConfig's default
    seed: int = 0
    # bookkeeping (may change between a run and its --resume)
    resume: bool = False
    save_every: int = 50
    eval_every: int = 0
    eval_batch_size: int = 16
    eval_max_examples: int = 256
    keep_checkpoints: int = 2
    progress: bool = True
    threads: Optional[int] = None
    device: str = "cpu"
    stop_after: Optional[int] = None  # behave as if interrupted after this many steps of this run (tests)

    # Fields a --resume may change; every other field must match the checkpoint's.
    MUTABLE = ("resume", "save_every", "eval_every", "eval_batch_size", "eval_max_examples", "keep_checkpoints",
               "progress", "threads", "device", "stop_after", "state_device", "offload", "offload_dir")

    def validate(self) -> None:
        if self.scheme not in SCHEMES + ("none",):
            raise FinetuneError(f"--scheme must be one of {SCHEMES + ('none',)}, got {self.scheme!r}")
        if self.fixed_point_fallback not in FIXED_POINT_FALLBACKS:
            raise FinetuneError(f"--fixed-point-fallback must be one of {FIXED_POINT_FALLBACKS}, "
                                f"got {self.fixed_point_fallback!r}")
        self._validate_optimizer()
        if self.distill not in DISTILL:
            raise FinetuneError(f"--distill must be one of {DISTILL}, got {self.distill!r}")
        for name in ("stage1_steps", "steps", "warmup", "save_every", "eval_every", "upcycle_experts"):
            if getattr(self, name) < 0:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stage1_steps + self.steps < 1:
            raise FinetuneError("nothing to do: --stage1-steps + --steps is 0")
        if not 0.0 < self.eval_fraction < 1.0 and self.eval_data is None:
            raise FinetuneError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        # `not x > 0` (not `x <= 0`): nan fails every comparison, so it would slip through the latter
        for name, low, strict in (("lr", 0, True), ("stage1_lr", 0, True), ("weight_decay", 0, False),
                                  ("max_grad_norm", 0, False), ("kl_weight", 0, False)):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and (v > low if strict else v >= low)):
                raise FinetuneError(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} "
                                    f"{low}, got {v}")
        # checked whatever --scheme (a nan or out-of-range gamma is a typo, not a setting); the model's config
        # adds bdia's 2^-k rule later, but only here can the error name the flag
        g = self.bdia_gamma
        if g is not None and not (math.isfinite(g) and 0.0 < g <= 1.0):
            raise FinetuneError(f"--bdia-gamma must be a finite number in (0, 1] (2^-k, k = 1..8), got {g}")
        if self.eval_max_examples < 0:
            raise FinetuneError(f"--eval-max-examples must be >= 0, got {self.eval_max_examples}")
        if self.threads is not None and self.threads < 1:
            raise FinetuneError(f"--threads must be >= 1, got {self.threads}")
        if self.scheme == "none" and self.stage1_steps:
            raise FinetuneError("--scheme none fine-tunes the original model, which has no new parameters: "
                                "use --stage1-steps 0")
        if self.gradient_checkpointing and self.scheme != "none":
            raise FinetuneError("--gradient-checkpointing applies to --scheme none (HF's checkpointing); "
                                "converted models use --reversible-mode")
        try:
            memory.check_device(self.device)
        except ValueError as e:
            raise FinetuneError(f"--device: {e}") from None
        if self.upcycle_experts and not 1 <= self.upcycle_top_k <= self.upcycle_experts:
            raise FinetuneError(f"--upcycle-top-k must be in [1, {self.upcycle_experts}], got {self.upcycle_top_k}")

    def _validate_optimizer(self) -> None:
        """--optimizer, --weights, --in-backward and --state-device (torchao's presence included)."""
        if self.optimizer not in OPTIMIZER_NAMES:
            raise FinetuneError(f"--optimizer must be one of {OPTIMIZER_NAMES}, got {self.optimizer!r}")
        if self.weights not in WEIGHT_DTYPES:
            raise FinetuneError(f"--weights must be one of {tuple(WEIGHT_DTYPES)}, got {self.weights!r}")
        # what no install can fix (the scheme, the GPU) is said before a missing package
        if self.weights == "bf16":
            if self.scheme in BF16_REFUSED and self.reversible_mode == "reversible":
                raise FinetuneError(f"--weights bf16 cannot be honoured by --scheme {self.scheme}: "
                                    f"{BF16_REFUSED[self.scheme]}")
            if self.device.startswith("cuda"):
                import torch
                if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
                    raise FinetuneError(f"--weights bf16: {self.device} has no bf16 support; use --weights fp32")
        if needs_torchao(self.optimizer, self.weights) and not torchao_available():
            what = f"--optimizer {self.optimizer}" if self.optimizer != "adamw" else "--weights bf16"
            raise FinetuneError(f"{what} needs torchao, which is not installed: {TORCHAO_HINT}")
        if self.in_backward and self.grad_accum != 1:
            raise FinetuneError(f"--in-backward steps every parameter inside backward, so it cannot accumulate "
                                f"gradients: use --grad-accum 1 (got {self.grad_accum}) and a larger --batch-size")
        if self.clip is not None:
            if self.clip not in CLIP_CHOICES:
                raise FinetuneError(f"--clip must be one of {CLIP_CHOICES}, got {self.clip!r}")
            if not self.in_backward:
                raise FinetuneError("--clip chooses how --in-backward clips; without --in-backward the clipping is "
                                    "already global (torch's clip_grad_norm_ over the whole model's gradients)")
            if self.clip == "global" and not self.max_grad_norm > 0:
                raise FinetuneError("--clip global clips to --max-grad-norm: set it above 0")
        if self.state_device is not None:
            if not self.in_backward:
                raise FinetuneError("--state-device moves the optimizer state per parameter inside backward: "
                                    "it needs --in-backward")
            if self.state_device != "cpu":
                raise FinetuneError(f"--state-device must be cpu (state in host memory), got {self.state_device!r}")
        self._validate_offload()

    def _validate_offload(self) -> None:
        """--offload and --offload-dir."""
        from revengine.offload import TIERS

        if self.offload not in TIERS:
            raise FinetuneError(f"--offload must be one of {TIERS}, got {self.offload!r}")
        if self.offload_dir is not None and self.offload != "disk":
            raise FinetuneError("--offload-dir is the folder of --offload disk; add --offload disk")
        if self.offload == "none":
            return
        if not self.in_backward:
            raise FinetuneError(f"--offload {self.offload} writes each layer back right after its step inside "
                                "backward: it needs --in-backward")
        if self.scheme == "none" or self.reversible_mode != "reversible":
            raise FinetuneError(f"--offload {self.offload} releases a layer between its forward and its re-run in "
                                "backward, which only a reversible model has: use a --scheme other than none and "
                                "--reversible-mode reversible")
        if self.state_device is not None:
            raise FinetuneError(f"--offload {self.offload} moves the optimizer state with the layers; drop --state-device")
        if self.offload == "host" and not self.device.startswith("cuda"):
            raise FinetuneError("--offload host keeps the layers in host memory for a GPU run (--device cuda); "
                                "on the CPU use --offload disk")

    # Where the inputs and outputs are, not what is trained: a --resume may spell or move them freely
    # (the run's inputs are identified by content instead: checkpoint.run_inputs).
    PATHS = ("model", "data", "eval_data", "out")

    def record(self) -> Dict[str, Any]:
        """The run's settings as a checkpoint and eval.json record them (paths included)."""
        return {k: v for k, v in asdict(self).items() if k not in self.MUTABLE}

    def identity(self) -> Dict[str, Any]:
        """The fields a --resume must match (--steps may grow: a resume may extend the run)."""
        return {k: v for k, v in self.record().items() if k not in self.PATHS}
