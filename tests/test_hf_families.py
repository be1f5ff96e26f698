"""Every Hugging Face causal-LM family in ``hf_families.FAMILIES`` through every backend.

For each family (a tiny random model built offline from its config) and each of the torch-hooks and nnsight
backends: ``embeddings`` and every ``layer{l}`` resolve, ``layer0`` is HF's own residual stream after block 0
(``hidden_states[1]``), an identity edit at every site gives the plain forward's logits exactly, and swapping
one position's latent between two rows changes exactly what causality allows (at the last layer the two rows'
logits at that position trade places). TransformerLens: ``to_hooked_transformer`` and ``to_transformer_bridge``
for the families they convert (the same sites agree with the HF model within a measured tolerance), a clear
ConfigError for the rest.
"""

from __future__ import annotations

import pytest
import torch
from hf_families import FAMILIES, N_LAYERS, VOCAB, WIDTH, build_family, tiny_tokenizer

from llm_mas.backends import Edit, TorchHookBackend, get_backend
from llm_mas.errors import ConfigError

pytestmark = pytest.mark.llm

B, T, P = 3, 7, 3  # batch, sequence length, the position whose latent rows 0 and 1 swap
SITE_NAMES = ["embeddings"] + [f"layer{layer}" for layer in range(N_LAYERS)]

# Families each TransformerLens converter handles (transformer-lens 3.9, transformers 5); README lists them.
TL_HOOKED = {"gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "opt", "olmo3", "olmoe", "gptj", "bloom",
             "mixtral", "gpt_neo"}
# Cohere: the bridge builds, but its attention differs from HF's (logits off by 0.58 of the largest one here),
# so to_transformer_bridge refuses it. Helium: no bridge.
TL_BRIDGE = set(FAMILIES) - {"helium", "cohere"}
# Largest |TL - HF| over a site's latents (or the logits), relative to their largest magnitude: measured at most
# 7.8e-7 (SmolLM3 through the bridge).
TL_REL_TOL = 1e-5


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))


_PLAIN: dict[str, object] = {}


def plain_forward(family: str, ids: torch.Tensor):
    """The HF model's own forward (logits and hidden states), computed once per family."""
    if family not in _PLAIN:
        with torch.no_grad():
            _PLAIN[family] = build_family(family)(input_ids=ids, output_hidden_states=True)
    return _PLAIN[family]


def _swap_rows_0_1(latents: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    return latents.flip(0)  # the mask holds (0, P) and (1, P): each row gets the other's latent


def _swap_mask() -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, P] = mask[1, P] = True
    return mask


