"""LayerResume: a step at layer l runs layers l+1.. from cached layer-l activations and gives the full patched
run's logits and gradients (TorchHookBackend.patch, which runs every layer, is the reference)."""

from __future__ import annotations

import pytest
import torch
from llm_fixtures import load_tiny

from llm_mas.alignments import make_alignment
from llm_mas.backends import Edit, TorchHookBackend
from llm_mas.backends.resume import LayerResume
from llm_mas.errors import InterventionError
from llm_mas.interventions import intervene
from llm_mas.models.task_models import build_task_model
from llm_mas.sites import Site


def _compare(model, site: str, layer: int, vocab: int, d: int):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, vocab, (4, 10), generator=g)
    source = torch.randint(3, vocab, (4, 10), generator=g)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[torch.arange(4), torch.tensor([2, 5, 9, 0])] = True
    mask[1, 7] = True
    backend = TorchHookBackend()
    site = Site.parse(site)
    src = next(iter(backend.collect(model, {"input_ids": source}, [site]).values()))[mask]   # (entries, d)
    alignment = make_alignment("orthogonal", d, k=8, seed=1)
    block = slice(0, 8)
    resume = LayerResume(model, layer)
    cached = resume.collect(base)                                                    # (B, T, d), once

    def grads(run):
        alignment.zero_grad(set_to_none=True)
        amap = alignment.materialize()
        logits = run(amap)
        logits[:, -1].logsumexp(-1).sum().backward()
        return logits.detach(), [p.grad.clone() for p in alignment.parameters() if p.requires_grad]

    def full(amap):
        edit = Edit(site, mask, lambda h, which: intervene(amap, amap, h, src[which], block))
        return backend.patch(model, {"input_ids": base}, [edit])

    def resumed(amap):
        h = cached.clone()
        h[mask] = intervene(amap, amap, cached[mask], src, block)
        return resume(h, base)

    (l_full, g_full), (l_res, g_res) = grads(full), grads(resumed)
    torch.testing.assert_close(l_res, l_full, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_res, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert float(g_full[0].abs().max()) > 0
    last = resume(cached, base, keep_last=1)
    torch.testing.assert_close(last[:, -1], model_logits(model, base)[:, -1], atol=1e-5, rtol=1e-5)


def model_logits(model, ids):
    out = model(input_ids=ids) if not hasattr(model, "blocks") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_resume_hf_lm_matches_full_patched_run():
    model, _ = load_tiny()
    model.eval().requires_grad_(False)
    _compare(model, "layer0", 0, model.config.vocab_size, model.config.hidden_size)


def test_resume_task_transformer_matches_full_patched_run():
    model = build_task_model("transformer", "multiobject", 12, seed=0, n_layers=3).eval().requires_grad_(False)
    _compare(model, "hook_layers.1", 1, 12, 128)


def test_resume_refuses_what_it_cannot_resume():
    model, _ = load_tiny()
    with pytest.raises(InterventionError, match="outside"):
        LayerResume(model, 5)
    with pytest.raises(InterventionError, match="decoder layer list"):
        LayerResume(torch.nn.Linear(3, 3), 0)
