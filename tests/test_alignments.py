"""Alignment kinds: registry, construction errors, orthogonality, exact inverses, seeding, gradients,
one evaluation of the parametrisation per materialize()."""

from __future__ import annotations

import pytest
import torch

from llm_mas.alignments import (
    ALIGNMENTS,
    Alignment,
    AlignmentMap,
    alignment_from_spec,
    gram_schmidt,
    make_alignment,
    orthonormality_error,
    orthonormalize,
    register_alignment,
)
from llm_mas.errors import ConfigError

KINDS = ["orthogonal", "low_rank", "gram_schmidt", "linear", "identity"]
SQUARE = ["orthogonal", "linear", "identity"]
F64 = torch.float64


def _stats(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g, dtype=F64) * 3, torch.rand(d, generator=g, dtype=F64) * 2 + 0.3


def _perturb(alignment: Alignment, scale: float = 0.3, seed: int = 0) -> None:
    """Move every parameter away from its initial value (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in alignment.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# --- registry and construction ------------------------------------------------------------------


def test_registry_has_every_kind():
    assert set(KINDS) <= set(ALIGNMENTS)
    for kind in KINDS:
        assert ALIGNMENTS[kind].kind == kind


def test_registry_refuses_duplicate_name():
    with pytest.raises(ConfigError, match="'orthogonal' is already registered"):
        @register_alignment("orthogonal")
        class Another(Alignment):
            pass
    assert ALIGNMENTS["orthogonal"].__name__ == "OrthogonalAlignment"


def test_unknown_kind_lists_choices():
    with pytest.raises(ConfigError) as info:
        make_alignment("orthgonal", 8)
    message = str(info.value)
    assert "'orthgonal'" in message
    for kind in KINDS:
        assert kind in message


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "low_rank", "d": 8}, "needs k"),
    ({"kind": "gram_schmidt", "d": 8}, "needs k"),
    ({"kind": "orthogonal", "d": 8, "k": 9}, r"k must be an int in \[1, d=8\], got 9"),
    ({"kind": "orthogonal", "d": 0}, "positive int, got 0"),
    ({"kind": "orthogonal", "d": 8, "rank": 3}, "unknown option.*'rank'.*valid options: orthogonal_map"),
    ({"kind": "orthogonal", "d": 8, "orthogonal_map": "svd"}, "unknown orthogonal_map 'svd'"),
    ({"kind": "gram_schmidt", "d": 8, "k": 2, "method": "mgs"}, "valid choices: cgs2, qr"),
    ({"kind": "identity", "d": 4, "standardize": (torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]))},
     "1 entries <= 0.*clamp_min"),
    ({"kind": "identity", "d": 4, "standardize": (torch.zeros(3), torch.ones(3))}, r"shape \(3,\), expected \(4,\)"),
])
def test_construction_errors_name_value_and_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_alignment(**kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_widths(kind):
    alignment = make_alignment(kind, 12, k=5, seed=0)
    expected = 5 if kind in ("low_rank", "gram_schmidt") else 12
    assert (alignment.d, alignment.dim_out) == (12, expected)
    amap = alignment.materialize()
    assert isinstance(amap, AlignmentMap)
    assert amap.forward(torch.randn(3, 2, 12)).shape == (3, 2, expected)  # any leading dims
    assert amap.inverse(torch.randn(3, expected)).shape == (3, 12)
    assert amap.keeps_complement == (kind != "low_rank")


def test_wrong_latent_width_is_named():
    amap = make_alignment("orthogonal", 8, seed=0).materialize()
    with pytest.raises(ValueError, match="last dimension 7, expected 8"):
        amap.forward(torch.randn(2, 7))


# --- seeding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["orthogonal", "low_rank", "gram_schmidt", "linear"])
def test_seed_reproducible_and_global_rng_untouched(kind):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = make_alignment(kind, 10, k=4, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # building with a seed consumed no global randomness
    second = make_alignment(kind, 10, k=4, seed=7)
    other = make_alignment(kind, 10, k=4, seed=8)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    w1, w2 = first.materialize().weight, other.materialize().weight
    assert not torch.allclose(w1, w2)


def test_linear_starts_as_orthogonal_of_same_seed():
    q = make_alignment("orthogonal", 9, seed=3).materialize().weight
    w = make_alignment("linear", 9, seed=3).materialize().weight
    torch.testing.assert_close(w, q, atol=1e-6, rtol=0)


# --- orthogonality and inverses -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["orthogonal", "low_rank", "gram_schmidt"])
@pytest.mark.parametrize("d", [16, 64])
def test_orthonormal_after_parameter_changes(kind, d):
    alignment = make_alignment(kind, d, k=d // 4, seed=0)
    _perturb(alignment, scale=0.5)
    w = alignment.materialize().weight  # (d, dim_out)
    eye = torch.eye(w.shape[1])
    torch.testing.assert_close(w.mT @ w, eye, atol=1e-5, rtol=0)
    if kind == "orthogonal":
        torch.testing.assert_close(w @ w.mT, torch.eye(d), atol=1e-5, rtol=0)
    assert orthonormality_error(alignment.materialize()) < 1e-5


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_low_rank_maps_start_equal_and_stay_orthonormal(orthogonal_map):
    """Every map starts at the seed's columns; perturbing every entry of the raw parameter (as weight
    decay would) keeps the columns orthonormal — torch's Householder map would zero columns here."""
    reference = make_alignment("low_rank", 12, k=5, seed=3).materialize().weight
    alignment = make_alignment("low_rank", 12, k=5, seed=3, orthogonal_map=orthogonal_map)
    torch.testing.assert_close(alignment.materialize().weight, reference, atol=1e-6, rtol=0)
    with torch.no_grad():
        for p in alignment.parameters():
            p.mul_(0.9).add_(0.1)
    u = alignment.materialize().weight
    torch.testing.assert_close(u.mT @ u, torch.eye(5), atol=1e-5, rtol=0)
    assert not torch.allclose(u, reference, atol=1e-3)


