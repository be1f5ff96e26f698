"""Shared helpers for the tiny-LLM tests: one tiny Qwen2 directory per test process, built offline.

Test modules wrap these in their own pytest fixtures (no conftest.py):

    from llm_fixtures import tiny_qwen2_dir, load_tiny
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_BUILT: dict[int, Path] = {}


def tiny_qwen2_dir(seed: int = 0) -> Path:
    """A tiny Qwen2 (64-d, 2 layers, vocab 512) saved once per process and seed; removed at exit."""
    if seed not in _BUILT:
        from llm_mas.llm.tiny import build_tiny_qwen2

        root = Path(tempfile.mkdtemp(prefix=f"llm_mas_tiny_qwen2_{seed}_"))
        atexit.register(shutil.rmtree, root, True)
        _BUILT[seed] = build_tiny_qwen2(root / "model", seed=seed)
    return _BUILT[seed]


def load_tiny(seed: int = 0, **kwargs):
    """A fresh (model, tokenizer) of the tiny Qwen2 through ``load_causal_lm`` (0.02 s)."""
    from llm_mas.llm.loading import load_causal_lm

    return load_causal_lm(tiny_qwen2_dir(seed), **kwargs)
