"""TransformerLens backend: read and write latents at hook points (``hook_embed``, ``blocks.{l}.hook_resid_post``).

    ht = to_hooked_transformer(hf_model, tokenizer)          # offline; logits equal the HF model's
    backend = TLensBackend()
    latents = backend.collect(ht, {"input_ids": ids}, ["embeddings", "layer1"])   # {site: (B, T, d)}
    logits = backend.patch(ht, {"input_ids": ids}, [Edit(site, mask, fn)])       # (B, T, V), with grads

Works with a ``HookedTransformer`` and with a ``TransformerBridge`` (transformer-lens 3.9:
``to_transformer_bridge(hf_model, tokenizer)`` builds one offline around a copy, since the bridge switches the
HF model it wraps to eager attention; it covers far more families than ``to_hooked_transformer``). Aliases: ``embeddings`` -> ``hook_embed``, ``layer{l}`` ->
``blocks.{l}.hook_resid_post`` (the same latents as a HF decoder layer's output).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from ..errors import ConfigError, InterventionError, SiteError, closest
from ..sites import Site, register_site_aliases, resolve_site, site_aliases, tlens_site_aliases
from .base import Edit, apply_edit_to_chunk, check_edits_fired, edit_entry_index


def _hook_names(model: Any) -> list[str]:
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise SiteError(f"the tlens backend needs a TransformerLens model (HookedTransformer or TransformerBridge), "
                        f"got {type(model).__name__}; convert a HF model with to_hooked_transformer(model, tokenizer)")
    return list(hook_dict)


def _tokens_and_kwargs(inputs: Mapping[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, dict]:
    if isinstance(inputs, torch.Tensor):
        return inputs, {}
    unknown = set(inputs) - {"input_ids", "attention_mask"}
    if "input_ids" not in inputs or unknown:
        raise ConfigError(f"the tlens backend takes inputs {{'input_ids', 'attention_mask'}}; got keys {sorted(inputs)}")
    kwargs = {}
    if inputs.get("attention_mask") is not None:
        kwargs["attention_mask"] = inputs["attention_mask"]
    return inputs["input_ids"], kwargs


class TLensBackend:
    """``collect`` and ``patch`` through TransformerLens ``run_with_hooks`` (hooks always removed)."""

    name = "tlens"
    feed_options: Mapping[str, Any] = MappingProxyType({})  # HookedTransformer takes no HF keywords

    def prepare(self, hf_model: Any, tokenizer: Any) -> Any:
        """A HookedTransformer converted from the loaded HF model (`to_hooked_transformer`)."""
        return to_hooked_transformer(hf_model, tokenizer)

    def resolve(self, model: Any, site: Site | str) -> Site:
        """Resolve aliases (``llm_mas.sites.resolve_site``); the site must be a hook point (hook points hold one
        tensor: no tuple index)."""
        names = _hook_names(model)  # a clear error for a model that is not a TransformerLens one
        resolved = resolve_site(model, site)
        if resolved.module not in model.hook_dict:
            raise SiteError(f"no hook point {resolved.module!r} in {type(model).__name__}; closest valid names: "
                            f"{', '.join(closest(resolved.module, names + list(site_aliases(model))))}")
        if resolved.index is not None:
            raise SiteError(f"site {resolved}: a TransformerLens hook point holds one tensor; drop the tuple index "
                            f"[{resolved.index}]")
        return resolved

    def patch(self, model: Any, inputs: Mapping[str, torch.Tensor] | torch.Tensor,
              edits: Sequence[Edit]) -> torch.Tensor:
        """Run the model with ``edits`` applied at their hook points; return logits (B, T, V).

        Raises InterventionError if an edit did not fire on every entry of its mask.
        """
        hooks = []
        for edit in edits:
            edit.site = self.resolve(model, edit.site)
            edit.fired = 0
            hooks.append((edit.site.module, self._edit_hook(edit, edit_entry_index(edit.mask))))
        tokens, kwargs = _tokens_and_kwargs(inputs)
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
        check_edits_fired(edits)
        return logits

    @staticmethod
    def _edit_hook(edit: Edit, entry_index: torch.Tensor):
        def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            if activation.dim() != 3:
                raise SiteError(f"site {edit.site} holds shape {tuple(activation.shape)}; edits need (B, T, d) "
                                "(per-head hook points are not supported)")
            return apply_edit_to_chunk(edit, activation, None, entry_index)  # (B, T, d)

        return hook

    def collect(self, model: Any, inputs: Mapping[str, torch.Tensor] | torch.Tensor,
                sites: Sequence[Site | str]) -> dict[str, torch.Tensor]:
        """Run the model once; return {str(site): latents (B, T, d)}, detached."""
        resolved = [self.resolve(model, s) for s in sites]
        store: dict[str, torch.Tensor] = {}

        def recorder(key: str):
            def hook(activation: torch.Tensor, hook: Any) -> None:
                store[key] = activation.detach()

            return hook

        tokens, kwargs = _tokens_and_kwargs(inputs)
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(s.module, recorder(str(s))) for s in resolved], **kwargs)
        missing = [str(s) for s in resolved if str(s) not in store]
        if missing:
            raise InterventionError(f"hook point(s) {', '.join(missing)} were never reached while collecting")
        return store


# Largest |TL - HF| logit difference, relative to the largest |HF| logit, a converted model may show. Correct
# conversions measured at most 8e-7 in float32 (the tiny models of all tested families); TransformerBridge's
# Cohere, whose attention differs from HF's, at 0.58 once attention is not uniform.
AGREEMENT_TOL = {torch.float32: 1e-4, torch.float64: 1e-4}
AGREEMENT_TOL_LOW_PRECISION = 0.1  # 16-bit: implementations round differently


def check_agrees_with_hf(hf_model: Any, tl_model: Any, what: str) -> float:
    """Run both models on one fixed 8-token input; raise ConfigError unless the logits agree.

    Returns the relative difference (largest |difference| / largest |HF logit|). The HF model runs in eval mode
    for the check (its mode is restored): dropout would make any comparison meaningless.
    """
    device = next(hf_model.parameters()).device
    vocab = int(hf_model.get_input_embeddings().weight.shape[0])
    ids = (torch.arange(8, device=device) * 7919 + 3).remainder(vocab).unsqueeze(0)  # (1, 8), spread over the vocab
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            reference = hf_model(input_ids=ids).logits.float()
            converted = tl_model(ids.to(next(tl_model.parameters()).device)).float().to(device)
    finally:
        hf_model.train(was_training)
    rel = float((converted - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    dtypes = {next(hf_model.parameters()).dtype, next(tl_model.parameters()).dtype}
    tol = max(AGREEMENT_TOL.get(dtype, AGREEMENT_TOL_LOW_PRECISION) for dtype in dtypes)
    if not rel <= tol:  # also catches NaN
        raise ConfigError(f"the {what} of a {type(hf_model).__name__} does not compute what the HF model computes: "
                          f"its logits differ by {rel:.3g} of the largest logit (allowed {tol:g} for "
                          f"{', '.join(sorted(str(d) for d in dtypes))}); "
                          "use the torch or nnsight backend for this model")
    return rel


def to_hooked_transformer(hf_model: Any, tokenizer: Any = None, *, device: str | torch.device | None = None,
                          dtype: torch.dtype | None = None):
    """A frozen ``HookedTransformer`` with ``hf_model``'s weights, built offline; logits equal the HF model's.

    No folding or centring (``fold_ln=False`` etc.), so latents and logits keep the HF numbers. Works for the
    architectures transformer-lens 3.9 converts under transformers 5 (tested: GPT-NeoX, Llama, Mistral, Qwen2,
    Qwen3, Phi-3, OPT, OLMo-3, OLMoE, GPT-J, BLOOM, Mixtral, GPT-Neo); others raise ConfigError: use
    ``to_transformer_bridge``. Without a tokenizer the model has none (nothing is loaded from the hub). A PEFT
    model must be merged first (``load_causal_lm(..., merge_adapter=True)``). The converted model's logits are
    checked against the HF model's on a short input (``check_agrees_with_hf``; ConfigError if they differ).
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    if hasattr(hf_model, "peft_config"):
        raise ConfigError("to_hooked_transformer needs a plain HF model; merge the PEFT adapter first "
                          "(load_causal_lm(..., adapter=DIR, merge_adapter=True))")
    if dtype is None:
        dtype = next(hf_model.parameters()).dtype
    if device is None:
        device = next(hf_model.parameters()).device
    hf_config = copy.deepcopy(hf_model.config)
    hf_config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory() as config_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer is deprecated in favour of bridges
        hf_config.save_pretrained(config_dir)  # transformer-lens reads the config from a directory
        try:
            cfg = loading.get_pretrained_model_config(config_dir, fold_ln=False, device=device, dtype=dtype)
            state_dict = loading.get_pretrained_state_dict(config_dir, cfg, hf_model=hf_model, dtype=dtype)
        except (ValueError, NotImplementedError, AttributeError) as e:
            # unsupported architecture (NotImplementedError), or a transformers-5 config that lacks a key
            # transformer-lens reads (AttributeError: GPT-2's n_ctx, Phi's partial_rotary_factor)
            raise ConfigError(f"transformer-lens cannot convert a {type(hf_model).__name__} to a HookedTransformer: "
                              f"{type(e).__name__}: {e}; try to_transformer_bridge(model, tokenizer)") from None
        name = getattr(hf_model, "name_or_path", "") or type(hf_model).__name__
        cfg.model_name = str(name).rstrip("/").split("/")[-1]
        if tokenizer is None:  # else transformer-lens loads one from the temporary config directory, which has none
            cfg.tokenizer_name = None
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check_agrees_with_hf(hf_model, model, "HookedTransformer")
    return register_site_aliases(model, tlens_site_aliases(model))


