"""Plain-PyTorch backend: forward hooks on modules, always removed (try/finally).

Works with any ``nn.Module`` whose site module returns (or receives) a tensor (B, T, d) or a tuple holding
one, and with llm_mas ``HookPoint``s, which also report the absolute positions of each call so edits land
on the right step inside recurrences and KV-cached decoding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import InterventionError, SiteError, closest
from ..hooks import HookPoint
from ..sites import Site, resolve_site, site_aliases
from .base import (
    Edit,
    apply_edit_to_chunk,
    as_3d,
    check_edits_fired,
    edit_entry_index,
    model_output_logits,
    pick_latent,
    replace_latent,
)


def get_module(model: nn.Module, site: Site) -> nn.Module:
    """The module at ``site.module``; a wrong path lists the closest valid names."""
    try:
        return model.get_submodule(site.module)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        aliases = list(site_aliases(model))
        raise SiteError(
            f"no module {site.module!r} in {type(model).__name__}; closest valid names: "
            f"{', '.join(closest(site.module, names + aliases))}") from None


def _call(model: nn.Module, inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(**inputs)


class TorchHookBackend:
    """`collect` and `patch` through ``register_forward_hook`` / ``register_forward_pre_hook``."""

    name = "torch"
    feed_options: Mapping[str, Any] = MappingProxyType({"use_cache": False})  # HF forwards: no KV cache

    def prepare(self, hf_model: Any, tokenizer: Any) -> Any:
        """A loaded HF model runs as it is."""
        return hf_model

    def resolve(self, model: nn.Module, site: Site | str) -> Site:
        site = resolve_site(model, site)
        get_module(model, site)
        return site

    # ---------------------------------------------------------------- hooks
    @contextmanager
    def edits_installed(self, model: nn.Module, edits: Sequence[Edit]) -> Iterator[None]:
        """Install `edits` as hooks for the duration of the block; check afterwards that all fired."""
        handles = []
        hook_points: list[HookPoint] = []
        try:
            for edit in edits:
                edit.site = self.resolve(model, edit.site)
                edit.fired = 0
                module = get_module(model, edit.site)
                entry_index = edit_entry_index(edit.mask)
                if isinstance(module, HookPoint):
                    module.edit_steps = edit.mask.any(0) if module.edit_steps is None else (
                        _or_steps(module.edit_steps, edit.mask.any(0)))
                    hook_points.append(module)
                handles.append(self._register_edit(module, edit, entry_index))
            yield
        finally:
            for h in handles:
                h.remove()
            for hp in hook_points:
                hp.edit_steps = None
        check_edits_fired(edits)

    def _register_edit(self, module: nn.Module, edit: Edit, entry_index: torch.Tensor):
        site = edit.site
        if site.io == "output":
            def hook(mod, args, output):
                x = pick_latent(output, site.index, site)
                x3, squeezed = as_3d(x, site)
                positions = args[1] if isinstance(mod, HookPoint) and len(args) > 1 else None
                new = apply_edit_to_chunk(edit, x3, positions, entry_index)
                if new is x3:
                    return None
                return replace_latent(output, site.index, new.squeeze(1) if squeezed else new)

            return module.register_forward_hook(hook)

        def pre_hook(mod, args):
            x = pick_latent(args, site.index if site.index is not None else 0, site)
            x3, squeezed = as_3d(x, site)
            positions = args[1] if isinstance(mod, HookPoint) and len(args) > 1 else None
            new = apply_edit_to_chunk(edit, x3, positions, entry_index)
            if new is x3:
                return None
            return replace_latent(tuple(args), site.index if site.index is not None else 0,
                            new.squeeze(1) if squeezed else new)

        return module.register_forward_pre_hook(pre_hook)

    # ---------------------------------------------------------------- API
    def patch(self, model: nn.Module, inputs: Mapping[str, torch.Tensor] | torch.Tensor,
              edits: Sequence[Edit]) -> torch.Tensor:
        with self.edits_installed(model, edits):
            out = _call(model, inputs)
        return model_output_logits(out)

    def collect(self, model: nn.Module, inputs: Mapping[str, torch.Tensor] | torch.Tensor,
                sites: Sequence[Site | str]) -> dict[str, torch.Tensor]:
        with self.recording(model, sites) as store:
            _call(model, inputs)
        return store.result()

    @contextmanager
    def recording(self, model: nn.Module, sites: Sequence[Site | str]) -> Iterator[_Recorder]:
        """Record latents at `sites` during whatever runs inside the block."""
        recorder = _Recorder()
        handles = []
        try:
            for s in sites:
                site = self.resolve(model, s)
                module = get_module(model, site)
                handles.append(recorder.attach(module, site))
            yield recorder
        finally:
            for h in handles:
                h.remove()


def _or_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    out = torch.zeros(n, dtype=torch.bool, device=a.device)
    out[: a.numel()] |= a
    out[: b.numel()] |= b
    return out


class _Recorder:
    """Collects (positions, chunk) pairs per site and assembles (B, T, d) tensors."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}

    def attach(self, module: nn.Module, site: Site):
        key = str(site)
        self.chunks[key] = []

        def record(x: torch.Tensor, args) -> None:
            x3, _ = as_3d(x, site)
            positions = args[1] if isinstance(module, HookPoint) and len(args) > 1 else None
            self.chunks[key].append((positions, x3.detach()))

        if site.io == "output":
            return module.register_forward_hook(lambda mod, args, out: record(pick_latent(out, site.index, site), args))
        return module.register_forward_pre_hook(
            lambda mod, args: record(pick_latent(args, site.index if site.index is not None else 0, site), args))

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, chunks in self.chunks.items():
            if not chunks:
                raise InterventionError(f"site {key} was never reached while collecting")
            if all(p is None for p, _ in chunks):
                out[key] = chunks[0][1] if len(chunks) == 1 else torch.cat([c for _, c in chunks], dim=1)
                continue
            T = int(max(int(p.max()) for p, _ in chunks if p is not None)) + 1
            first = chunks[0][1]
            full = first.new_zeros(first.shape[0], T, first.shape[-1])
            for p, c in chunks:
                full[:, p] = c
            out[key] = full
        return out
