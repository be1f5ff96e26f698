"""Run a frozen decoder-only LM from a layer's output: a step at layer l runs layers l+1..L only.

A frozen model's activations below an intervention site do not depend on the alignment, so they can be
computed once (``collect`` under no_grad) and every training step resumes from them:

    resume = LayerResume(model, layer=4)            # checks once that resuming reproduces the full run
    h = resume.collect(input_ids)                   # (B, T, d) output of decoder layer 4, once
    logits = resume(h_edited, input_ids, keep_last=1)   # layers 5.. + final norm + head

Works on HF causal LMs whose decoder layers sit in ``model.get_decoder().layers`` (Llama, Qwen2, Mistral,
GPT-NeoX-style ``layers`` lists) and on the task Transformer (``blocks``). For an HF model, layers 0..l are
swapped, for the length of one forward call, for pass-through modules (layer l's returns the given
activations), so the model's own forward builds masks and rotary tables exactly as in a full run. Because
that relies on the layers' calling convention, the constructor runs the model once both ways on a small
input and raises InterventionError unless the logits agree; nothing is ever resumed unchecked.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InterventionError


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input (or, for the site's layer, `value`)."""

    def __init__(self, value: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


class _Reached(Exception):
    """Raised by `LayerResume.collect`'s hook once the site's layer has run: ends the forward there."""


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layer list `LayerResume` resumes through (``blocks`` of a task Transformer,
    ``model.get_decoder().layers`` of an HF causal LM), or None."""
    if hasattr(model, "blocks") and hasattr(model, "readout"):
        return model.blocks
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    if layers is None and callable(getattr(model, "get_input_embeddings", None)):  # transformer.h, ...
        from ..sites import decoder_layers_path

        path = decoder_layers_path(model)
        layers = model.get_submodule(path) if path is not None else None
    return layers


def site_layer(model: nn.Module, module_path: str, io: str, index: int | None) -> int:
    """The decoder layer l whose output the site (``module_path``, ``io``, tuple ``index``) is, so that a run
    can resume at l; InterventionError saying why not otherwise (another module, an input, the embeddings)."""
    layers = decoder_layers(model)
    if layers is None:
        raise InterventionError(f"{type(model).__name__} has no decoder layer list (model.get_decoder().layers) "
                                "to resume from")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise InterventionError(f"no module {module_path!r} in {type(model).__name__}") from None
    matches = [i for i, layer in enumerate(layers) if layer is module]
    if not matches:
        raise InterventionError(f"site {module_path!r} is not the output of a decoder layer (nothing below it "
                                "to skip, e.g. the embeddings, or a module inside a layer)")
    if io != "output" or index not in (None, 0):
        raise InterventionError(f"site {module_path}:{io}[{index}] is not the hidden state a decoder layer "
                                "returns (only a layer's output, element 0 of a tuple, is resumed from)")
    return matches[0]


class LayerResume:
    """Layers l+1..L (and the head) of a frozen model, fed the output of layer l."""

    def __init__(self, model: nn.Module, layer: int, check_length: int = 8):
        self.model = model
        self.task = hasattr(model, "blocks") and hasattr(model, "readout")
        layers = decoder_layers(model)
        if layers is None:
            raise InterventionError(f"{type(model).__name__}: no decoder layer list (model.get_decoder().layers) to resume "
                               "from; run the full model (TorchHookBackend.patch)")
        if not 0 <= layer < len(layers):
            raise InterventionError(f"layer {layer} is outside the model's {len(layers)} decoder layers (0..{len(layers) - 1})")
        self.layers, self.layer = layers, layer
        self.as_tuple = False
        if not self.task:
            self._check(check_length)

    # ------------------------------------------------------------------ activations at the site
    @torch.no_grad()
    def collect(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d) the output of decoder layer `layer` on input_ids (B, T); computed without a graph."""
        seen = {}

        def grab(module, args, output):
            seen["h"] = output[0] if isinstance(output, tuple) else output

        def grab_and_stop(module, args, output):
            grab(module, args, output)
            raise _Reached  # the layers above the site are not needed

        handle = self.layers[self.layer].register_forward_hook(grab if self.task else grab_and_stop)
        try:
            if self.task:
                self.model.features(input_ids)
            else:
                self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        except _Reached:
            pass
        finally:
            handle.remove()
        return seen["h"]

    # ------------------------------------------------------------------ the rest of the model
    def __call__(self, hidden: torch.Tensor, input_ids: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
        """Logits (B, T or keep_last, V) of the model whose layer-`layer` output is `hidden` (B, T, d).

        input_ids: the run's tokens (HF: only their shape and device are used past the skipped layers).
        keep_last: the head runs on the last `keep_last` positions only (None: all of them).
        """
        if self.task:
            x = self.model.features_from(self.layer, hidden)
            return self.model.readout(x if keep_last is None else x[:, -keep_last:])
        originals = [self.layers[i] for i in range(self.layer + 1)]
        try:
            for i in range(self.layer + 1):
                self.layers[i] = _PassThrough(hidden if i == self.layer else None, self.as_tuple)
            extra = {} if keep_last is None else {"logits_to_keep": keep_last}
            return self.model(input_ids=input_ids, use_cache=False, **extra).logits
        finally:
            for i, module in enumerate(originals):
                self.layers[i] = module

    def _check(self, length: int) -> None:
        vocab = int(self.model.get_input_embeddings().weight.shape[0])
        device = self.model.get_input_embeddings().weight.device
        ids = torch.arange(length, device=device)[None] % vocab                    # (1, T)
        with torch.no_grad():
            full = self.model(input_ids=ids, use_cache=False).logits
            h = self.collect(ids)
            for as_tuple in (False, True):
                self.as_tuple = as_tuple
                try:
                    resumed = self(h, ids)
                except Exception:  # noqa: BLE001 - a calling convention this model's layers do not follow
                    continue
                if resumed.shape == full.shape and torch.allclose(resumed, full, atol=1e-5, rtol=1e-4):
                    return
        raise InterventionError(f"{type(self.model).__name__}: resuming at layer {self.layer} does not reproduce the full "
                           "forward on a check input (its decoder layers follow another calling convention); run "
                           "the full model (TorchHookBackend.patch)")


__all__ = ["LayerResume", "decoder_layers", "site_layer"]
