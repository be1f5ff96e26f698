"""Where a latent lives: `Site` and its one canonical string form.

    "hook_layers.0:output@given"      module path, input/output, positions
    "model.layers.6:output[0]@given"  with a tuple index into the module's output
    "embeddings" / "hidden"           aliases a model resolves to a path (see `resolve_site`)

Positions: ``given`` (per-example positions supplied with the batch: the default),
``all`` (every position) or an explicit comma list such as ``0,3,5``.

Aliases (``embeddings``, ``layer{l}``, ``hidden`` ...) map short names to module paths. A model gets them
from a table the library keeps beside the model (``register_site_aliases``: what ``load_causal_lm`` and
``to_hooked_transformer`` do) or from its own ``site_aliases()`` method (the task models); no attribute is
ever set on the model. Without either, they are derived from the model's layout: ``llm_site_aliases`` for a
Hugging Face model (``embeddings`` -> the input embedding module, ``layer{l}`` -> the hidden state decoder
block l returns, element 0 where it returns a tuple), ``tlens_site_aliases`` for a TransformerLens model
(``hook_embed``, ``blocks.{l}.hook_resid_post``: the same latents). ``site_aliases`` / ``resolve_site`` are the one resolution every backend uses, so a site string
names the same latent under every backend however the model was loaded.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_SITE_RE = re.compile(
    r"^(?P<module>[A-Za-z_][\w.\-]*)"
    r"(?::(?P<io>input|output))?"
    r"(?:\[(?P<index>\d+)\])?"
    r"(?:@(?P<positions>given|all|\d+(?:,\d+)*))?$"
)


@dataclass(frozen=True)
class Site:
    """A latent location inside one model.

    module:    dotted module path (``model.get_submodule`` form) or a model-specific alias.
    io:        read/write the module's ``output`` (default) or its first positional ``input``.
    index:     index into a tuple output (None: the output is the tensor itself).
    positions: ``given`` | ``all`` | comma-separated integers.
    """

    module: str
    io: str = "output"
    index: int | None = None
    positions: str = "given"

    def __post_init__(self) -> None:
        if self.io not in ("input", "output"):
            raise ConfigError(f"site io {self.io!r} must be 'input' or 'output'")
        if not re.fullmatch(r"given|all|\d+(?:,\d+)*", self.positions):
            raise ConfigError(
                f"site positions {self.positions!r} must be 'given', 'all' or a comma list like '0,3,5'"
            )

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse the canonical string form (the inverse of ``str(site)``)."""
        if isinstance(text, Site):
            return text
        m = _SITE_RE.match(text.strip())
        if not m:
            raise ConfigError(
                f"cannot parse site {text!r}; expected 'module.path[:input|:output][[i]][@given|@all|@0,3]', "
                "e.g. 'model.layers.6:output@given' or an alias like 'embeddings'"
            )
        idx = m.group("index")
        return cls(
            module=m.group("module"),
            io=m.group("io") or "output",
            index=int(idx) if idx is not None else None,
            positions=m.group("positions") or "given",
        )

    def __str__(self) -> str:
        s = f"{self.module}:{self.io}"
        if self.index is not None:
            s += f"[{self.index}]"
        return s + f"@{self.positions}"

    def with_module(self, module: str) -> Site:
        return Site(module=module, io=self.io, index=self.index, positions=self.positions)

    def explicit_positions(self) -> list[int] | None:
        """The integer positions of an explicit position list, else None."""
        if self.positions in ("given", "all"):
            return None
        return [int(p) for p in self.positions.split(",")]


# model -> {alias: module path}, held beside the model (weakly: an entry dies with its model).
_REGISTERED_ALIASES: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def register_site_aliases(model: Any, aliases: Mapping[str, str] | None = None) -> Any:
    """Record ``aliases`` (default: ``llm_site_aliases(model)``) for ``model``; returns the model.

    The table lives in llm_mas, keyed weakly by the model object: the model itself is not changed, and a copy
    of it (``copy.deepcopy``, pickling) has no registered aliases until it is registered too.
    """
    table = dict(aliases if aliases is not None else llm_site_aliases(model))
    try:
        _REGISTERED_ALIASES[model] = table
    except TypeError as e:  # e.g. "cannot create weak reference to 'X' object"
        raise ConfigError(f"cannot register site aliases for a {type(model).__name__}: {e}; give its class a "
                          "site_aliases() method instead") from None
    return model


def registered_site_aliases(model: Any) -> dict[str, str] | None:
    """The aliases registered for exactly this object (a copy), or None."""
    try:
        aliases = _REGISTERED_ALIASES.get(model)
    except TypeError:  # not weak-referenceable or not hashable: nothing can be registered for it
        return None
    return None if aliases is None else dict(aliases)


