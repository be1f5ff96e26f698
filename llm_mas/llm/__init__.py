"""Hugging Face causal LMs for MAS: loading, a tiny offline Qwen2, recorded generations.

    from llm_mas.llm import load_causal_lm, build_tiny_qwen2, record_generations, load_recording

Names are imported lazily (PEP 562), so ``import llm_mas.llm`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_causal_lm": "loading",
    "llm_site_aliases": "loading",
    "register_site_aliases": "loading",
    "model_source": "loading",
    "build_tiny_qwen2": "tiny",
    "mid_size_qwen2_config": "tiny",
    "tiny_corpus": "tiny",
    "Recording": "record",
    "StepwisePairs": "record",
    "record_generations": "record",
    "load_recording": "record",
    "stepwise_pairs": "record",
    "model_fingerprint": "record",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llm_mas.llm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
