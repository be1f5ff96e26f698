"""Model-stitching baselines (docs/method.md): maps h_s -> h_t that discard the target's own latent.

- `IsometricStitch`: the paper's rank-k partial isometry h_s Q_s P_k Q_tᵀ built from two
  alignments (orthogonal by default; P_k keeps the first k aligned coordinates).
- `LinearStitch`: an unconstrained affine map of rank <= k, h_s A B + b (A: d_s×k, B: k×d_t); one dense
  d_s×d_t matrix when k >= min(d_s, d_t) (full rank). A strictly stronger method than MAS's stitch, so
  success there is weaker evidence still. It is the linear-stitch intervention's own map
  (`llm_mas.interventions`), re-exported here.

Both are nn.Modules whose `materialize()` returns an evaluated map with the `AlignmentMap`-style
interface that makes sense for a one-way map: `forward(h_source)` (also `__call__`), `d` (source
width), `dim_out` (target width), `rank`, `kind`, `keeps_complement = False`, and `matrix()`, the dense
linear part for analysis.

    stitch_module = IsometricStitch.create(d_source=128, d_target=128, k=2, seed=0)
    h_target_hat = stitch_module.materialize()(h_source)     # (n, 128) -> (n, 128)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llm_mas.alignments import ALIGNMENTS, Alignment, AlignmentMap, make_alignment
from llm_mas.errors import ConfigError, choice_error

# LinearStitch is the linear-stitch intervention's own map, defined with it; re-exported here with the baselines
from llm_mas.interventions import LinearStitch, LowRankAffineMap, check_positive_int, stitch

# the registered kinds whose class says it is isometric (orthogonal, low_rank, gram_schmidt, identity)
ISOMETRIC_KINDS = tuple(name for name, cls in ALIGNMENTS.items() if cls.isometric)


class PartialIsometryMap:
    """Evaluated `IsometricStitch`: h_s ↦ A_t⁻¹(P_k A_s(h_s)) = h_s Q_s P_k Q_tᵀ (plus standardisation)."""

    kind = "isometric_stitch"
    keeps_complement = False

    def __init__(self, target_map: AlignmentMap, source_map: AlignmentMap, k: int):
        self.target_map, self.source_map, self.k = target_map, source_map, k
        self.d, self.dim_out, self.rank = source_map.d, target_map.d, k

    def forward(self, h_source: Tensor) -> Tensor:
        """(..., d_s) -> (..., d_t), O(n·d·k)."""
        return stitch(self.target_map, self.source_map, h_source, slice(0, self.k))

    __call__ = forward

    def matrix(self) -> Tensor:
        """(d_s, d_t) linear part Q_s[:, :k] Q_t[:, :k]ᵀ in standardised units (identity maps: P_k)."""
        block = slice(0, self.k)
        eye_s = torch.eye(self.d, dtype=self._dtype(), device=self._device())
        left = eye_s[:, block] if self.source_map.weight is None else self.source_map.weight[:, block]
        if self.target_map.weight is None:
            right = torch.eye(self.dim_out, dtype=left.dtype, device=left.device)[block]
        else:
            right = self.target_map.inverse_weight[block]
        return left @ right  # (d_s, k) @ (k, d_t)

    def _dtype(self) -> torch.dtype:
        for m in (self.source_map, self.target_map):
            if m.weight is not None:
                return m.weight.dtype
        return torch.get_default_dtype()

    def _device(self) -> torch.device | None:
        for m in (self.source_map, self.target_map):
            if m.weight is not None:
                return m.weight.device
        return None


class IsometricStitch(nn.Module):
    """Rank-k partial isometry h_s Q_s P_k Q_tᵀ through a source and a target alignment (both trained).

    Built from two existing alignments (parameters shared, not copied), or with `create` from widths.
    """

    def __init__(self, source: Alignment, target: Alignment, k: int):
        for role, alignment in (("source", source), ("target", target)):
            if not isinstance(alignment, Alignment) or alignment.kind not in ISOMETRIC_KINDS:
                raise ConfigError(
                    f"{role} of an isometric stitch must be an Alignment of kind "
                    f"{', '.join(ISOMETRIC_KINDS)}; got {getattr(alignment, 'kind', type(alignment).__name__)!r} "
                    "(use LinearStitch for a non-isometric map)"
                )
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(source.dim_out, target.dim_out):
            raise ConfigError(
                f"stitch rank k must be an int in [1, {min(source.dim_out, target.dim_out)}] (the smaller "
                f"aligned width: source {source.dim_out}, target {target.dim_out}), got {k!r}"
            )
        super().__init__()
        self.source, self.target, self.k = source, target, k

    @classmethod
    def create(cls, d_source: int, d_target: int, k: int, *, kind: str = "orthogonal",
               seed: int | None = None, dtype: torch.dtype = torch.float32) -> IsometricStitch:
        """Two fresh alignments of `kind` (orthogonal: the paper's stitching baseline); `seed` seeds the
        source alignment and seed + 1 the target's."""
        if kind not in ISOMETRIC_KINDS:
            raise choice_error("isometric stitch alignment kind", kind, ISOMETRIC_KINDS)
        d_source, d_target = check_positive_int("d_source", d_source), check_positive_int("d_target", d_target)
        alignment_k = k if ALIGNMENTS[kind].rank_k else None
        if alignment_k is not None and (isinstance(k, bool) or not isinstance(k, int)
                                        or not 1 <= k <= min(d_source, d_target)):
            raise ConfigError(f"stitch rank k must be an int in [1, {min(d_source, d_target)}], got {k!r}")
        source = make_alignment(kind, d_source, k=alignment_k, seed=seed, dtype=dtype)
        target = make_alignment(kind, d_target, k=alignment_k, seed=None if seed is None else seed + 1,
                                dtype=dtype)
        return cls(source, target, k)

    @property
    def d(self) -> int:
        return self.source.d

    @property
    def dim_out(self) -> int:
        return self.target.d

    def materialize(self) -> PartialIsometryMap:
        return PartialIsometryMap(self.target.materialize(), self.source.materialize(), self.k)

    def forward(self, h_source: Tensor) -> Tensor:
        """(..., d_s) -> (..., d_t); materialises on every call (use `materialize` in loops)."""
        return self.materialize()(h_source)

    def extra_repr(self) -> str:
        return f"d_source={self.d}, d_target={self.dim_out}, k={self.k}"


__all__ = ["ISOMETRIC_KINDS", "IsometricStitch", "LinearStitch", "LowRankAffineMap", "PartialIsometryMap"]