@pytest.mark.parametrize("backend_name", ["torch", "nnsight"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_sites_identity_and_swap(family, backend_name, ids):
    model = build_family(family)
    backend = get_backend(backend_name)
    plain = plain_forward(family, ids)
    inputs = {"input_ids": ids}

    sites = [backend.resolve(model, name) for name in SITE_NAMES]
    latents = backend.collect(model, inputs, sites)
    assert all(latents[str(s)].shape == (B, T, WIDTH) for s in sites)
    # layer0 is the residual stream after block 0, whatever the block returns (a tensor or a tuple).
    assert torch.equal(latents[str(sites[1])], plain.hidden_states[1])

    identity = [Edit(site, torch.ones(B, T, dtype=torch.bool), lambda x, which: x) for site in sites]
    with torch.no_grad():
        logits = backend.patch(model, inputs, identity)
    assert torch.equal(logits, plain.logits)
    assert [edit.fired for edit in identity] == [B * T] * len(sites)

    scale = float(plain.logits.std())
    for site in sites:
        edit = Edit(site, _swap_mask(), _swap_rows_0_1)
        with torch.no_grad():
            swapped = backend.patch(model, inputs, [edit])
        assert edit.fired == 2
        change = (swapped - plain.logits).abs()
        # Rows 0 and 1 change from position P on; earlier positions (causal) and row 2 do not.
        assert change[0, P].max() > 0.1 * scale and change[1, P].max() > 0.1 * scale, (site, change[:2, P].max())
        assert change[:, :P].max() <= 1e-6 * scale and change[2].max() <= 1e-6 * scale, site
    # After the last block only per-position maps remain: the rows' logits at P trade places.
    assert torch.allclose(swapped[0, P], plain.logits[1, P], rtol=0, atol=1e-6 * scale)
    assert torch.allclose(swapped[1, P], plain.logits[0, P], rtol=0, atol=1e-6 * scale)


def _convert(converter: str, family: str):
    from llm_mas.backends.tlens_backend import to_hooked_transformer, to_transformer_bridge

    model = build_family(family)
    if converter == "hooked":
        return to_hooked_transformer(model, tiny_tokenizer())
    return to_transformer_bridge(model, tiny_tokenizer())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("converter", ["hooked", "bridge"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_tlens(family, converter, ids):
    covered = TL_HOOKED if converter == "hooked" else TL_BRIDGE
    model_cls = FAMILIES[family][1]
    if family not in covered:
        with pytest.raises(ConfigError, match=model_cls):
            _convert(converter, family)
        return
    tl_model = _convert(converter, family)
    model = build_family(family)
    plain = plain_forward(family, ids)
    tol = TL_REL_TOL
    backend = get_backend("tlens")
    inputs = {"input_ids": ids}

    hooks = TorchHookBackend()
    hf_sites = [hooks.resolve(model, name) for name in SITE_NAMES]
    if family == "bloom":
        # transformer-lens's hook_embed is after BLOOM's embedding LayerNorm (HF's `embeddings` is before it)
        hf_sites[0] = hooks.resolve(model, "transformer.word_embeddings_layernorm")
    hf_latents = hooks.collect(model, inputs, hf_sites)
    reference = {name: hf_latents[str(site)] for name, site in zip(SITE_NAMES, hf_sites)}
    sites = [backend.resolve(tl_model, name) for name in SITE_NAMES]
    latents = backend.collect(tl_model, inputs, sites)
    for name, site in zip(SITE_NAMES, sites):
        assert _rel_err(latents[str(site)], reference[name]) <= tol, name
    identity = [Edit(site, torch.ones(B, T, dtype=torch.bool), lambda x, which: x) for site in sites]
    with torch.no_grad():
        logits = backend.patch(tl_model, inputs, identity)
    assert [edit.fired for edit in identity] == [B * T] * len(sites)
    assert _rel_err(logits, plain.logits) <= tol

    edit = Edit(sites[-1], _swap_mask(), _swap_rows_0_1)
    with torch.no_grad():
        swapped = backend.patch(tl_model, inputs, [edit])
    assert edit.fired == 2
    assert _rel_err(swapped[0, P], plain.logits[1, P]) <= tol and _rel_err(swapped[1, P], plain.logits[0, P]) <= tol
    assert _rel_err(swapped[2], plain.logits[2]) <= tol


def test_block_probe_keeps_random_state_and_model_state():
    """Finding where a block's hidden state sits runs the model once: no trace of it may remain."""
    import transformers

    from llm_mas.sites import llm_site_aliases

    config_cls, model_cls, values = FAMILIES["gptj"]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, resid_pdrop=0.5, embd_pdrop=0.5, **values)
    model = getattr(transformers, model_cls)(config).train()  # dropout on: a forward would draw random numbers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    aliases = llm_site_aliases(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert aliases["layer1"] == "transformer.h.1:output[0]" and aliases["embeddings"] == "transformer.wte"


def test_explicit_tuple_site_still_needs_an_index():
    """Only the layer aliases address element 0 by themselves; a module path given by hand names the output."""
    from llm_mas.errors import SiteError

    model = build_family("falcon")
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(SiteError, match=r"transformer\.h\.0:output\[0\]"):
        TorchHookBackend().patch(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)},
                                 [Edit("transformer.h.0:output@all", mask, lambda x, which: x)])


def test_tlens_converters_offline_without_hub_tokenizer(ids):
    from llm_mas.backends.tlens_backend import to_hooked_transformer, to_transformer_bridge

    model = build_family("llama")
    hooked = to_hooked_transformer(model)  # no tokenizer: none is fetched, the model has none
    assert hooked.tokenizer is None
    assert _rel_err(hooked(ids), plain_forward("llama", ids).logits) <= TL_REL_TOL
    with pytest.raises(ConfigError, match="tokenizer"):
        to_transformer_bridge(model, None)


def test_converted_model_that_computes_something_else_is_refused():
    from llm_mas.backends.tlens_backend import check_agrees_with_hf, to_hooked_transformer

    model = build_family("qwen2")
    hooked = to_hooked_transformer(model)
    assert check_agrees_with_hf(model, hooked, "HookedTransformer") <= TL_REL_TOL
    with torch.no_grad():
        hooked.blocks[1].attn.W_Q.mul_(1.5)  # a conversion that got one attention weight wrong
    with pytest.raises(ConfigError, match="Qwen2ForCausalLM does not compute what the HF model computes"):
        check_agrees_with_hf(model, hooked, "HookedTransformer")
    assert not model.training  # the check leaves the HF model's mode alone
