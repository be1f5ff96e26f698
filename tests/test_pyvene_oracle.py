"""pyvene 0.1.8 as an external oracle for DAS on a Hugging Face LM.

The same rotation, the same rows, the same positions (several per row, different in base and source):
llm_mas (alignments + interchange.intervene through the torch-hooks and the nnsight backends) and pyvene
(`RotatedSpaceIntervention`, `LowRankRotatedSpaceIntervention`) give the same intervened logits and the
same gradient of the trainable rotation. pyvene needs ``keep_last_dim=True`` to apply one d×d rotation per
position (otherwise it flattens the positions of a row into one (n_positions·d) vector). Its low-rank form,
``base + (R_k(source) − R_k(base)) R_kᵀ``, keeps the complement of span(R_k): that is our `gram_schmidt`
alignment, not `low_rank` (which discards the complement).
"""

from __future__ import annotations

import pytest
import torch
from llm_fixtures import load_tiny

pv = pytest.importorskip("pyvene", reason="pyvene is not installed (pip install pyvene==0.1.8: the dev extra)")

from torch.nn.utils import parametrize  # noqa: E402

from llm_mas.alignments import make_alignment  # noqa: E402
from llm_mas.backends import Edit, get_backend  # noqa: E402
from llm_mas.interventions import intervene  # noqa: E402
from llm_mas.sites import Site  # noqa: E402

B, T, K, LAYER = 4, 12, 16, 1
BASE_POSITIONS = [[1, 5, 9], [2, 3, 11], [0, 7, 8], [4, 6, 10]]  # sorted in each row (row-major entry order)
SOURCE_POSITIONS = [[4, 6, 2], [0, 8, 11], [5, 5, 1], [9, 3, 7]]  # paired element by element with the base


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 500, (B, T), generator=g)
    source = torch.randint(3, 500, (B, T), generator=g)
    weights = torch.randn(B, T, 512, generator=g)  # a loss that reaches every logit
    return base, source, weights


def ours(backend_name: str, alignment, base, source, weights):
    """(logits, loss) of DAS through llm_mas: one alignment for both sides (DAS on one model)."""
    model, _ = load_tiny(0)
    backend = get_backend(backend_name)
    site = Site.parse(f"layer{LAYER}")
    with torch.no_grad():
        latents = get_backend("torch").collect(model, {"input_ids": source}, [site])
    source_latents = next(iter(latents.values()))  # (B, T, d)
    rows = torch.arange(B)[:, None].expand(B, 3)
    source_entries = source_latents[rows, torch.tensor(SOURCE_POSITIONS)].reshape(B * 3, -1)  # (B·3, d) row-major
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[rows, torch.tensor(BASE_POSITIONS)] = True
    amap = alignment.materialize()
    amap.weight.retain_grad()

    def edit_fn(h, which):  # h (n, d): the base's latents at the masked entries
        return intervene(amap, amap, h, source_entries[which], slice(0, K))

    logits = backend.patch(model, {"input_ids": base}, [Edit(site=site, mask=mask, fn=edit_fn)])  # (B, T, V)
    loss = (logits * weights).sum()
    loss.backward()
    return logits.detach(), amap.weight.grad


def pyvene_run(intervention, base, source, weights):
    model, _ = load_tiny(0)
    config = pv.IntervenableConfig(representations=[pv.RepresentationConfig(
        layer=LAYER, component="block_output", unit="pos", max_number_of_units=3, intervention=intervention)])
    intervenable = pv.IntervenableModel(config, model)
    # the rotation evaluated once and shared by base and source (as our materialize())
    with parametrize.cached():
        weight = intervention.rotate_layer.weight
        weight.retain_grad()
        _, out = intervenable({"input_ids": base}, [{"input_ids": source}],
                              unit_locations={"sources->base": ([SOURCE_POSITIONS], [BASE_POSITIONS])})
        loss = (out.logits * weights).sum()
        loss.backward()
    return out.logits.detach(), weight.grad


@pytest.mark.parametrize("backend_name", ["torch", "nnsight"])
def test_full_rotation_matches_pyvene(setup, backend_name):
    base, source, weights = setup
    d = 64
    alignment = make_alignment("orthogonal", d, k=K, seed=3)  # matrix exponential, as torch's default for d×d
    intervention = pv.RotatedSpaceIntervention(embed_dim=d, keep_last_dim=True)
    intervention.set_interchange_dim(K)
    ours_param = alignment.linear.parametrizations.weight
    theirs_param = intervention.rotate_layer.parametrizations.weight
    with torch.no_grad():  # the same trivialisation: original (skew generator) and base
        theirs_param.original.copy_(ours_param.original)
        theirs_param[0].base.copy_(ours_param[0].base)
    assert torch.equal(alignment.linear.weight, intervention.rotate_layer.weight)

    logits, _ = ours(backend_name, alignment, base, source, weights)
    pv_logits, _ = pyvene_run(intervention, base, source, weights)
    plain = load_tiny(0)[0](base).logits
    assert (logits - plain).abs().max() > 1e-2  # the intervention does something
    assert (logits - pv_logits).abs().max() <= 1e-5
    # The trainable parameter (the generator behind the matrix exponential). The gradients with respect to
    # the d×d matrix itself differ: pyvene rotates all d coordinates and back (Q Qᵀ on the complement),
    # we touch only the block's k columns; both are the same function on orthogonal matrices, so they
    # agree once projected through the parametrisation.
    assert ours_param.original.grad is not None
    torch.testing.assert_close(ours_param.original.grad, theirs_param.original.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "nnsight"])
def test_low_rank_pyvene_equals_gram_schmidt(setup, backend_name):
    base, source, weights = setup
    d = 64
    alignment = make_alignment("gram_schmidt", d, k=K, seed=5)
    intervention = pv.LowRankRotatedSpaceIntervention(embed_dim=d, low_rank_dimension=K, keep_last_dim=True)
    with torch.no_grad():  # pyvene's orthogonal parametrisation set to our orthonormal U (right inverse)
        intervention.rotate_layer.weight = alignment.materialize().weight.detach().clone()
    torch.testing.assert_close(intervention.rotate_layer.weight, alignment.materialize().weight, rtol=0, atol=1e-6)

    logits, u_grad = ours(backend_name, alignment, base, source, weights)
    pv_logits, pv_u_grad = pyvene_run(intervention, base, source, weights)
    assert (logits - pv_logits).abs().max() <= 1e-5
    torch.testing.assert_close(u_grad, pv_u_grad, rtol=1e-4, atol=1e-5)
    # our low_rank discards the complement: different logits on the same U
    low_rank = make_alignment("low_rank", d, k=K, seed=5)
    low_logits, _ = ours(backend_name, low_rank, base, source, weights)
    assert (low_logits - pv_logits).abs().max() > 1e-3