def test_orthogonal_after_adam_training():
    """QQᵀ = I after optimisation (the constraint holds by construction, not by initialisation)."""
    torch.manual_seed(0)
    alignment = make_alignment("orthogonal", 16, seed=0)
    target = torch.randn(16, 16)
    optimizer = torch.optim.Adam(alignment.parameters(), lr=1e-1)
    for _ in range(20):
        loss = ((alignment.materialize().weight - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    q = alignment.materialize().weight
    torch.testing.assert_close(q @ q.mT, torch.eye(16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", SQUARE)
@pytest.mark.parametrize("standardized", [False, True])
def test_square_kinds_invert_exactly_after_perturbation(kind, standardized):
    d = 24
    # standardised latents reach |x| ~ 30, beyond float32's 1e-5 budget: check those in float64
    standardize, dtype = (_stats(d), F64) if standardized else (None, torch.float32)
    alignment = make_alignment(kind, d, seed=1, standardize=standardize, dtype=dtype)
    _perturb(alignment, scale=0.3)  # linear: log-scales and bias move too -> not orthogonal any more
    amap = alignment.materialize()
    h = torch.randn(50, d, dtype=dtype) * 2
    torch.testing.assert_close(amap.inverse(amap.forward(h)), h, atol=1e-5, rtol=1e-5)
    z = torch.randn(50, d, dtype=dtype)
    torch.testing.assert_close(amap.forward(amap.inverse(z)), z, atol=1e-5, rtol=1e-5)


def test_linear_is_not_orthogonal_after_training_moves_scales():
    alignment = make_alignment("linear", 12, seed=0)
    _perturb(alignment, scale=0.3)
    assert orthonormality_error(alignment.materialize()) > 1e-2  # a genuinely non-orthogonal map
    assert orthonormality_error(make_alignment("linear", 12, seed=0).materialize()) < 1e-5


@pytest.mark.parametrize("kind", ["low_rank", "gram_schmidt"])
def test_k_column_kinds_project(kind):
    d, k = 20, 6
    amap = make_alignment(kind, d, k=k, seed=2).materialize()
    z = torch.randn(8, k)
    torch.testing.assert_close(amap.forward(amap.inverse(z)), z, atol=1e-5, rtol=0)  # coordinates survive
    h = torch.randn(8, d)
    projected = amap.inverse(amap.forward(h))  # h U Uᵀ
    torch.testing.assert_close(projected + amap.complement(h), h, atol=1e-6, rtol=0)
    torch.testing.assert_close(amap.forward(amap.complement(h)), torch.zeros(8, k), atol=1e-5, rtol=0)
    assert amap.complement(h).norm() > 1  # the complement is real: low-rank loses it


@pytest.mark.parametrize("kind", KINDS)
def test_standardize_wraps_any_kind(kind):
    d = 10
    mean, std = _stats(d, seed=3)
    plain = make_alignment(kind, d, k=4, seed=5, dtype=F64)
    wrapped = make_alignment(kind, d, k=4, seed=5, dtype=F64, standardize=(mean, std))
    assert wrapped.kind == kind and wrapped.dim_out == plain.dim_out
    assert {n for n, _ in wrapped.named_buffers()} >= {"mean", "std"}
    assert not any(p is wrapped.mean or p is wrapped.std for p in wrapped.parameters())  # statistics are frozen
    h = torch.randn(7, d, dtype=F64)
    torch.testing.assert_close(wrapped.materialize().forward(h), plain.materialize().forward((h - mean) / std))
    z = torch.randn(7, plain.dim_out, dtype=F64)
    torch.testing.assert_close(wrapped.materialize().inverse(z), plain.materialize().inverse(z) * std + mean)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_is_forward_columns(kind):
    amap = make_alignment(kind, 16, k=8, seed=0, standardize=_stats(16)).materialize()
    h = torch.randn(5, 16)
    for block in (slice(0, 3), slice(3, 8), slice(8, 8)):
        torch.testing.assert_close(amap.encode(h, block), amap.forward(h)[..., block], atol=1e-5, rtol=1e-5)


# --- Gram–Schmidt -----------------------------------------------------------------------------------


def test_qr_orthonormalization_is_gram_schmidt():
    vectors = torch.randn(6, 15, dtype=F64)
    via_qr = orthonormalize(vectors, "qr")
    via_gs = gram_schmidt(vectors)
    torch.testing.assert_close(via_qr, via_gs, atol=1e-10, rtol=0)
    # row i lies in span(vectors[:i+1]) and is orthogonal to vectors[:i]
    torch.testing.assert_close(torch.tril(via_qr @ vectors.mT, -1).mT, torch.zeros(6, 6, dtype=F64),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["qr", "cgs2"])
def test_gram_schmidt_stable_on_nearly_dependent_vectors(method):
    """One classical pass would lose orthogonality here; both methods must keep it (float32)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    vectors = base + 1e-3 * torch.randn(8, 64, generator=g)  # condition number ~1e3-1e4
    rows = orthonormalize(vectors, method)
    torch.testing.assert_close(rows @ rows.mT, torch.eye(8), atol=1e-5, rtol=0)


def test_gram_schmidt_alignment_gradient_flows_through_orthonormalisation():
    alignment = make_alignment("gram_schmidt", 12, k=3, seed=0)
    h = torch.randn(4, 12)
    alignment.materialize().forward(h).pow(2).sum().backward()
    assert alignment.vectors.grad is not None and alignment.vectors.grad.abs().sum() > 0


# --- one evaluation per materialize -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected_calls"), [("orthogonal", 1), ("linear", 2)])
def test_materialize_evaluates_matrix_exp_once(monkeypatch, kind, expected_calls):
    alignment = make_alignment(kind, 16, seed=0)
    calls = []
    real = torch.matrix_exp

    def counting(a):
        calls.append(tuple(a.shape))
        return real(a)

    monkeypatch.setattr(torch, "matrix_exp", counting)
    amap = alignment.materialize()
    assert len(calls) == expected_calls  # linear: one for U, one for V
    h = torch.randn(4, 16)
    for _ in range(5):  # every use reuses the evaluated matrices
        amap.inverse(amap.forward(h))
        amap.encode(h, slice(0, 4))
        amap.decode_delta(torch.randn(4, 4), slice(0, 4))
    assert len(calls) == expected_calls
    alignment(h)  # the module call is the one-off convenience: it re-materialises
    assert len(calls) == 2 * expected_calls


# --- gradients ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["orthogonal", "low_rank", "gram_schmidt", "linear"])
def test_gradients_reach_every_parameter_and_nothing_else(kind):
    alignment = make_alignment(kind, 10, k=4, seed=0, standardize=_stats(10))
    h = torch.randn(6, 10)
    amap = alignment.materialize()
    (amap.inverse(amap.forward(h) * torch.linspace(0.5, 2, amap.dim_out)) - h).pow(2).sum().backward()
    for name, p in alignment.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, b in alignment.named_buffers():  # standardisation stats and trivialisation bases stay frozen
        assert not b.requires_grad and b.grad is None, name
    assert h.grad is None


def test_identity_has_no_parameters():
    assert list(make_alignment("identity", 8).parameters()) == []


# --- persistence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_spec_and_state_dict_rebuild(kind):
    alignment = make_alignment(kind, 10, k=3, seed=4, standardize=_stats(10, seed=1))
    _perturb(alignment)
    rebuilt = alignment_from_spec(alignment.spec, alignment.state_dict())
    h = torch.randn(3, 10)
    torch.testing.assert_close(rebuilt.materialize().forward(h), alignment.materialize().forward(h))


def test_standardized_spec_needs_state_dict():
    alignment = make_alignment("orthogonal", 4, seed=0, standardize=_stats(4))
    with pytest.raises(ConfigError, match="needs its state_dict"):
        alignment_from_spec(alignment.spec)
