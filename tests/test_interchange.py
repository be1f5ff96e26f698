"""Interchange, variable blocks, intervene (fast == literal formula), stitch: golden values and properties."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llm_mas.alignments import AlignmentMap, make_alignment
from llm_mas.errors import ConfigError, InterventionError
from llm_mas.interventions import (
    block_mask,
    interchange,
    intervene,
    intervene_reference,
    stitch,
    variable_blocks,
)

KINDS = ["orthogonal", "low_rank", "gram_schmidt", "linear", "identity"]
F64 = torch.float64


def _map(kind: str, d: int, k: int = 4, seed: int = 0, standardized: bool = False,
         perturb: bool = True) -> AlignmentMap:
    """A float64 map of `kind` whose parameters were moved off their initial values."""
    g = torch.Generator().manual_seed(1000 + seed)
    standardize = None
    if standardized:
        standardize = (torch.randn(d, generator=g, dtype=F64), torch.rand(d, generator=g, dtype=F64) + 0.5)
    alignment = make_alignment(kind, d, k=k, seed=seed, standardize=standardize, dtype=F64)
    if perturb:
        with torch.no_grad():
            for p in alignment.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    return alignment.materialize()


def _latents(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- interchange ------------------------------------------------------------------------------------


def test_interchange_golden():
    base = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    source = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert torch.equal(interchange(base, source, mask), torch.tensor([[1.0, 20.0, 30.0, 4.0]]))
    assert torch.equal(interchange(base, source, mask.bool()), torch.tensor([[1.0, 20.0, 30.0, 4.0]]))
    assert torch.equal(interchange(base, source, torch.zeros(4)), base)
    assert torch.equal(interchange(base, source, torch.ones(4)), source)
    half = interchange(base, source, torch.full((4,), 0.5))  # soft masks interpolate
    assert torch.allclose(half, (base + source) / 2)


def test_interchange_exact_at_mask_one_and_zero():
    base, source = torch.randn(100, 8) * 1e3, torch.randn(100, 8) * 1e-3  # very different magnitudes
    mask = block_mask(slice(2, 5), 8)
    out = interchange(base, source, mask)
    assert torch.equal(out[:, 2:5], source[:, 2:5])
    assert torch.equal(out[:, :2], base[:, :2]) and torch.equal(out[:, 5:], base[:, 5:])


def test_interchange_different_widths():
    base = torch.arange(6.0).expand(2, 6)  # width 6
    narrow = -torch.arange(1.0, 4.0).expand(2, 3)  # width 3
    wide = -torch.arange(1.0, 9.0).expand(2, 8)  # width 8
    # a narrower source: the mask may only select its 3 coordinates; output keeps the base's width
    out = interchange(base, narrow, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(out, torch.tensor([[-1.0, 1, -3, 3, 4, 5]] * 2))
    # a wider source is truncated; a mask wider than the base must be zero past the base
    out = interchange(base, wide, torch.tensor([0.0, 1, 1, 0, 0, 0, 0, 0]))
    assert torch.equal(out, torch.tensor([[0.0, -2, -3, 3, 4, 5]] * 2))
    # a narrow base takes the first coordinates of a wide source
    assert torch.equal(interchange(narrow, base, torch.ones(3)), base[:, :3])


def test_interchange_refuses_coordinates_a_model_lacks():
    with pytest.raises(InterventionError, match="source's aligned width 3.*base width 6"):
        interchange(torch.zeros(2, 6), torch.zeros(2, 3), block_mask(slice(2, 4), 6))
    with pytest.raises(InterventionError, match="past the base's aligned width 3"):
        interchange(torch.zeros(2, 3), torch.zeros(2, 6), block_mask(slice(2, 4), 6))


def test_interchange_is_differentiable_in_both_inputs():
    base, source = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    interchange(base, source, block_mask(slice(0, 1), 4)).sum().backward()
    assert torch.equal(base.grad, torch.tensor([[0.0, 1, 1, 1]] * 3))
    assert torch.equal(source.grad, torch.tensor([[1.0, 0, 0, 0]] * 3))


# --- variable blocks -----------------------------------------------------------------------------------


def test_variable_blocks_layout():
    assert variable_blocks(["count"], 16, 128) == {"count": slice(0, 16)}
    blocks = variable_blocks(["count", "phase"], 10, 64, null=True)
    assert blocks == {"count": slice(0, 10), "phase": slice(10, 20), "null": slice(20, 64)}
    assert list(blocks) == ["count", "phase", "null"]


@pytest.mark.parametrize(("args", "match"), [
    ((["a", "b"], 40, 64, False), r"k=40 do not fit.*d_min=64.*use k <= 32"),
    ((["a", "b"], 32, 64, True), r"non-empty null block.*use k <= 31"),
    ((["a"], 0, 64, False), "positive int, got 0"),
    ((["a", "a"], 4, 64, False), "repeat: 'a'"),
    ((["null"], 4, 64, True), "repeat: 'null'.*added by null=True"),
    (([], 4, 64, False), "at least one variable"),
])
def test_variable_blocks_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        variable_blocks(*args)


# --- intervene: golden values --------------------------------------------------------------------------


def test_identity_full_block_gives_source_exactly():
    identity = make_alignment("identity", 8).materialize()
    h_target, h_source = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.equal(intervene(identity, identity, h_target, h_source, slice(0, 8)), h_source)
    out = intervene(identity, identity, h_target, h_source, slice(2, 5))
    assert torch.equal(out[:, 2:5], h_source[:, 2:5]) and torch.equal(out[:, :2], h_target[:, :2])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_block_gives_target(kind):
    target, source = _map(kind, 10, seed=1), _map(kind, 10, seed=2)
    h_target, h_source = _latents(4, 10, 0), _latents(4, 10, 1)
    assert torch.equal(intervene(target, source, h_target, h_source, slice(3, 3)), h_target)


def test_orthogonal_hand_computed():
    """2-d rotation by 90° as the target's alignment, identity for the source, worked by hand."""
    q = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)  # A(h) = hQ = (-h2, h1)
    rotation = AlignmentMap("orthogonal", 2, 2, weight=q, inverse_weight=q.mT)
    identity = make_alignment("identity", 2, dtype=F64).materialize()
    h_target = torch.tensor([[1.0, 2.0]], dtype=F64)  # aligned: (-2, 1)
    h_source = torch.tensor([[5.0, 7.0]], dtype=F64)  # identity-aligned: (5, 7)
    # swap aligned coordinate 0: (-2, 1) -> (5, 1); back: zQᵀ = (z2, -z1) = (1, -5)
    out = intervene(rotation, identity, h_target, h_source, slice(0, 1))
    torch.testing.assert_close(out, torch.tensor([[1.0, -5.0]], dtype=F64))


