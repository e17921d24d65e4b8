"""Reversible MoE transformer models (installed as revengine.models)."""
from .config import BLOCK_TYPES, FIXED_POINT_FALLBACKS, RevMoEConfig
from .layers import KVCache
from .loss import chunked_cross_entropy
from .modeling import RevMoEForCausalLM, RevMoEModel, RevMoEOutput, eval_mode

__all__ = ["BLOCK_TYPES", "FIXED_POINT_FALLBACKS", "KVCache", "RevMoEConfig", "RevMoEForCausalLM", "RevMoEModel",
           "RevMoEOutput", "chunked_cross_entropy", "eval_mode"]
