"""Load a Hugging Face causal LM (hub id or local directory), frozen, with llm_mas site aliases.

    from llm_mas.llm import load_causal_lm
    from llm_mas.sites import site_aliases
    model, tokenizer = load_causal_lm("path/to/model_dir", dtype="bfloat16", device="cuda")
    site_aliases(model)   # {"embeddings": "model.embed_tokens", "layer0": "model.layers.0", ...}
    model_source(model)   # {"model": "path/to/model_dir", "adapter": None, "merged": False, "dtype": "bfloat16"}

Aliases and source are kept in tables beside the model (``llm_mas.sites.register_site_aliases``), never as
attributes on it.

No network is needed for a local directory (``hf download MODEL --local-dir DIR`` on a connected machine, or
``llm_mas.llm.tiny.build_tiny_qwen2`` for tests). A hub id that is not a local directory and cannot be
fetched (``HF_HUB_OFFLINE=1`` or no connection) raises ``HubUnavailableError``.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Any

from ..dtypes import DTYPES, parse_dtype  # noqa: F401  (DTYPES re-exported for existing importers)
from ..errors import ConfigError, HubUnavailableError
from ..sites import llm_site_aliases, register_site_aliases  # noqa: F401  (llm_mas.llm.llm_site_aliases)

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")

# model -> where its weights came from (written into recordings and results); an entry dies with its model.
_SOURCES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def model_source(model: Any) -> dict[str, Any] | None:
    """Where ``load_causal_lm`` loaded ``model`` from ({model, adapter, merged, dtype}, a copy), or None."""
    try:
        source = _SOURCES.get(model)
    except TypeError:  # not weak-referenceable or not hashable: not a model load_causal_lm returned
        return None
    return None if source is None else dict(source)


def parse_device(device: str) -> str:
    """``"cpu" | "cuda" | "cuda:N" | "auto"`` -> a concrete torch device string; checks CUDA is there."""
    import torch

    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda|cuda:\d+|auto", device):
        raise ConfigError(f"unknown device {device!r}; valid choices: {', '.join(DEVICE_CHOICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~")) or name.endswith(("/", os.sep))
            or name.count("/") > 1 or os.sep in name.replace("/", "") or name in (".", ".."))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(name: str, what: str, cause: BaseException) -> HubUnavailableError:
    reason = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub cannot be reached"
    return HubUnavailableError(
        f"{what} {name!r} is not a local directory and {reason} (and it is not in the local HF cache): "
        f"{str(cause).splitlines()[0].rstrip('. ') if str(cause) else type(cause).__name__}. "
        "Pass a local directory instead: download it on a connected machine with "
        f"`hf download {name} --local-dir DIR` and copy DIR here, or build a test model offline "
        "with `llm_mas.llm.tiny.build_tiny_qwen2(DIR)`.")


def resolve_model_location(id_or_path: str | os.PathLike, what: str = "model") -> tuple[str, bool]:
    """(location, is_local): a local directory, or a hub id; a path-like name that does not exist is an error."""
    name = os.fspath(id_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ConfigError(f"{what} {name!r} is a file; pass the directory that holds config.json and the weights")
    if _looks_like_path(name) or isinstance(id_or_path, Path):
        raise ConfigError(f"{what} directory {name!r} does not exist; check the path "
                          "(or pass a hub id such as 'Qwen/Qwen2-0.5B' on a connected machine)")
    return name, False


def _load_or_hub_error(load, name: str, is_local: bool, what: str):
    """Call ``load()``; turn a failed hub access into HubUnavailableError (never retried silently)."""
    if is_local:
        return load()
    try:
        return load()
    except OSError as e:
        text = str(e)
        if _hub_offline() or "connect" in text or "offline" in text.lower() or "Name or service" in text:
            raise _hub_error(name, what, e) from None
        raise ConfigError(f"{what} {name!r} is neither a local directory nor a loadable hub repository: {text}") \
            from None


def freeze(model):
    """Eval mode and ``requires_grad=False`` on every parameter (MAS trains only the alignments)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_causal_lm(id_or_path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
                   adapter: str | os.PathLike | None = None, merge_adapter: bool = False,
                   attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, frozen, in eval mode, with site aliases registered.

    id_or_path:    local directory (preferred; works offline) or hub id.
    dtype:         float32 | bfloat16 | float16 | auto (the checkpoint's own dtype).
    device:        cpu | cuda | cuda:N | auto (cuda when available).
    adapter:       optional PEFT adapter directory put on top; ``merge_adapter=True`` folds it into the
                   weights (a plain HF model comes back), otherwise a ``PeftModel`` comes back.
    Returns (model, tokenizer). A tokenizer without a pad token gets ``pad_token = eos_token``.
    Raises HubUnavailableError (hub id, no hub), ConfigError (bad dtype / device / path).
    """
    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device)
    location, is_local = resolve_model_location(id_or_path)
    if is_local and not (Path(location) / "config.json").exists():
        raise ConfigError(f"model directory {location!r} has no config.json; pass a directory written by "
                          "save_pretrained / `hf download`")
    if merge_adapter and adapter is None:
        raise ConfigError("merge_adapter=True needs adapter=DIR (the PEFT adapter to merge)")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Offline: only the local HF cache may answer (no retries against an unreachable hub).
    hub = {"local_files_only": True} if not is_local and _hub_offline() else {}
    config = _load_or_hub_error(lambda: AutoConfig.from_pretrained(location, **hub), location, is_local, "model")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, **hub}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _load_or_hub_error(lambda: AutoModelForCausalLM.from_pretrained(location, config=config, **kwargs),
                               location, is_local, "model")
    tokenizer = _load_or_hub_error(lambda: AutoTokenizer.from_pretrained(location, **hub), location, is_local,
                                   "tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(torch_device)

    if adapter is not None:
        model = load_adapter(model, adapter, merge=merge_adapter)
    freeze(model)
    register_site_aliases(model)
    _SOURCES[model] = {"model": str(id_or_path), "adapter": None if adapter is None else str(adapter),
                       "merged": bool(merge_adapter), "dtype": dtype}
    return model, tokenizer


def load_adapter(model, adapter: str | os.PathLike, *, merge: bool = False):
    """Put a PEFT adapter (directory or hub id) on ``model``; ``merge=True`` folds it into the weights."""
    location, is_local = resolve_model_location(adapter, what="adapter")
    if is_local and not (Path(location) / "adapter_config.json").exists():
        raise ConfigError(f"adapter directory {location!r} has no adapter_config.json; pass a directory written "
                          "by PeftModel.save_pretrained")
    if not is_local and _hub_offline():
        # peft does not pass local_files_only on; resolve the adapter from the local HF cache first.
        from huggingface_hub import snapshot_download

        try:
            location, is_local = snapshot_download(location, local_files_only=True), True
        except OSError as e:
            raise _hub_error(location, "adapter", e) from None
    from peft import PeftModel

    def load():
        try:
            return PeftModel.from_pretrained(model, location)
        except ValueError as e:  # peft's "Can't find 'adapter_config.json'" for an unknown hub id
            raise OSError(str(e)) from None

    wrapped = _load_or_hub_error(load, location, is_local, "adapter")
    if merge:
        return wrapped.merge_and_unload()
    return wrapped