def is_tlens_model(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens model (``HookedTransformer`` or ``TransformerBridge``).

    Duck-typed (hook points plus ``run_with_hooks``) so that this module never imports transformer_lens.
    """
    return isinstance(getattr(model, "hook_dict", None), dict) and callable(getattr(model, "run_with_hooks", None))


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face model (or a PEFT wrapper of one): it has ``get_input_embeddings``."""
    return not is_tlens_model(model) and callable(getattr(model, "get_input_embeddings", None))


def site_aliases(model: Any) -> dict[str, str]:
    """Aliases of ``model`` (a copy), the one table every backend resolves site strings with.

    In order: the aliases registered for this very object (``register_site_aliases``); for a TransformerLens
    model, ``tlens_site_aliases`` (never an attribute looked up through it: a ``TransformerBridge`` forwards
    unknown attributes to the HF model it wraps, whose aliases name HF modules); the model's own
    ``site_aliases()`` method; for a Hugging Face model, ``llm_site_aliases`` (so a model loaded with plain
    ``AutoModelForCausalLM.from_pretrained`` resolves as one loaded with ``load_causal_lm``); else none.
    """
    registered = registered_site_aliases(model)
    if registered is not None:
        return registered
    if is_tlens_model(model):
        return tlens_site_aliases(model)
    own = getattr(model, "site_aliases", None)
    if callable(own):
        return dict(own())
    if is_hf_model(model):
        return llm_site_aliases(model)
    return {}


def resolve_alias(site: str | Site, aliases: Mapping[str, str]) -> Site:
    """``site`` with an alias module replaced by its target; the site's own io/index override the alias's."""
    site = Site.parse(site)
    if site.module in aliases:
        target = Site.parse(aliases[site.module])
        return Site(target.module, site.io if site.io != "output" else target.io,
                    site.index if site.index is not None else target.index, site.positions)
    return site


def resolve_site(model: Any, site: str | Site) -> Site:
    """``site`` with the aliases of ``model`` (``site_aliases(model)``) resolved; every backend's ``resolve``."""
    return resolve_alias(site, site_aliases(model))


# ------------------------------------------------------------------ Hugging Face causal LMs
def _module_name(model: Any, target: Any) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def decoder_layers_path(model: Any) -> str | None:
    """Dotted path of the ModuleList holding the decoder blocks (``model.layers``, ``transformer.h``, ...)."""
    from torch import nn

    config = getattr(model, "config", None)
    n_layers = None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if config is not None and isinstance(getattr(config, key, None), int):
            n_layers = getattr(config, key)
            break
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n_layers is None or len(m) == n_layers)]
    if not candidates:
        return None
    preferred = [name for name, _ in candidates if re.search(r"(^|\.)(layers|h|blocks|layer)$", name)]
    return preferred[0] if preferred else candidates[0][0]


# model -> what its decoder blocks return: 0 (a tuple, hidden state first) or None (the hidden state itself).
# Weakly keyed: an entry dies with its model.
_BLOCK_OUTPUT_INDEX: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


class _FirstBlockDone(Exception):
    """Raised by the probe's hook to end the forward pass as soon as the first decoder block has returned."""


def block_output_index(model: Any, layers_path: str) -> int | None:
    """Where the hidden state sits in the output of the decoder blocks at ``layers_path``.

    ``None`` when a block returns the hidden state (B, T, d) itself (most families in transformers 5: Llama,
    Qwen2, GPT-2, ...); ``0`` when it returns a tuple with the hidden state first (GPT-J, BLOOM, Falcon,
    GPT-Neo, CodeGen, MPT: their blocks also return attention weights or a cache). Found once per model by
    running it on one token up to the first block (a hook stops the forward pass there; no gradient, the
    random state is restored, so nothing the model or the caller holds changes) and cached. A model the probe
    cannot run (weights on the meta device, a forward that needs more than ``input_ids``) counts as ``None``:
    a tuple output then fails at run time with the SiteError that asks for an explicit ``[0]``.
    """
    import torch

    try:
        return _BLOCK_OUTPUT_INDEX[model]
    except (KeyError, TypeError):
        pass
    found: list[Any] = []

    def stop(module: Any, args: Any, output: Any) -> None:
        found.append(output)
        raise _FirstBlockDone

    index = None
    try:
        weight = next(iter(model.get_input_embeddings().parameters()))
        device = weight.device
    except (AttributeError, NotImplementedError, StopIteration):
        device = None
    if device is not None and device.type != "meta":
        handle = model.get_submodule(layers_path)[0].register_forward_hook(stop)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
        except Exception:  # _FirstBlockDone (the expected way out), or the model cannot run: "unknown" (above)
            pass
        finally:
            handle.remove()
        if found and isinstance(found[0], (tuple, list)) and found[0] and isinstance(found[0][0], torch.Tensor):
            index = 0
    try:
        _BLOCK_OUTPUT_INDEX[model] = index
    except TypeError:  # not weak-referenceable: probe again next time
        pass
    return index


def llm_site_aliases(model: Any) -> dict[str, str]:
    """Aliases for a HF causal LM: ``embeddings`` -> input embedding module, ``layer{l}`` -> decoder block l.

    The embedding module is found through ``get_input_embeddings()`` (``model.embed_tokens`` for Qwen2/Llama,
    ``transformer.wte`` for GPT-2, ``gpt_neox.embed_in`` for Pythia), also under a PEFT wrapper. Where the
    blocks return a tuple (GPT-J, BLOOM, Falcon, ...), ``layer{l}`` addresses its hidden state, element 0
    (``transformer.h.0:output[0]``; see ``block_output_index``), so ``layer{l}`` is the residual stream after
    block l in every family.
    """
    aliases: dict[str, str] = {}
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except NotImplementedError:  # a model class without input embeddings (transformers raises this)
            emb = None
        name = _module_name(model, emb) if emb is not None else None
        if name:
            aliases["embeddings"] = name
    layers = decoder_layers_path(model)
    if layers is not None:
        suffix = ":output[0]" if block_output_index(model, layers) == 0 else ""
        for i in range(len(model.get_submodule(layers))):
            aliases[f"layer{i}"] = f"{layers}.{i}{suffix}"
    return aliases


# ------------------------------------------------------------------ TransformerLens models
def tlens_site_aliases(model: Any) -> dict[str, str]:
    """``embeddings`` -> ``hook_embed``; ``layer{l}`` -> ``blocks.{l}.hook_resid_post``."""
    aliases = {"embeddings": "hook_embed"}
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None) or len(getattr(model, "blocks", []))
    for layer in range(n_layers):
        aliases[f"layer{layer}"] = f"blocks.{layer}.hook_resid_post"
    return aliases
