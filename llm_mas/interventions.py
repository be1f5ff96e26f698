"""Interventions: the interchange (MAS / DAS) and stitching, as pure functions of evaluated maps and as
interchangeable objects with one signature (docs/method.md).

    h_t' = A_t⁻¹( (1 − m) ⊙ A_t(h_t) + m ⊙ A_s(h_s) )          (intervene)
    h_t' = A_t⁻¹( m ⊙ A_s(h_s) )                                 (stitch: the target is discarded)

`m` is 1 on one variable's block of aligned coordinates (`variable_blocks`). Each model has its own
width; the block must lie inside both models' aligned widths (the first min(dim_out) coordinates).

`intervene` never forms a d×d product per row: with Δ = enc_s(h_s) − enc_t(h_t) on the block's k
columns only, h_t' = h_t + decode(Δ) (keeps_complement maps), costing O(n·d·k).
`intervene_reference` is the literal formula, kept as the readable definition and for tests.

The problems never branch on the kind of intervention: they hold one `Intervention` (``INTERVENTIONS``,
``make_intervention``) and call it the same way for every kind,

    h_target' = intervention(maps, h_target, h_source, source, target, block)

- ``interchange``: ``intervene`` with the target's and the source's alignments, ``maps[target]``, ``maps[source]``;
- ``stitch``: the rank-k partial isometry ``stitch`` (the target's own latent discarded);
- ``linear_stitch``: one unconstrained affine map per trained direction (``LinearStitch``), owned by the
  intervention: ``own_maps`` creates them and the call looks up the direction's map itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_mas.alignments import AlignmentMap
from llm_mas.errors import ConfigError, InterventionError, choice_error

NULL_VARIABLE = "null"


def interchange(base_z: Tensor, source_z: Tensor, mask: Tensor) -> Tensor:
    """(1 − m) ⊙ base + m ⊙ source in the aligned space; pure and differentiable.

    base_z: (..., w_b); source_z: (..., w_s); mask: (w_m,) or broadcastable (..., w_m), float in [0, 1]
    or bool. The result has the base's width w_b. Coordinate j is compared across models, so:
    the source is truncated to w_b or zero-padded up to it; the mask is truncated (its entries past
    w_b must be 0) or zero-padded (keep the base there). A mask selecting a coordinate the source does
    not have (j >= w_s) raises InterventionError. Where m is exactly 1 the result is exactly the source.
    """
    width_base, width_source, width_mask = base_z.shape[-1], source_z.shape[-1], mask.shape[-1]
    if width_mask > width_base:
        if (mask[..., width_base:] != 0).any():
            raise InterventionError(
                f"mask selects coordinates past the base's aligned width {width_base} (mask width "
                f"{width_mask}); swap only coordinates < min(base width {width_base}, source width "
                f"{width_source})"
            )
        mask = mask[..., :width_base]
    if width_source < width_base:
        if (mask[..., width_source:] != 0).any():
            raise InterventionError(
                f"mask selects coordinates past the source's aligned width {width_source} (base width "
                f"{width_base}); swap only coordinates < {min(width_source, width_base)}"
            )
        source_z = F.pad(source_z, (0, width_base - width_source))  # (..., w_b), zeros never selected
    elif width_source > width_base:
        source_z = source_z[..., :width_base]  # (..., w_b)
    if mask.shape[-1] < width_base:
        mask = F.pad(mask, (0, width_base - mask.shape[-1]))  # keep the base past the mask
    if mask.dtype == torch.bool:
        return torch.where(mask, source_z, base_z)
    mask = mask.to(base_z.dtype)
    return (1 - mask) * base_z + mask * source_z


def block_mask(block: slice, width: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """(width,) mask: 1 on `block`, 0 elsewhere."""
    mask = torch.zeros(width, dtype=dtype, device=device)
    mask[block] = 1
    return mask


def variable_blocks(variables: Sequence[str], k: int, d_min: int, null: bool = False) -> dict[str, slice]:
    """Aligned-space blocks: variable i -> [i·k, (i+1)·k); with null=True, "null" -> [n·k, d_min).

    d_min is the smallest aligned width among the models. Raises ConfigError when the blocks do not fit
    (naming the largest k that does), when a name repeats, or when the null block would be empty.
    """
    variables = list(variables)
    if not variables:
        raise ConfigError("variable_blocks needs at least one variable name")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"block width k must be a positive int, got {k!r}")
    names = variables + ([NULL_VARIABLE] if null else [])
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        hint = f" ({NULL_VARIABLE!r} is added by null=True)" if NULL_VARIABLE in repeated and null else ""
        raise ConfigError(f"variable names repeat: {', '.join(map(repr, repeated))}{hint}; give each a unique name")
    n = len(variables)
    fits = (d_min - 1) // n if null else d_min // n  # the largest k that fits (null block non-empty)
    if n * k > d_min or (null and n * k == d_min):
        need = f"{n}·k < {d_min} (a non-empty null block)" if null else f"{n}·k <= {d_min}"
        raise ConfigError(
            f"{n} variable block(s) of k={k} do not fit in the aligned width d_min={d_min}: need {need}; "
            + (f"use k <= {fits}" if fits >= 1 else "use fewer variables or a wider model")
        )
    blocks = {name: slice(i * k, (i + 1) * k) for i, name in enumerate(variables)}
    if null:
        blocks[NULL_VARIABLE] = slice(n * k, d_min)
    return blocks


def _check_block(target_map: AlignmentMap, source_map: AlignmentMap, block: slice) -> tuple[int, int]:
    if not isinstance(block, slice) or block.step not in (None, 1):
        raise InterventionError(f"block must be a contiguous slice (step 1), got {block!r}")
    start = 0 if block.start is None else block.start
    stop = block.stop
    width = min(target_map.dim_out, source_map.dim_out)
    if stop is None:
        stop = width
    if start < 0 or stop < start:
        raise InterventionError(f"block {block!r} must satisfy 0 <= start <= stop (no negative indices)")
    if stop > width:
        raise InterventionError(
            f"block [{start}, {stop}) exceeds the aligned widths: target {target_map.kind} has "
            f"{target_map.dim_out}, source {source_map.kind} has {source_map.dim_out}; "
            f"blocks must lie within the first {width} coordinates"
        )
    return start, stop


def _check_latent(alignment_map: AlignmentMap, h: Tensor, role: str) -> None:
    if h.shape[-1] != alignment_map.d:
        raise InterventionError(
            f"{role} latent has width {h.shape[-1]} (shape {tuple(h.shape)}) but the {role} alignment "
            f"expects d={alignment_map.d}; pass the {role} model's latent with its own alignment"
        )


def intervene(target_map: AlignmentMap, source_map: AlignmentMap, h_target: Tensor, h_source: Tensor,
              block: slice) -> Tensor:
    """(n, d_t), (n, d_s) -> (n, d_t): the target latent with `block` of its aligned coordinates
    taken from the source. Any leading dims work if they match.

    Equals `intervene_reference` (A_t⁻¹(interchange(A_t(h_t), A_s(h_s), m)), plus the target's
    complement for `gram_schmidt`) but touches only the block's k columns, O(n·d·k): for maps that keep
    the complement h_t + decode(enc_s(h_s) − enc_t(h_t)); for `low_rank` targets the literal formula on
    their k_t-wide space. Plain identity maps copy the coordinates (exact); an empty block returns
    h_target itself.
    """
    _check_latent(target_map, h_target, "target")
    _check_latent(source_map, h_source, "source")
    if h_target.shape[:-1] != h_source.shape[:-1]:
        raise InterventionError(
            f"target latents {tuple(h_target.shape)} and source latents {tuple(h_source.shape)} must "
            "have the same leading (batch/position) shape"
        )
    start, stop = _check_block(target_map, source_map, block)
    if start == stop:
        return h_target
    block = slice(start, stop)
    if target_map.is_plain_identity and source_map.is_plain_identity:  # exact copy of coordinates
        return torch.cat([h_target[..., :start], h_source[..., start:stop], h_target[..., stop:]], dim=-1)
    source_block = source_map.encode(h_source, block)  # (n, k)
    if target_map.keeps_complement:
        delta = source_block - target_map.encode(h_target, block)  # (n, k)
        return h_target + target_map.decode_delta(delta, block)  # (n, d_t)
    # low_rank: the target's complement is discarded anyway; its aligned width is only k_t, so the
    # literal formula is already O(n·d·k_t): swap the block's coordinates and invert.
    z_target = target_map.forward(h_target)  # (n, k_t)
    z_target = torch.cat([z_target[..., :start], source_block, z_target[..., stop:]], dim=-1)
    return target_map.inverse(z_target)  # (n, d_t)


def intervene_reference(target_map: AlignmentMap, source_map: AlignmentMap, h_target: Tensor,
                        h_source: Tensor, block: slice) -> Tensor:
    """The literal formula: A_t⁻¹((1 − m) ⊙ A_t(h_t) + m ⊙ A_s(h_s)) [+ complement_t(h_t)].

    The complement term (h_t − A_t⁻¹(A_t(h_t))) is added for maps with `keeps_complement`; it is zero
    for the square kinds and is what makes `gram_schmidt` replace only the projection on its k directions.
    Slow (full-width products); use `intervene`.
    """
    _check_latent(target_map, h_target, "target")
    _check_latent(source_map, h_source, "source")
    _check_block(target_map, source_map, block)
    z_target = target_map.forward(h_target)  # (n, dim_out_t)
    mask = block_mask(block, target_map.dim_out, dtype=z_target.dtype, device=z_target.device)
    out = target_map.inverse(interchange(z_target, source_map.forward(h_source), mask))  # (n, d_t)
    if target_map.keeps_complement and target_map.dim_out < target_map.d:
        out = out + target_map.complement(h_target)
    return out


def stitch(target_map: AlignmentMap, source_map: AlignmentMap, h_source: Tensor, block: slice) -> Tensor:
    """(n, d_s) -> (n, d_t): A_t⁻¹(m ⊙ A_s(h_s)), the target's own latent discarded (model stitching).

    With orthogonal maps and block [0, k) this is the rank-k partial isometry h_s Q_s P_k Q_tᵀ.
    """
    _check_latent(source_map, h_source, "source")
    start, stop = _check_block(target_map, source_map, block)
    block = slice(start, stop)
    return target_map.decode_block(source_map.encode(h_source, block), block)  # (n, d_t)


# ------------------------------------------------------------------------------------------------ objects
Direction = tuple[int, int]  # (source model index, target model index)


class Intervention:
    """``intervention(maps, h_target, h_source, source, target, block) -> h_target'`` (rows, d_t).

    maps: what the trainer evaluated from the trained modules (``[m.materialize() for m in modules]``): one
    alignment map per model, or the intervention's own maps (``own_maps``). h_target (rows, d_t) and
    h_source (rows, d_s) are the natural latents of the intervened rows; block is the variable's slice of
    aligned coordinates.
    """

    name = "intervention"
    reads_target = True   # False: h_target is ignored (callers may skip preparing it)

    def __init__(self, trained_directions: Iterable[Direction] = ()):
        self.trained_directions = sorted(set(map(tuple, trained_directions)))

    def evaluated_directions(self, directions: Sequence[Direction]) -> list[Direction]:
        """The directions this intervention can evaluate (default: all of them)."""
        return list(directions)

    def own_maps(self, widths: Sequence[int], k: int, seed: int) -> nn.ModuleList | None:
        """The intervention's own trained modules, or None: the maps are one alignment per model."""
        return None

    def __call__(self, maps: Sequence[Any], h_target: Tensor, h_source: Tensor, source: int, target: int,
                 block: slice) -> Tensor:
        raise NotImplementedError


