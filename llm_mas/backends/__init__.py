"""Backends read (`collect`) and write (`patch`) latents at `Site`s of a model.

- ``torch``: plain forward hooks on ``nn.Module``s (task models, any HF model); always removed.
- ``nnsight``: Hugging Face models traced through nnsight (``llm_mas.backends.nnsight_backend``).
- ``tlens``: TransformerLens hook points (``llm_mas.backends.tlens_backend``).

``BACKENDS`` is the one registry of backend names (configs validate against it); ``get_backend(name)``
makes one. A backend module is imported only when it is first asked for, so ``import llm_mas.backends``
imports neither nnsight nor transformer_lens. Backends import nothing from ``llm_mas.llm``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import ConfigError, choice_error
from .base import Backend, Edit, edit_entry_index
from .torch_hooks import TorchHookBackend

# name -> "module:ClassName" (imported on first use) or a callable that returns a backend.
_REGISTRY: dict[str, str | Callable[[], Backend]] = {}
BACKENDS: Mapping[str, str | Callable[[], Backend]] = MappingProxyType(_REGISTRY)  # read-only view


@dataclass(frozen=True)
class BackendFacts:
    """What a config check needs to know of a backend without importing it.

    converts_model: the backend runs a converted copy of an HF model (TransformerLens), not the model itself:
    no PEFT adapters on top, no counterfactual text runs (their positions are read in the HF tokenizer's space).
    """

    converts_model: bool = False


_FACTS: dict[str, BackendFacts] = {}


def backend_facts(name: str) -> BackendFacts:
    """The registered facts of backend ``name`` (ConfigError listing the backends for an unknown name)."""
    if name not in _FACTS:
        raise choice_error("backend", name, _REGISTRY)
    return _FACTS[name]


def register_backend(name: str, factory: str | Callable[[], Backend], *, converts_model: bool = False) -> None:
    """Register a backend under ``name``: ``"package.module:ClassName"`` (imported lazily) or a callable,
    with its facts (`BackendFacts`).

    A name can be registered once; a second registration raises ConfigError (no silent replacement).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a backend name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ConfigError(f"backend {name!r} is already registered (as {_REGISTRY[name]!r}); pick another name")
    if isinstance(factory, str) and factory.count(":") != 1:
        raise ConfigError(f"backend {name!r}: factory {factory!r} must be 'package.module:ClassName'")
    if not isinstance(factory, str) and not callable(factory):
        raise ConfigError(f"backend {name!r}: factory must be 'package.module:ClassName' or a callable, "
                          f"got {type(factory).__name__}")
    _REGISTRY[name] = factory
    _FACTS[name] = BackendFacts(converts_model=converts_model)


def get_backend(name: str) -> Backend:
    """A new backend instance by registry name (its module, and the heavy library it needs, load here)."""
    if name not in _REGISTRY:
        raise choice_error("backend", name, _REGISTRY)
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, cls = factory.split(":")
        factory = getattr(importlib.import_module(module), cls)
    return factory()


register_backend("torch", TorchHookBackend)
register_backend("nnsight", "llm_mas.backends.nnsight_backend:NNsightBackend")
register_backend("tlens", "llm_mas.backends.tlens_backend:TLensBackend", converts_model=True)

__all__ = ["BACKENDS", "Backend", "BackendFacts", "backend_facts", "Edit", "TorchHookBackend", "edit_entry_index", "get_backend",
           "register_backend"]
