"""Backends read (`collect`) and write (`patch`) latents at `Site`s of a model.

- ``torch``: plain forward hooks on ``nn.Module``s (task models, any HF model); always removed.
- ``nnsight``: Hugging Face models traced through nnsight (``llm_mas.backends.nnsight_backend``).
- ``tlens``: TransformerLens hook points (``llm_mas.backends.tlens_backend``).
"""

from __future__ import annotations

from .base import Backend, Edit, edit_entry_index
from .torch_hooks import TorchHookBackend

_REGISTRY = {"torch": "llm_mas.backends.torch_hooks:TorchHookBackend",
             "nnsight": "llm_mas.backends.nnsight_backend:NNsightBackend",
             "tlens": "llm_mas.backends.tlens_backend:TLensBackend"}


def get_backend(name: str) -> Backend:
    """Instantiate a backend by registry name (heavy libraries are imported only here)."""
    import importlib

    from ..errors import choice_error

    if name not in _REGISTRY:
        raise choice_error("backend", name, _REGISTRY)
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Backend", "Edit", "TorchHookBackend", "edit_entry_index", "get_backend"]