class Interchange(Intervention):
    """MAS / DAS: A_t⁻¹((1 − m) ⊙ A_t(h_t) + m ⊙ A_s(h_s)) (``intervene``)."""

    name = "interchange"

    def __call__(self, maps, h_target, h_source, source, target, block):
        return intervene(maps[target], maps[source], h_target, h_source, block)


class RankKStitch(Intervention):
    """Model stitching through both alignments: A_t⁻¹(m ⊙ A_s(h_s)) (``stitch``), the target discarded."""

    name = "stitch"
    reads_target = False

    def __call__(self, maps, h_target, h_source, source, target, block):
        return stitch(maps[target], maps[source], h_source, block)


class LinearStitchIntervention(Intervention):
    """One unconstrained affine map of rank <= k per trained direction: h_t' = h_s A B + b.

    Only the trained directions exist (they are the ones with a map); ``own_maps`` creates the maps in
    ``map_directions`` order, which is how the call finds a direction's map in ``maps``.
    """

    name = "linear_stitch"
    reads_target = False

    def __init__(self, trained_directions: Iterable[Direction] = ()):
        super().__init__(trained_directions)
        self.map_directions = list(self.trained_directions)
        self._slot = {d: i for i, d in enumerate(self.map_directions)}

    def evaluated_directions(self, directions):
        return list(self.map_directions)

    def own_maps(self, widths, k, seed):
        return nn.ModuleList([LinearStitch(widths[s], widths[t], k, seed=seed * 101 + 7 * s + t)
                              for s, t in self.map_directions])

    def __call__(self, maps, h_target, h_source, source, target, block):
        return maps[self._slot[(source, target)]](h_source)


INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls for cls in (Interchange, RankKStitch, LinearStitchIntervention)}


def make_intervention(name: str, trained_directions: Iterable[Direction] = ()) -> Intervention:
    """The registered intervention called `name` (``interchange``, ``stitch``, ``linear_stitch``)."""
    if name not in INTERVENTIONS:
        raise choice_error("intervention", name, tuple(INTERVENTIONS))
    return INTERVENTIONS[name](trained_directions)


# ----------------------------------------------------------------------------- the linear stitch's maps
def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class LowRankAffineMap:
    """Evaluated `LinearStitch`: h_s ↦ h_s A B + b, or h_s W + b when full rank."""

    kind = "linear_stitch"
    keeps_complement = False

    def __init__(self, left: Tensor, right: Tensor | None, bias: Tensor | None):
        self.left, self.right, self.bias = left, right, bias  # (d_s, r), (r, d_t) or None, (d_t,) or None
        self.d = left.shape[0]
        self.dim_out = left.shape[1] if right is None else right.shape[1]
        self.rank = min(self.d, self.dim_out) if right is None else right.shape[0]

    def forward(self, h_source: Tensor) -> Tensor:
        """(..., d_s) -> (..., d_t)."""
        if h_source.shape[-1] != self.d:
            raise ValueError(f"linear stitch expects source latents of width {self.d}, got {tuple(h_source.shape)}")
        out = h_source @ self.left  # (..., r) or (..., d_t)
        if self.right is not None:
            out = out @ self.right  # (..., d_t)
        return out if self.bias is None else out + self.bias

    __call__ = forward

    def matrix(self) -> Tensor:
        """(d_s, d_t) linear part."""
        return self.left if self.right is None else self.left @ self.right


