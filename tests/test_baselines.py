"""Stitching baselines: the isometric stitch is a rank-k partial isometry; the linear stitch is a free
affine map of rank <= k that gradient descent fits to a linear relation."""

from __future__ import annotations

import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.baselines import IsometricStitch, LinearStitch
from llm_mas.errors import ConfigError
from llm_mas.interventions import stitch

F64 = torch.float64


def test_isometric_full_rank_identity_rotations_is_identity():
    module = IsometricStitch.create(7, 7, 7, kind="identity")
    h = torch.randn(5, 7)
    assert torch.equal(module(h), h)
    torch.testing.assert_close(module.materialize().matrix(), torch.eye(7))


@pytest.mark.parametrize(("d_source", "d_target", "k"), [(9, 9, 3), (10, 6, 4), (6, 10, 6)])
def test_isometric_stitch_is_a_rank_k_partial_isometry(d_source, d_target, k):
    module = IsometricStitch.create(d_source, d_target, k, seed=0, dtype=F64)
    stitch_map = module.materialize()
    matrix = stitch_map.matrix().detach()  # (d_s, d_t)
    singular_values = torch.linalg.svdvals(matrix)
    torch.testing.assert_close(singular_values[:k], torch.ones(k, dtype=F64))  # isometric on its row space
    assert all(float(v) < 1e-10 for v in singular_values[k:])  # and rank exactly k
    torch.testing.assert_close(matrix @ matrix.mT @ matrix, matrix)  # M Mᵀ M = M
    h = torch.randn(4, d_source, dtype=F64)
    torch.testing.assert_close(stitch_map(h), h @ matrix)
    q_source, q_target = module.source.materialize().weight, module.target.materialize().weight
    torch.testing.assert_close(matrix, q_source[:, :k] @ q_target[:, :k].mT)  # h_s Q_s P_k Q_tᵀ
    assert (stitch_map.d, stitch_map.dim_out, stitch_map.rank) == (d_source, d_target, k)


def test_isometric_stitch_shares_existing_alignments():
    source, target = make_alignment("orthogonal", 8, seed=1), make_alignment("orthogonal", 8, seed=2)
    module = IsometricStitch(source, target, 3)
    assert module.source is source and module.target is target
    h = torch.randn(5, 8)
    torch.testing.assert_close(module(h), stitch(target.materialize(), source.materialize(), h, slice(0, 3)))
    module(h).pow(2).sum().backward()
    for p in list(source.parameters()) + list(target.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(("call", "match"), [
    (lambda: IsometricStitch.create(5, 4, 5), r"\[1, 4\].*source 5, target 4"),
    (lambda: IsometricStitch.create(5, 4, 2, kind="linear"), "valid choices: gram_schmidt, identity"),
    (lambda: IsometricStitch(make_alignment("linear", 4), make_alignment("orthogonal", 4), 2), "LinearStitch"),
    (lambda: LinearStitch(0, 4), "d_source must be a positive int"),
    (lambda: LinearStitch(4, 4, k=0), "k must be a positive int"),
])
def test_stitch_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def _fit(module: LinearStitch, h_source: torch.Tensor, h_target: torch.Tensor, steps: int, lr: float) -> float:
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        loss = (module(h_source) - h_target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def test_linear_stitch_recovers_an_invertible_affine_relation():
    g = torch.Generator().manual_seed(0)
    d = 6
    relation = torch.eye(d) + 0.4 * torch.randn(d, d, generator=g)  # invertible (cond ~ 4)
    assert torch.linalg.matrix_rank(relation) == d
    offset = torch.randn(d, generator=g)
    h_source = torch.randn(256, d, generator=g)
    h_target = h_source @ relation + offset
    module = LinearStitch(d, d, seed=0)
    assert module.full_rank and module.weight.shape == (d, d)
    assert _fit(module, h_source, h_target, steps=600, lr=0.05) < 1e-6
    torch.testing.assert_close(module.materialize().matrix(), relation, atol=1e-3, rtol=0)
    torch.testing.assert_close(module.bias.detach(), offset, atol=1e-3, rtol=0)


def test_linear_stitch_low_rank_recovers_a_rank_k_relation():
    g = torch.Generator().manual_seed(1)
    d_source, d_target, k = 7, 5, 2
    relation = torch.randn(d_source, k, generator=g) @ torch.randn(k, d_target, generator=g) / 2  # rank 2
    h_source = torch.randn(256, d_source, generator=g)
    module = LinearStitch(d_source, d_target, k=k, bias=False, seed=0)
    assert not module.full_rank and module.materialize().rank == k
    assert _fit(module, h_source, h_source @ relation, steps=800, lr=0.05) < 1e-5
    matrix = module.materialize().matrix()
    torch.testing.assert_close(matrix, relation, atol=1e-2, rtol=0)
    assert torch.linalg.matrix_rank(matrix.detach()) <= k  # the constraint holds by construction


def test_linear_stitch_cannot_fit_beyond_its_rank():
    """A rank-1 stitch leaves the residual of an identity relation: the rank limit is real."""
    h_source = torch.randn(256, 4, generator=torch.Generator().manual_seed(2))
    module = LinearStitch(4, 4, k=1, seed=0)
    assert _fit(module, h_source, h_source, steps=300, lr=0.05) > 0.5


def test_linear_stitch_seeded_and_rng_free():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = LinearStitch(5, 3, k=2, seed=9)
    assert torch.equal(torch.rand(2), expected)
    second = LinearStitch(5, 3, k=2, seed=9)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
