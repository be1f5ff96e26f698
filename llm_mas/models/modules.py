"""A user's own torch module as a model: built by a factory named by import path, filled from a weights file.

    module = build_module("my_pkg.nets:make_gru", {"hidden": 64}, where="models.0")
    module.load_state_dict(read_weights("gru_s0.safetensors", where="models.0"))

Every failure is a ConfigError / DataError naming the config path (``where``), the factory or file, and why.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, MASError


def state_digest(module) -> str:
    """A content hash of a module's state_dict (names, dtypes, shapes, bytes)."""
    return tensors_digest(module.state_dict())


def tensors_digest(state: dict) -> str:
    """A content hash of a mapping of named tensors (a state_dict, or a weights file read back)."""
    import torch

    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_module(factory_path: str, kwargs: dict[str, Any], where: str):
    """``factory(**kwargs)`` for the factory at ``package.module:function`` (ConfigError naming the factory)."""
    from torch import nn

    from ..tasks.tensor_data import import_object

    try:
        factory = import_object(factory_path, f"{where}.factory")
    except ConfigError as e:
        raise ConfigError(e.problems) from None
    if not callable(factory):
        raise ConfigError(f"{where}.factory: {factory_path!r} is not callable")
    try:
        module = factory(**kwargs)
    except MASError:
        raise
    except Exception as e:  # the user's code
        raise ConfigError(f"{where}.factory: {factory_path}(**{kwargs}) raised {type(e).__name__}: {e}; "
                          f"check {where}.kwargs") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}.factory: {factory_path!r} returned a {type(module).__name__}, not a "
                          "torch.nn.Module")
    return module


def read_weights(path: str | Path, where: str) -> dict:
    from ..files import load_torch_state

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own error type
            raise DataError(f"{where}.weights: {str(path)!r} is not a readable safetensors file ({e})") from None
    state = load_torch_state(path)
    if not isinstance(state, dict):
        raise DataError(f"{where}.weights: {str(path)!r} holds a {type(state).__name__}, not a state_dict")
    return state