class LinearStitch(nn.Module):
    """Unconstrained affine stitch h_s A B + b of rank <= k (A: d_s×k, B: k×d_t, b: d_t).

    k None or k >= min(d_s, d_t) gives one dense (d_s, d_t) matrix (full rank). Initialisation is seeded
    (the global RNG is not consumed): A, W ~ N(0, 1/d_s), B ~ N(0, 1/k) (variance-preserving), b = 0.
    """

    def __init__(self, d_source: int, d_target: int, k: int | None = None, *, bias: bool = True,
                 seed: int | None = None, dtype: torch.dtype = torch.float32):
        d_source, d_target = check_positive_int("d_source", d_source), check_positive_int("d_target", d_target)
        if k is not None:
            check_positive_int("k", k)
        super().__init__()
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.d, self.dim_out = d_source, d_target
        self.full_rank = k is None or k >= min(d_source, d_target)
        self.k = min(d_source, d_target) if self.full_rank else k

        def normal(*shape: int, fan_in: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator, dtype=dtype) / math.sqrt(fan_in))

        if self.full_rank:
            self.weight = normal(d_source, d_target, fan_in=d_source)  # (d_s, d_t)
            self.register_parameter("left", None)
            self.register_parameter("right", None)
        else:
            self.register_parameter("weight", None)
            self.left = normal(d_source, k, fan_in=d_source)  # (d_s, k)
            self.right = normal(k, d_target, fan_in=k)  # (k, d_t)
        if bias:
            self.bias = nn.Parameter(torch.zeros(d_target, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def materialize(self) -> LowRankAffineMap:
        if self.full_rank:
            return LowRankAffineMap(self.weight, None, self.bias)
        return LowRankAffineMap(self.left, self.right, self.bias)

    def forward(self, h_source: Tensor) -> Tensor:
        """(..., d_s) -> (..., d_t)."""
        return self.materialize()(h_source)

    def extra_repr(self) -> str:
        return (f"d_source={self.d}, d_target={self.dim_out}, k={self.k}, full_rank={self.full_rank}, "
                f"bias={self.bias is not None}")