def test_das_self_swap_is_a_no_op():
    amap = _map("linear", 12, seed=3, standardized=True)
    h = _latents(6, 12, 0)
    torch.testing.assert_close(intervene(amap, amap, h, h, slice(0, 5)), h, atol=1e-12, rtol=0)


# --- intervene: fast path == literal formula --------------------------------------------------------


@pytest.mark.parametrize("target_kind", KINDS)
@pytest.mark.parametrize("source_kind", KINDS)
@pytest.mark.parametrize(("d_target", "d_source", "standardized"), [(12, 12, False), (12, 9, True), (9, 12, True)])
def test_intervene_matches_reference(target_kind, source_kind, d_target, d_source, standardized):
    k = 4
    target = _map(target_kind, d_target, k=k, seed=1, standardized=standardized)
    source = _map(source_kind, d_source, k=k, seed=2, standardized=standardized)
    h_target, h_source = _latents(7, d_target, 10), _latents(7, d_source, 11)
    for block in (slice(0, k), slice(1, 3), slice(0, 1)):
        fast = intervene(target, source, h_target, h_source, block)
        slow = intervene_reference(target, source, h_target, h_source, block)
        assert fast.shape == (7, d_target)
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)


def test_intervene_keeps_leading_dims():
    target, source = _map("orthogonal", 8, seed=1), _map("orthogonal", 6, seed=2)
    h_target, h_source = torch.randn(3, 5, 8, dtype=F64), torch.randn(3, 5, 6, dtype=F64)  # (batch, pos, d)
    fast = intervene(target, source, h_target, h_source, slice(0, 4))
    assert fast.shape == (3, 5, 8)
    torch.testing.assert_close(fast, intervene_reference(target, source, h_target, h_source, slice(0, 4)))


def test_gram_schmidt_replaces_only_the_projection():
    """FCA == orthogonal interchange with U completed to a full orthogonal basis [U, U⊥]."""
    d, k = 10, 4
    fca_target, fca_source = _map("gram_schmidt", d, k=k, seed=1), _map("gram_schmidt", d, k=k, seed=2)

    def completed(amap: AlignmentMap) -> AlignmentMap:
        u = amap.weight  # (d, k)
        q, r = torch.linalg.qr(torch.cat([u, torch.randn(d, d - k, dtype=F64)], dim=1))
        q = q * torch.sign(torch.diagonal(r))  # first k columns equal U
        torch.testing.assert_close(q[:, :k], u)
        return AlignmentMap("orthogonal", d, d, weight=q, inverse_weight=q.mT)

    h_target, h_source = _latents(5, d, 0), _latents(5, d, 1)
    for block in (slice(0, k), slice(1, 3)):
        got = intervene(fca_target, fca_source, h_target, h_source, block)
        want = intervene_reference(completed(fca_target), completed(fca_source), h_target, h_source, block)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # the part of h_target orthogonal to span(U_t) is untouched
    u = fca_target.weight
    got = intervene(fca_target, fca_source, h_target, h_source, slice(0, k))
    torch.testing.assert_close(got - got @ u @ u.mT, h_target - h_target @ u @ u.mT, atol=1e-10, rtol=0)


