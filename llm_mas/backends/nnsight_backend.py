"""nnsight backend: read and write latents of (unmodified) Hugging Face models through nnsight tracing.

    backend = NNsightBackend()
    latents = backend.collect(model, {"input_ids": ids}, ["embeddings", "layer1"])   # {site: (B, T, d)}
    logits = backend.patch(model, {"input_ids": ids}, [Edit(site, mask, fn)])       # (B, T, V), with grads

Numbers equal the plain-torch backend (``TorchHookBackend``); gradients reach whatever the ``Edit.fn``
closes over (the alignment parameters). Every model is wrapped once per backend in ``nnsight.NNsight``; the
backend keeps the wrapper (and any module order it learned) in its own tables, never on the model. A wrapper
holds its model, so a backend keeps alive the models it has run: use one backend per model or per run (as
``get_backend`` callers do), not one for a whole session of loading and dropping models.

nnsight facts this module relies on (nnsight 0.8.1, transformers 5):
- decoder layers return a plain tensor (B, T, d): ``.output`` is the hidden state, ``.output[0]`` a batch row;
- modules must be accessed in forward order inside one trace (else ``OutOfOrderError``), so edits are
  sorted by a static forward order (module entry for inputs, exit for outputs) and, if a model runs its
  modules in another order, by the order observed in a probe run;
- an edit at a module that never runs does not fail loudly in every nnsight version, so every edit counts
  the entries it changed and ``patch`` raises ``InterventionError`` unless all fired;
- trace bodies must be real source code in a file: they live in the functions below.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import InterventionError, SiteError, closest
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

# (module path, "input" | "output") -> rank of that event in the forward pass.
ForwardOrder = dict[tuple[str, str], int]


def unwrap_model(model: Any) -> nn.Module:
    """The ``nn.Module`` behind ``model`` (an nnsight wrapper/envoy or the module itself)."""
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module) and not isinstance(model, nn.Module):
        return inner
    if not isinstance(model, nn.Module):
        raise SiteError(f"the nnsight backend needs a torch module or an nnsight wrapper, got {type(model).__name__}")
    return model


def _static_forward_order(model: nn.Module) -> ForwardOrder:
    """Static forward order of module events: (path, "input") at entry, (path, "output") at exit (DFS)."""
    order: ForwardOrder = {}
    clock = 0

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal clock
        order[(prefix, "input")] = clock
        clock += 1
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
        order[(prefix, "output")] = clock
        clock += 1

    visit("", model)
    return order


@dataclass
class _Step:
    """All edits (or reads) at one module event, applied in one access."""

    path: str
    io: str
    edits: list[tuple[Edit, torch.Tensor]] = field(default_factory=list)  # (edit, entry index (B, T))
    reads: list[tuple[str, int | None, Site]] = field(default_factory=list)  # (key, tuple index, site)

    def apply(self, value: Any) -> Any:
        """Apply this step's edits to the module's output (or its positional args for io='input')."""
        new_value = value
        for edit, entry_index in self.edits:
            index = edit.site.index
            if self.io == "input":
                index = 0 if index is None else index
            x = pick_latent(new_value, index, edit.site)
            x3, squeezed = as_3d(x, edit.site)  # (B, T, d)
            y3 = apply_edit_to_chunk(edit, x3, None, entry_index)
            if y3 is not x3:
                new_value = replace_latent(new_value, index, y3.squeeze(1) if squeezed else y3)
        return new_value

    def read(self, value: Any) -> dict[str, torch.Tensor]:
        out = {}
        for key, index, site in self.reads:
            if self.io == "input":
                index = 0 if index is None else index
            x3, _ = as_3d(pick_latent(value, index, site), site)
            out[key] = x3.detach()  # (B, T, d)
        return out


def _trace_args(inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return (), dict(inputs)


# ------------------------------------------------------------------ trace bodies (need readable source)
def _traced_patch(wrapper, steps: list[_Step], args: tuple, kwargs: dict) -> torch.Tensor:
    with wrapper.trace(*args, **kwargs):
        for step in steps:
            envoy = wrapper.get(step.path)
            if step.io == "output":
                value = envoy.output
                new_value = step.apply(value)
                if new_value is not value:
                    envoy.output = new_value
            else:
                args_kwargs = envoy.inputs  # (args, kwargs) of the module call
                new_args = step.apply(args_kwargs[0])
                if new_args is not args_kwargs[0]:
                    envoy.inputs = (tuple(new_args), args_kwargs[1])
        logits = model_output_logits(wrapper.output).save()
    return logits


def _traced_collect(wrapper, steps: list[_Step], args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    store: dict[str, torch.Tensor] = {}
    with wrapper.trace(*args, **kwargs) as tracer:
        for step in steps:
            envoy = wrapper.get(step.path)
            value = envoy.output if step.io == "output" else envoy.inputs[0]
            store.update(step.read(value))
        tracer.stop()  # later layers are not needed
    return store


class NNsightBackend:
    """``collect`` and ``patch`` for Hugging Face (or any torch) models through nnsight tracing."""

    name = "nnsight"
    feed_options: Mapping[str, Any] = MappingProxyType({"use_cache": False})  # HF forwards: no KV cache

    def prepare(self, hf_model: Any, tokenizer: Any) -> Any:
        """A loaded HF model runs as it is."""
        return hf_model

    def __init__(self) -> None:
        # Both tables are keyed weakly by the model. A wrapper holds its model, so a wrapped model lives as long
        # as this backend; a learned order is plain data and dies with its model.
        self._wrappers: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
        self.observed_orders: weakref.WeakKeyDictionary[nn.Module, ForwardOrder] = weakref.WeakKeyDictionary()

    def wrapper(self, model: Any):
        """This backend's ``nnsight.NNsight`` wrapper of ``model`` (created on first use, then reused).

        A copy of a model (``copy.deepcopy``) is another key and gets its own wrapper: a copied wrapper would
        route nothing, because nnsight registers each wrapper on the very modules it wraps.
        """
        if not isinstance(model, nn.Module):
            return model  # already an nnsight model / envoy
        wrapper = self._wrappers.get(model)
        if wrapper is None:
            from nnsight import NNsight

            wrapper = self._wrappers[model] = NNsight(model)
        return wrapper

    def _forward_order(self, module: nn.Module) -> ForwardOrder:
        """The order learned for this model by a probe run, else its static (declaration) order."""
        observed = self.observed_orders.get(module)
        return observed if observed is not None else _static_forward_order(module)

    def resolve(self, model: Any, site: Site | str) -> Site:
        """Resolve aliases (``embeddings``, ``layer{l}``: ``llm_mas.sites.resolve_site``) and check the module
        exists."""
        module = unwrap_model(model)
        resolved = resolve_site(module, site)
        if resolved.module == "":
            raise SiteError(f"site {site} names the whole model; name a submodule such as 'layer0'")
        try:
            module.get_submodule(resolved.module)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n]
            raise SiteError(
                f"no module {resolved.module!r} in {type(module).__name__}; closest valid names: "
                f"{', '.join(closest(resolved.module, names + list(site_aliases(module))))}") from None
        return resolved

    # ------------------------------------------------------------ planning
    def _steps(self, module: nn.Module, sites: Sequence[Site]) -> list[_Step]:
        order = self._forward_order(module)
        steps: dict[tuple[str, str], _Step] = {}
        for site in sites:
            steps.setdefault((site.module, site.io), _Step(site.module, site.io))
        missing = [k for k in steps if k not in order]
        if missing:  # an order observed on another run lacks a module: fall back to the static one
            self.observed_orders.pop(module, None)
            order = self._forward_order(module)
        return sorted(steps.values(), key=lambda s: order[(s.path, s.io)])

    def _edit_plan(self, module: nn.Module, edits: Sequence[Edit]) -> list[_Step]:
        for edit in edits:
            edit.site = self.resolve(module, edit.site)
            edit.fired = 0
        steps = {(s.path, s.io): s for s in self._steps(module, [e.site for e in edits])}
        for edit in edits:
            steps[(edit.site.module, edit.site.io)].edits.append((edit, edit_entry_index(edit.mask)))
        return list(steps.values())

    # ------------------------------------------------------------ API
    def patch(self, model: Any, inputs: Mapping[str, torch.Tensor] | torch.Tensor,
              edits: Sequence[Edit]) -> torch.Tensor:
        """Run the model with ``edits`` applied inside the forward pass; return logits (B, T, V).

        Raises InterventionError if an edit did not fire on every entry of its mask.
        """
        from nnsight.intervention.interleaver import OutOfOrderError

        module = unwrap_model(model)
        wrapper = self.wrapper(model)
        args, kwargs = _trace_args(inputs)
        steps = self._edit_plan(module, edits)
        try:
            logits = _traced_patch(wrapper, steps, args, kwargs)
        except OutOfOrderError as e:
            # Either a site never ran, or this model runs modules in another order than it declares them.
            if not self._learn_order(module, [(s.path, s.io) for s in steps], args, kwargs, str(e)):
                raise
            steps = self._edit_plan(module, edits)
            logits = _traced_patch(wrapper, steps, args, kwargs)
        check_edits_fired(edits)
        return logits

    def collect(self, model: Any, inputs: Mapping[str, torch.Tensor] | torch.Tensor,
                sites: Sequence[Site | str]) -> dict[str, torch.Tensor]:
        """Run the model once (up to the last site); return {str(site): latents (B, T, d)}, detached."""
        from nnsight.intervention.interleaver import OutOfOrderError

        module = unwrap_model(model)
        wrapper = self.wrapper(model)
        args, kwargs = _trace_args(inputs)
        resolved = [self.resolve(module, s) for s in sites]

        def plan() -> list[_Step]:
            steps = {(s.path, s.io): s for s in self._steps(module, resolved)}
            for site in resolved:
                steps[(site.module, site.io)].reads.append((str(site), site.index, site))
            return list(steps.values())

        steps = plan()
        with torch.no_grad():
            try:
                store = _traced_collect(wrapper, steps, args, kwargs)
            except OutOfOrderError as e:
                if not self._learn_order(module, [(s.path, s.io) for s in steps], args, kwargs, str(e)):
                    raise
                steps = plan()
                store = _traced_collect(wrapper, steps, args, kwargs)
        missing = [str(s) for s in resolved if str(s) not in store]
        if missing:
            raise InterventionError(f"site(s) {', '.join(missing)} were never reached while collecting")
        return store

    # ------------------------------------------------------------ checks
    def _learn_order(self, module: nn.Module, events: list[tuple[str, str]], args: tuple, kwargs: dict,
                     nnsight_message: str) -> bool:
        """Probe run with plain hooks: raise InterventionError for a module that never runs, else record the
        observed module order in ``observed_orders`` and return True (the caller retries)."""
        observed: dict[tuple[str, str], int] = {}
        handles = []

        def make(path: str):
            def pre(mod, a):
                observed.setdefault((path, "input"), len(observed))

            def post(mod, a, o):
                observed.setdefault((path, "output"), len(observed))

            return pre, post

        try:
            for path in {p for p, _ in events}:
                pre, post = make(path)
                target = module.get_submodule(path)
                handles.append(target.register_forward_pre_hook(pre))
                handles.append(target.register_forward_hook(post))
            with torch.no_grad():
                module(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        never = [f"{p}:{io}" for p, io in events if (p, io) not in observed]
        if never:
            raise InterventionError(
                f"the site(s) {', '.join(never)} never fired: the module is not called during the forward "
                f"pass (check the site path and that the model's forward reaches it); nnsight: {nnsight_message}"
            ) from None
        static = self._forward_order(module)
        if sorted(events, key=lambda e: observed[e]) == sorted(events, key=lambda e: static[e]):
            return False  # the order was right: the nnsight error has another cause
        # Observed events first (in their order), then the static order for everything else.
        merged = {e: i for i, e in enumerate(sorted(observed, key=observed.get))}
        base = len(merged)
        for e, i in static.items():
            merged.setdefault(e, base + i)
        self.observed_orders[module] = merged
        return True
