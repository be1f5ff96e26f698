"""The nnsight and TransformerLens backends give the plain-torch backend's numbers on the tiny Qwen2.

The key check: one interchange (an orthogonal rotation with trainable parameters, k of d dims swapped, at the
embeddings and at layer 1, at per-example positions) gives the same logits and the same gradients w.r.t. the
rotation parameters through TorchHookBackend, NNsightBackend and TLensBackend.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from llm_fixtures import load_tiny, tiny_qwen2_dir

from llm_mas.backends import Edit, TorchHookBackend, get_backend
from llm_mas.errors import InterventionError, SiteError
from llm_mas.sites import Site, site_aliases

pytestmark = pytest.mark.llm

B, T, D, K = 4, 12, 64, 24
SITES = ["embeddings", "layer1"]


@pytest.fixture(scope="module")
def hf_model():
    model, tokenizer = load_tiny()
    return model, tokenizer


@pytest.fixture(scope="module")
def hooked(hf_model):
    from llm_mas.backends.tlens_backend import to_hooked_transformer

    model, tokenizer = hf_model
    return to_hooked_transformer(model, tokenizer)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    source_ids = torch.randint(0, 512, (B, T), generator=generator)
    target_ids = torch.randint(0, 512, (B, T), generator=generator)
    labels = torch.randint(0, 512, (B, T), generator=generator)
    # Per-example positions, two per row; the source reads at other positions than the target writes.
    target_mask = torch.zeros(B, T, dtype=torch.bool)
    source_mask = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):
        target_mask[row, [row + 1, row + 6]] = True
        source_mask[row, [2 * row, T - 1 - row]] = True
    return source_ids, target_ids, labels, source_mask, target_mask


def _rotation(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(D, D, bias=False))


def _interchange_step(backend, model, batch, rotation):
    """Collect source latents, patch the target with the rotated interchange at both sites, backprop a CE loss.

    Returns (logits (B, T, V), grad of the rotation parameter (D, D), source latents {site: (B, T, D)}).
    """
    source_ids, target_ids, labels, source_mask, target_mask = batch
    sites = [backend.resolve(model, s) for s in SITES]
    source_latents = backend.collect(model, {"input_ids": source_ids}, sites)
    weight = rotation.weight  # (D, D) orthogonal, evaluated once per step

    def make_fn(source_entries):  # source_entries (n, D), row-major over source_mask
        def fn(latents, which):  # latents (n, D), which (n,)
            target_z = latents @ weight  # (n, D)
            source_z = source_entries[which] @ weight  # (n, D)
            mixed = torch.cat([source_z[:, :K], target_z[:, K:]], dim=1)  # first K coordinates swapped
            return mixed @ weight.T

        return fn

    edits = [Edit(site, target_mask, make_fn(source_latents[str(site)][source_mask])) for site in sites]
    logits = backend.patch(model, {"input_ids": target_ids}, edits)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    rotation.zero_grad()
    loss.backward()
    assert all(edit.fired == int(target_mask.sum()) for edit in edits)
    grad = rotation.parametrizations.weight.original.grad.clone()
    return logits.detach(), grad, {s: source_latents[str(site)] for s, site in zip(SITES, sites, strict=True)}


def test_interchange_parity_torch_nnsight_tlens(hf_model, hooked, batch):
    model, _ = hf_model
    results = {}
    for name, target in [("torch", model), ("nnsight", model), ("tlens", hooked)]:
        backend = TorchHookBackend() if name == "torch" else get_backend(name)
        results[name] = _interchange_step(backend, target, batch, _rotation())
    ref_logits, ref_grad, ref_latents = results["torch"]
    assert ref_grad.abs().max() > 1e-4  # the gradient is not trivially zero
    unpatched = model(input_ids=batch[1]).logits
    assert (unpatched - ref_logits).abs().max() > 1e-3  # the interchange changes the output
    for name in ("nnsight", "tlens"):
        logits, grad, latents = results[name]
        assert (logits - ref_logits).abs().max() <= 1e-4, name
        assert (grad - ref_grad).abs().max() <= 1e-4, name
        for site in SITES:
            assert latents[site].shape == (B, T, D)
            assert (latents[site] - ref_latents[site]).abs().max() <= 1e-5, (name, site)
    # nnsight runs the very same modules: bit-identical.
    assert torch.equal(results["nnsight"][0], ref_logits) and torch.equal(results["nnsight"][1], ref_grad)


def test_transformer_bridge_parity(hf_model, batch):
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = hf_model
    # The bridge switches the HF model it wraps to eager attention: give it a copy.
    bridge = TransformerBridge.boot_transformers(str(tiny_qwen2_dir()), hf_model=copy.deepcopy(model),
                                                 tokenizer=tokenizer)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    assert model.config._attn_implementation == "sdpa"
    ref_logits, ref_grad, _ = _interchange_step(TorchHookBackend(), model, batch, _rotation())
    logits, grad, _ = _interchange_step(get_backend("tlens"), bridge, batch, _rotation())
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert (grad - ref_grad).abs().max() <= 1e-4


def test_to_hooked_transformer_logits_match(hf_model, hooked):
    model, _ = hf_model
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    assert (hooked(ids) - model(input_ids=ids).logits).abs().max() <= 1e-5
    assert all(not p.requires_grad for p in hooked.parameters())
    assert site_aliases(hooked)["layer1"] == "blocks.1.hook_resid_post"


def test_nnsight_collect_input_and_nested_sites(hf_model):
    model, _ = hf_model
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(2))
    sites = ["model.layers.1.mlp", "layer0", "model.layers.1:input", "model.layers.0.self_attn.o_proj:input"]
    got = get_backend("nnsight").collect(model, {"input_ids": ids}, sites)
    expected = TorchHookBackend().collect(model, {"input_ids": ids}, sites)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # The input of layer 1 is the output of layer 0.
    assert torch.equal(got["model.layers.1:input@given"], got["model.layers.0:output@given"])


def test_nnsight_patch_at_input_and_output_of_one_layer(hf_model):
    model, _ = hf_model
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = True

    def edits():
        return [Edit(Site.parse("layer1"), mask, lambda x, w: x * 2.0),
                Edit(Site.parse("model.layers.1:input"), mask, lambda x, w: x - 1.0)]

    got = get_backend("nnsight").patch(model, {"input_ids": ids}, edits())  # given out of forward order
    expected = TorchHookBackend().patch(model, {"input_ids": ids}, edits())
    assert torch.equal(got, expected)


def test_nnsight_patch_at_site_that_never_fires_raises(hf_model):
    model, _ = hf_model
    idle = copy.deepcopy(model)
    idle.model.unused = torch.nn.Identity()  # a module the forward pass never calls
    ids = torch.randint(0, 512, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    backend = get_backend("nnsight")
    with pytest.raises(InterventionError, match="never fired"):
        backend.patch(idle, {"input_ids": ids}, [Edit(Site.parse("model.unused"), mask, lambda x, w: x + 1)])
    with pytest.raises(InterventionError, match="never"):
        backend.collect(idle, {"input_ids": ids}, ["model.unused"])
    # The model still works afterwards.
    backend.patch(idle, {"input_ids": ids}, [Edit(Site.parse("layer0"), mask, lambda x, w: x + 1)])


def test_nnsight_mask_wider_than_sequence_raises(hf_model):
    model, _ = hf_model
    ids = torch.randint(0, 512, (2, 5))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 6] = True
    with pytest.raises(InterventionError, match="mask"):
        get_backend("nnsight").patch(model, {"input_ids": ids}, [Edit(Site.parse("layer0"), mask, lambda x, w: x)])


def test_wrong_site_lists_closest_names(hf_model, hooked):
    model, _ = hf_model
    with pytest.raises(SiteError, match="closest valid names: model.layers.1"):
        get_backend("nnsight").resolve(model, "model.layrs.1")
    with pytest.raises(SiteError, match="blocks.1.hook_resid_post"):
        get_backend("tlens").resolve(hooked, "blocks.1.hook_resid_pots")
    with pytest.raises(SiteError, match="tuple index"):
        get_backend("tlens").resolve(hooked, "layer1[0]")


def test_nnsight_wrapper_cached_and_copy_safe(hf_model):
    model, _ = hf_model
    backend = get_backend("nnsight")
    assert backend.wrapper(model) is backend.wrapper(model)
    assert not [key for key in vars(model) if "llm_mas" in key]  # the wrapper is the backend's, not the model's
    clone = copy.deepcopy(model)
    assert backend.wrapper(clone)._module is clone
    ids = torch.randint(0, 512, (1, 6))
    out = backend.collect(clone, {"input_ids": ids}, ["layer1"])
    assert torch.equal(out["model.layers.1:output@given"],
                       TorchHookBackend().collect(model, {"input_ids": ids}, ["layer1"])["model.layers.1:output@given"])


def test_nnsight_on_peft_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = load_tiny()
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    model, _ = load_tiny(adapter=tmp_path / "adapter")
    ids = torch.randint(0, 512, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2] = True

    def edits():
        return [Edit(Site.parse("embeddings"), mask, lambda x, w: x.flip(-1))]

    got = get_backend("nnsight").patch(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, edits())
    expected = TorchHookBackend().patch(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, edits())
    assert torch.equal(got, expected)


class _DeclaredOutOfOrder(torch.nn.Module):
    """Declares `late` before `early` but runs `early` first (static order is wrong for nnsight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.late = torch.nn.Linear(8, 8)
        self.early = torch.nn.Linear(8, 8)

    def forward(self, x):  # x (B, T, 8)
        return self.late(torch.tanh(self.early(x)))


def test_nnsight_learns_the_executed_module_order():
    model = _DeclaredOutOfOrder().requires_grad_(False)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True

    def edits():
        return [Edit(Site.parse("late"), mask, lambda h, w: h * 3.0), Edit(Site.parse("early"), mask, lambda h, w: -h)]

    backend = get_backend("nnsight")
    expected = TorchHookBackend().patch(model, x, edits())
    assert torch.equal(backend.patch(model, x, edits()), expected)
    assert model in backend.observed_orders  # the static order failed and was replaced
    assert not [key for key in vars(model) if "llm_mas" in key]  # ... in the backend's table, not on the model
    assert torch.equal(backend.patch(model, x, edits()), expected)  # the learned order is kept
    got = backend.collect(model, x, ["late", "early"])
    assert torch.equal(got["late:output@given"], model(x))


# --------------------------------------------------------------- one site resolution, however the model was loaded
ALIAS_SITES = ["embeddings", "layer0", "layer1", "layer1:input", "embeddings@all"]


def test_aliases_resolve_alike_for_a_plain_from_pretrained_model():
    """A model loaded by plain ``AutoModelForCausalLM.from_pretrained`` (no alias table registered) resolves the
    same site strings to the same latents and the same patched logits under torch, nnsight and TransformerLens."""
    from transformers import AutoModelForCausalLM

    from llm_mas.backends.tlens_backend import to_hooked_transformer
    from llm_mas.sites import registered_site_aliases

    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir()).eval().requires_grad_(False)
    loaded, tokenizer = load_tiny()
    assert registered_site_aliases(plain) is None and registered_site_aliases(loaded) is not None
    assert site_aliases(plain) == site_aliases(loaded)
    # A converted model whose alias table was not registered (a copy) derives the same TransformerLens aliases.
    hooked = copy.deepcopy(to_hooked_transformer(plain, tokenizer))
    assert registered_site_aliases(hooked) is None and site_aliases(hooked)["embeddings"] == "hook_embed"
    backends = {"torch": (TorchHookBackend(), plain), "nnsight": (get_backend("nnsight"), plain),
                "loaded": (TorchHookBackend(), loaded), "tlens": (get_backend("tlens"), hooked)}
    for name in ("torch", "nnsight", "loaded"):
        backend, model = backends[name]
        assert [str(backend.resolve(model, s)) for s in ALIAS_SITES] == [
            "model.embed_tokens:output@given", "model.layers.0:output@given", "model.layers.1:output@given",
            "model.layers.1:input@given", "model.embed_tokens:output@all"], name

    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (3, 8), generator=generator)
    other = torch.randint(0, 512, (3, 8), generator=generator)
    # Oracle latents from HF itself: the embedding table and the hidden states after each decoder layer.
    hidden = plain(input_ids=ids, output_hidden_states=True).hidden_states
    oracle = {"embeddings": plain.model.embed_tokens.weight[ids], "layer0": hidden[1], "layer1:input": hidden[1]}
    collected = {name: backend.collect(model, {"input_ids": ids}, ["embeddings", "layer0", "layer1"])
                 for name, (backend, model) in backends.items() if name != "tlens"}
    collected["tlens"] = backends["tlens"][0].collect(hooked, {"input_ids": ids}, ["embeddings", "layer0", "layer1"])
    keys = {name: list(values) for name, values in collected.items()}
    assert keys["torch"] == keys["nnsight"] == keys["loaded"] == [
        "model.embed_tokens:output@given", "model.layers.0:output@given", "model.layers.1:output@given"]
    assert keys["tlens"] == ["hook_embed:output@given", "blocks.0.hook_resid_post:output@given",
                             "blocks.1.hook_resid_post:output@given"]
    ref_layer1 = list(collected["torch"].values())[2]
    for name, values in collected.items():
        embeddings, layer0, layer1 = values.values()
        tolerance = 1e-5 if name == "tlens" else 0  # TransformerLens runs its own (converted) modules
        assert torch.equal(embeddings, oracle["embeddings"]), name
        assert (layer0 - oracle["layer0"]).abs().max() <= tolerance, name
        assert (layer1 - ref_layer1).abs().max() <= tolerance, name
    assert torch.equal(backends["torch"][0].collect(plain, {"input_ids": ids}, ["layer1:input"])
                       ["model.layers.1:input@given"], oracle["layer1:input"])

    # Patched logits: replacing every embedding by another sequence's gives that sequence's logits (a hand-made
    # counterfactual), and a scaled layer-0 output at two positions gives the same logits under every backend.
    everywhere = torch.ones(3, 8, dtype=torch.bool)
    some = torch.zeros(3, 8, dtype=torch.bool)
    some[:, [2, 5]] = True
    other_embeddings = plain.model.embed_tokens.weight[other][everywhere]  # (24, d), row-major like the mask
    expected_swap = plain(input_ids=other).logits
    patched = {}
    for name, (backend, model) in backends.items():
        swap = backend.patch(model, {"input_ids": ids}, [Edit(Site.parse("embeddings"), everywhere,
                                                              lambda x, which: other_embeddings[which])])
        assert (swap - expected_swap).abs().max() <= (1e-5 if name == "tlens" else 0), name
        patched[name] = backend.patch(model, {"input_ids": ids},
                                      [Edit(Site.parse("layer0"), some, lambda x, which: 3.0 * x)])
    assert (patched["torch"] - plain(input_ids=ids).logits).abs().max() > 1e-2  # the edit changes the output
    assert torch.equal(patched["nnsight"], patched["torch"]) and torch.equal(patched["loaded"], patched["torch"])
    assert (patched["tlens"] - patched["torch"]).abs().max() <= 1e-4


def test_site_aliases_derived_only_for_hf_and_tlens_models():
    """A plain torch module with no alias table and no ``site_aliases()`` gets no aliases (a module literally
    called ``layer0`` keeps its name), under every torch-module backend."""
    model = torch.nn.Sequential()
    model.add_module("layer0", torch.nn.Linear(4, 4))
    model.add_module("layers", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    assert site_aliases(model) == {}
    for backend in (TorchHookBackend(), get_backend("nnsight")):
        assert str(backend.resolve(model, "layer0")) == "layer0:output@given"