def test_low_rank_discards_the_complement():
    target, source = _map("low_rank", 10, k=3, seed=1), _map("low_rank", 10, k=3, seed=2)
    h_target, h_source = _latents(5, 10, 0), _latents(5, 10, 1)
    out = intervene(target, source, h_target, h_source, slice(0, 3))
    torch.testing.assert_close(out, source.forward(h_source) @ target.inverse_weight)  # lives in span(U_t)


@pytest.mark.parametrize(("block", "match"), [
    (slice(0, 9), r"block \[0, 9\) exceeds.*target orthogonal has 8, source orthogonal has 12"),
    (slice(0, 4, 2), "contiguous slice"),
    (slice(-2, 4), "no negative indices"),
])
def test_intervene_block_errors(block, match):
    target, source = _map("orthogonal", 8, seed=1), _map("orthogonal", 12, seed=2)
    with pytest.raises(InterventionError, match=match):
        intervene(target, source, _latents(2, 8, 0), _latents(2, 12, 1), block)


def test_intervene_low_rank_width_is_k():
    target, source = _map("low_rank", 12, k=3, seed=1), _map("orthogonal", 12, seed=2)
    with pytest.raises(InterventionError, match="target low_rank has 3, source orthogonal has 12"):
        intervene(target, source, _latents(2, 12, 0), _latents(2, 12, 1), slice(0, 4))


def test_intervene_latent_shape_errors():
    target, source = _map("orthogonal", 8, seed=1), _map("orthogonal", 6, seed=2)
    with pytest.raises(InterventionError, match="source latent has width 8.*expects d=6"):
        intervene(target, source, _latents(2, 8, 0), _latents(2, 8, 1), slice(0, 2))
    with pytest.raises(InterventionError, match="same leading"):
        intervene(target, source, _latents(2, 8, 0), _latents(3, 6, 1), slice(0, 2))


def test_intervene_cost_is_n_d_k():
    """Only the block's k columns are touched: 3 products of n·d·k (2 flops each), no d×d."""
    n, d, k = 64, 96, 8
    target, source = _map("orthogonal", d, seed=1), _map("orthogonal", d, seed=2)
    h_target, h_source = _latents(n, d, 0), _latents(n, d, 1)
    with FlopCounterMode(display=False) as counter:
        intervene(target, source, h_target, h_source, slice(0, k))
    assert counter.get_total_flops() == 3 * 2 * n * d * k
    with FlopCounterMode(display=False) as counter:
        intervene_reference(target, source, h_target, h_source, slice(0, k))
    assert counter.get_total_flops() >= 3 * 2 * n * d * d  # what the fast path avoids


# --- gradients --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["orthogonal", "low_rank", "gram_schmidt", "linear"])
def test_intervene_gradients_reach_both_alignments_only(kind):
    target_alignment = make_alignment(kind, 8, k=3, seed=1)
    source_alignment = make_alignment(kind, 6, k=3, seed=2)
    h_target, h_source = torch.randn(5, 8), torch.randn(5, 6)  # frozen model latents
    out = intervene(target_alignment.materialize(), source_alignment.materialize(), h_target, h_source,
                    slice(0, 3))
    (out * torch.randn(5, 8)).sum().backward()
    for alignment in (target_alignment, source_alignment):
        for name, p in alignment.named_parameters():
            if name == "bias" and alignment is target_alignment:
                continue  # the target's own shift cancels in A_t⁻¹(... A_t(h_t) ...)
            assert p.grad is not None and p.grad.abs().sum() > 0, (alignment.kind, name)
    assert h_target.grad is None and h_source.grad is None and not h_target.requires_grad


# --- stitch -----------------------------------------------------------------------------------------------


def test_stitch_identity_full_rank_is_identity():
    identity = make_alignment("identity", 7).materialize()
    h_source = torch.randn(4, 7)
    assert torch.equal(stitch(identity, identity, h_source, slice(0, 7)), h_source)


def test_stitch_is_a_partial_isometry():
    d_source, d_target, k = 9, 7, 3
    source, target = _map("orthogonal", d_source, seed=1), _map("orthogonal", d_target, seed=2)
    h_source = _latents(5, d_source, 0)
    want = h_source @ source.weight[:, :k] @ target.weight[:, :k].mT  # h_s Q_s P_k Q_tᵀ
    torch.testing.assert_close(stitch(target, source, h_source, slice(0, k)), want)


@pytest.mark.parametrize("target_kind", KINDS)
@pytest.mark.parametrize("source_kind", KINDS)
def test_stitch_matches_literal_formula(target_kind, source_kind):
    target = _map(target_kind, 10, seed=1, standardized=True)
    source = _map(source_kind, 8, seed=2, standardized=True)
    h_source = _latents(5, 8, 0)
    block = slice(1, 4)
    z_source = source.forward(h_source)
    zeros = torch.zeros(5, target.dim_out, dtype=F64)
    want = target.inverse(interchange(zeros, z_source, block_mask(block, target.dim_out, dtype=F64)))
    torch.testing.assert_close(stitch(target, source, h_source, block), want, atol=1e-10, rtol=0)
