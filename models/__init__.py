"""Reversible MoE transformer models (installed as revengine.models)."""
from .config import BLOCK_TYPES, RevMoEConfig
from .layers import KVCache
from .modeling import RevMoEForCausalLM, RevMoEModel, RevMoEOutput, chunked_cross_entropy

__all__ = ["BLOCK_TYPES", "KVCache", "RevMoEConfig", "RevMoEForCausalLM", "RevMoEModel", "RevMoEOutput",
           "chunked_cross_entropy"]