def to_transformer_bridge(hf_model: Any, tokenizer: Any):
    """A frozen ``TransformerBridge`` around a copy of ``hf_model``, built offline; latents and logits keep the HF
    numbers (no folding; the copy runs eager attention, as the bridge requires).

    Covers far more architectures than ``to_hooked_transformer`` (tested: 32 HF families, see the README).
    ``tokenizer`` is required (the bridge would otherwise fetch one from the hub) and must have been loaded
    from a directory (``AutoTokenizer.from_pretrained(path)``): transformer-lens reloads it from its
    ``name_or_path``. The model given is not changed.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if hasattr(hf_model, "peft_config"):
        raise ConfigError("to_transformer_bridge needs a plain HF model; merge the PEFT adapter first "
                          "(load_causal_lm(..., adapter=DIR, merge_adapter=True))")
    if tokenizer is None or not getattr(tokenizer, "name_or_path", None):
        raise ConfigError("to_transformer_bridge needs the model's tokenizer loaded from a directory "
                          "(AutoTokenizer.from_pretrained(path)); without one the bridge would download one")
    parameter = next(hf_model.parameters())
    copied = copy.deepcopy(hf_model)  # the bridge switches the model it wraps to eager attention
    copied.config.architectures = [type(hf_model).__name__]  # how the bridge picks its adapter
    with tempfile.TemporaryDirectory() as config_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copied.config.save_pretrained(config_dir)  # the bridge reads the config from a directory
        try:
            bridge = TransformerBridge.boot_transformers(config_dir, hf_model=copied, tokenizer=tokenizer,
                                                         dtype=parameter.dtype, device=parameter.device)
        except ValueError as e:
            raise ConfigError(f"transformer-lens has no bridge for a {type(hf_model).__name__}: "
                              f"{str(e).split('Available architectures')[0].strip()}") from None
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    check_agrees_with_hf(hf_model, bridge, "TransformerBridge")
    return register_site_aliases(bridge, tlens_site_aliases(bridge))
