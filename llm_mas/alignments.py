"""Alignment functions: one learnable invertible map per model into a shared aligned space.

An `Alignment` (nn.Module) owns the parameters; `materialize()` evaluates its parametrisation once
(one matrix exponential for `orthogonal`) and returns an `AlignmentMap`, a cheap object holding the
evaluated tensors that every use during one training step shares:

    alignment = make_alignment("orthogonal", d=128, seed=0)
    amap = alignment.materialize()          # once per step; differentiable
    z = amap.forward(h)                     # (..., 128) -> (..., 128)
    h_back = amap.inverse(z)                # == h

Every kind is affine, so an `AlignmentMap` is one class:

    forward:  z = ((h - mean) / std + bias) @ W         W: (d, dim_out)
    inverse:  h = (z @ W_inv - bias) * std + mean       W_inv: (dim_out, d)

with `mean`/`std` from the optional standardisation wrapper, `bias` from `linear`, and `W = None`
meaning the identity. Kinds (docs/method.md §2):

- `orthogonal` (default): W = Q square orthogonal (torch's `orthogonal` parametrisation of a bias-free
  Linear(d, d): matrix exponential of a skew-symmetric parameter), W_inv = Qᵀ.
- `low_rank`: W = U, k orthonormal columns (d, k); W_inv = Uᵀ projects back, discarding the complement.
- `gram_schmidt` (the paper's FCA): W = U from k free vectors orthonormalised by differentiable
  Gram–Schmidt; an interchange replaces the target's projection on span(U) and keeps the rest.
- `linear`: W = U diag(exp s) Vᵀ (U, V orthogonal), exact inverse V diag(exp -s) Uᵀ, optional bias.
- `identity`: no parameters (controls, golden tests).

Options: `orthogonal_map` ("matrix_exp" default, "cayley", "householder") for orthogonal/low_rank/linear;
`method` ("qr" default, "cgs2") for gram_schmidt; `bias` for linear. The matrix exponential's backward
dominates at LLM widths: materialize + backward at d = 1024 takes 1 544 ms of CPU against 132 ms for
"cayley" (11.7×, bench/alignment_cost.py).

`keeps_complement` says whether an intervention keeps the target's part outside the aligned space.
For the square kinds that part is zero (inverse(forward(h)) == h); for `gram_schmidt` it is
h − h U Uᵀ, added back by `llm_mas.interventions.intervene`; `low_rank` drops it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from llm_mas.errors import ConfigError, choice_error

ALIGNMENTS: dict[str, type[Alignment]] = {}

ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")
ORTHONORMALIZE_METHODS = ("qr", "cgs2")


def register_alignment(name: str) -> Callable[[type[Alignment]], type[Alignment]]:
    """Class decorator adding an `Alignment` subclass to `ALIGNMENTS` under `name` (sets `cls.kind`)."""

    def decorator(cls: type[Alignment]) -> type[Alignment]:
        if name in ALIGNMENTS:
            raise ConfigError(
                f"alignment kind {name!r} is already registered (by {ALIGNMENTS[name].__qualname__}); "
                "choose another name"
            )
        cls.kind = name
        ALIGNMENTS[name] = cls
        return cls

    return decorator


# ----------------------------------------------------------------------------------------------------
# The evaluated map


class AlignmentMap:
    """The evaluated (affine) alignment of one model: forward, inverse and cheap column slices.

    forward: z = ((h - mean) / std + bias) @ weight;  inverse: h = (z @ inverse_weight - bias) * std + mean.
    Any of weight/inverse_weight (identity), bias, mean/std may be None. Tensors keep their autograd
    history, so a loss computed through the map reaches the alignment's parameters.
    """

    def __init__(
        self,
        kind: str,
        d: int,
        dim_out: int,
        *,
        weight: Tensor | None = None,  # (d, dim_out)
        inverse_weight: Tensor | None = None,  # (dim_out, d)
        bias: Tensor | None = None,  # (d,), added in the standardised space
        mean: Tensor | None = None,  # (d,)
        std: Tensor | None = None,  # (d,)
        keeps_complement: bool = True,
    ):
        if (weight is None) != (inverse_weight is None):
            raise ValueError("weight and inverse_weight must both be given or both be None (identity)")
        if weight is None and dim_out != d:
            raise ValueError(f"an identity map needs dim_out == d, got d={d}, dim_out={dim_out}")
        if weight is not None and (tuple(weight.shape) != (d, dim_out)
                                   or tuple(inverse_weight.shape) != (dim_out, d)):
            raise ValueError(
                f"weight must be ({d}, {dim_out}) and inverse_weight ({dim_out}, {d}); got "
                f"{tuple(weight.shape)} and {tuple(inverse_weight.shape)}"
            )
        if (mean is None) != (std is None):
            raise ValueError("mean and std must both be given or both be None")
        self.kind, self.d, self.dim_out = kind, d, dim_out
        self.weight, self.inverse_weight = weight, inverse_weight
        self.bias, self.mean, self.std = bias, mean, std
        self.keeps_complement = keeps_complement

    def __repr__(self) -> str:
        extras = [name for name in ("bias", "mean") if getattr(self, name) is not None]
        return (f"AlignmentMap(kind={self.kind!r}, d={self.d}, dim_out={self.dim_out}, "
                f"keeps_complement={self.keeps_complement}{''.join(', ' + e for e in extras)})")

    @property
    def is_plain_identity(self) -> bool:
        """True when forward and inverse are exactly the identity (no matrix, shift or scale)."""
        return self.weight is None and self.bias is None and self.mean is None

    def with_standardization(self, mean: Tensor, std: Tensor) -> AlignmentMap:
        """This map applied to (h - mean) / std (and undone by the inverse)."""
        if self.mean is not None:
            raise ValueError("this map is already standardised")
        return AlignmentMap(self.kind, self.d, self.dim_out, weight=self.weight,
                            inverse_weight=self.inverse_weight, bias=self.bias, mean=mean, std=std,
                            keeps_complement=self.keeps_complement)

    # --- the affine pieces ---------------------------------------------------------------------
    def _standardize(self, h: Tensor) -> Tensor:  # (..., d) -> (..., d)
        x = h if self.mean is None else (h - self.mean) / self.std
        return x if self.bias is None else x + self.bias

    def _unstandardize(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        if self.bias is not None:
            x = x - self.bias
        return x if self.mean is None else x * self.std + self.mean

    def _check_width(self, t: Tensor, width: int, what: str) -> None:
        if t.shape[-1] != width:
            raise ValueError(
                f"{self.kind} alignment: {what} has last dimension {t.shape[-1]}, expected {width} "
                f"(shape {tuple(t.shape)})"
            )

    # --- public maps ---------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., dim_out): the latent in the aligned space."""
        self._check_width(h, self.d, "the latent")
        x = self._standardize(h)
        return x if self.weight is None else x @ self.weight

    __call__ = forward

    def inverse(self, z: Tensor) -> Tensor:
        """(..., dim_out) -> (..., d): back to the model's space (the complement is lost for low_rank)."""
        self._check_width(z, self.dim_out, "the aligned vector")
        x = z if self.weight is None else z @ self.inverse_weight
        return self._unstandardize(x)

    def encode(self, h: Tensor, block: slice) -> Tensor:
        """(..., d) -> (..., len(block)): forward(h)[..., block], computing only those columns."""
        self._check_width(h, self.d, "the latent")
        x = self._standardize(h)
        return x[..., block] if self.weight is None else x @ self.weight[:, block]  # (..., k)

    def decode_delta(self, dz: Tensor, block: slice) -> Tensor:
        """(..., len(block)) -> (..., d): the change of inverse(z) when z[..., block] changes by dz."""
        start, stop, _ = block.indices(self.dim_out)
        if self.weight is None:
            dx = F.pad(dz, (start, self.d - stop))  # (..., d), zeros outside the block
        else:
            dx = dz @ self.inverse_weight[block]  # (..., k) @ (k, d)
        return dx if self.std is None else dx * self.std

    def decode_block(self, z_block: Tensor, block: slice) -> Tensor:
        """(..., len(block)) -> (..., d): inverse(z) for z equal to z_block on `block` and 0 elsewhere."""
        start, stop, _ = block.indices(self.dim_out)
        if self.weight is None:
            x = F.pad(z_block, (start, self.d - stop))  # (..., d)
        else:
            x = z_block @ self.inverse_weight[block]  # (..., k) @ (k, d)
        return self._unstandardize(x)

    def complement(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., d): h − inverse(forward(h)), the part the aligned space does not see.

        Zero (up to rounding) for the square kinds; h − h U Uᵀ (in standardised units) for the
        k-column kinds. Interventions with `keeps_complement` add it back.
        """
        return h - self.inverse(self.forward(h))


# ----------------------------------------------------------------------------------------------------
# Helpers


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def random_orthogonal(d: int, generator: torch.Generator | None = None) -> Tensor:
    """(d, d) Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64 on CPU."""
    gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs  # (d, d), columns scaled by ±1


def gram_schmidt(vectors: Tensor) -> Tensor:
    """(k, d) -> (k, d): classical Gram–Schmidt applied twice per vector ("twice is enough").

    Row i of the result is the normalised part of vectors[i] orthogonal to rows < i. Differentiable;
    a Python loop over k, so meant for small k and as the reference for `orthonormalize(..., "qr")`.
    """
    rows: list[Tensor] = []
    for v in vectors.unbind(0):  # v: (d,)
        if rows:
            basis = torch.stack(rows)  # (i, d)
            for _ in range(2):  # re-orthogonalise: one pass loses orthogonality when v is nearly dependent
                v = v - (basis @ v) @ basis
        rows.append(v / torch.linalg.vector_norm(v))
    return torch.stack(rows)  # (k, d)


def orthonormalize(vectors: Tensor, method: str = "qr") -> Tensor:
    """(k, d) -> (k, d) orthonormal rows spanning the same nested subspaces as Gram–Schmidt.

    `qr`: Householder QR of vectorsᵀ with R's diagonal made positive, which is exactly the Gram–Schmidt
    result computed stably (and orthonormal even for ill-conditioned vectors); `cgs2`: `gram_schmidt`.
    """
    if method == "cgs2":
        return gram_schmidt(vectors)
    if method != "qr":
        raise choice_error("orthonormalization method", method, ORTHONORMALIZE_METHODS)
    q, r = torch.linalg.qr(vectors.mT, mode="reduced")  # q: (d, k), r: (k, k)
    signs = torch.sign(torch.diagonal(r)).detach()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).mT  # (k, d)


def _check_orthogonal_map(orthogonal_map: str | None) -> None:
    if orthogonal_map is not None and orthogonal_map not in ORTHOGONAL_MAPS:
        raise choice_error("orthogonal_map", orthogonal_map, ORTHOGONAL_MAPS)


class _HouseholderColumns(nn.Module):
    """Orthogonal parametrisation X (rows, columns) -> base @ H(X) with H a product of Householder
    reflectors built from X's strictly lower triangle; H(0) = the first `columns` columns of I.

    torch's own Householder map keeps column signs in X's diagonal read through `.int()`, so any change
    of that diagonal (weight decay, a perturbation) silently zeroes columns; here the diagonal is unused.
    """

    def __init__(self, base: Tensor):
        super().__init__()
        self.register_buffer("base", base.detach().clone())  # (rows, rows) orthogonal

    def forward(self, x: Tensor) -> Tensor:  # (rows, columns) -> (rows, columns)
        reflectors = x.tril(-1)
        tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
        return self.base @ -torch.linalg.householder_product(reflectors, tau)


def _orthogonal_linear(full: Tensor, columns: int, orthogonal_map: str | None) -> nn.Linear:
    """A bias-free Linear whose weight (rows, columns) is orthogonally parametrised to full[:, :columns].

    `full` is a (rows, rows) orthogonal matrix and becomes the trivialisation base, so the whole initial
    state is determined by it (torch would complete a tall matrix from the global RNG). Default map:
    torch's matrix exponential, also for tall weights (the first `columns` columns of exp(A)); torch's
    own default for tall weights, Householder, has a very slow backward (14 s at d=512, k=256 on CPU vs
    0.24 s), so "householder" is available only on request (`_HouseholderColumns`).
    """
    rows = full.shape[0]
    if orthogonal_map is None:
        orthogonal_map = "matrix_exp"
    with torch.random.fork_rng(devices=[]):  # keep the caller's global RNG stream untouched
        linear = nn.Linear(columns, rows, bias=False, dtype=full.dtype)  # weight: (rows, columns)
    if orthogonal_map == "householder":
        with torch.no_grad():
            linear.weight.zero_()  # H(0) @ base = full[:, :columns]
        parametrize.register_parametrization(linear, "weight", _HouseholderColumns(full), unsafe=True)
        return linear
    with torch.no_grad():
        linear.weight.copy_(full[:, :columns])
    with torch.random.fork_rng(devices=[]):
        parametrizations.orthogonal(linear, "weight", orthogonal_map=orthogonal_map)
    with torch.no_grad():
        linear.parametrizations.weight[0].base.copy_(full)
    return linear


# ----------------------------------------------------------------------------------------------------
# Alignment modules


class Alignment(nn.Module):
    """Base class: a learnable map of one model's latents (width d) into an aligned space (dim_out).

    Subclasses implement `materialize()`. Calling the module (`alignment(h)`) or `inverse(z)`
    materialises on every call — convenient for one-off use; in training call `materialize()` once
    per step and use the returned `AlignmentMap`.
    """

    kind: str = "base"
    # facts of the kind (read by the runner, the config checks and the baselines instead of kind names):
    # rank_k: the aligned space has exactly k coordinates (k is required; a run stacks one block per
    # variable, so it builds the alignment with k = k·(number of variables), and no null block fits);
    # isometric: the map preserves lengths on its aligned space (what the rank-k stitch needs)
    rank_k: bool = False
    isometric: bool = True

    def __init__(self, d: int, dim_out: int, k: int | None = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d, self.dim_out, self.k, self.seed, self.dtype = d, dim_out, k, seed, dtype

    @property
    def options(self) -> dict[str, Any]:
        """Kind-specific constructor options (for `spec`)."""
        return {}

    @property
    def spec(self) -> dict[str, Any]:
        """Everything `alignment_from_spec` needs (with the state_dict) to rebuild this alignment."""
        return {"kind": self.kind, "d": self.d, "k": self.k, "seed": self.seed,
                "dtype": str(self.dtype).removeprefix("torch."), "standardize": False, **self.options}

    def materialize(self) -> AlignmentMap:
        raise NotImplementedError

    def forward(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., dim_out), evaluating the parametrisation (use `materialize` in loops)."""
        return self.materialize().forward(h)

    def inverse(self, z: Tensor) -> Tensor:
        """(..., dim_out) -> (..., d), evaluating the parametrisation (use `materialize` in loops)."""
        return self.materialize().inverse(z)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"kind={self.kind!r}, d={self.d}, dim_out={self.dim_out}{k}"


@register_alignment("orthogonal")
class OrthogonalAlignment(Alignment):
    """A(h) = hQ, A⁻¹(z) = zQᵀ with Q (d, d) orthogonal: torch's orthogonal parametrisation of a
    bias-free Linear(d, d) (matrix exponential by default), random orthogonal initial Q from `seed`."""

    def __init__(self, d: int, *, k: int | None = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, orthogonal_map: str | None = None):
        _check_orthogonal_map(orthogonal_map)
        super().__init__(d, d, k, seed, dtype)
        self.orthogonal_map = orthogonal_map
        self.linear = _orthogonal_linear(random_orthogonal(d, _generator(seed)).to(dtype), d, orthogonal_map)

    @property
    def options(self) -> dict[str, Any]:
        return {"orthogonal_map": self.orthogonal_map}

    def materialize(self) -> AlignmentMap:
        q = self.linear.weight  # (d, d); evaluates the matrix exponential once
        return AlignmentMap(self.kind, self.d, self.d, weight=q, inverse_weight=q.mT, keeps_complement=True)


@register_alignment("low_rank")
class LowRankAlignment(Alignment):
    """A(h) = hU with U (d, k) orthonormal columns (orthogonal parametrisation of a d×k matrix: the
    first k columns of a matrix exponential by default); A⁻¹(z) = zUᵀ projects back, so the complement
    of span(U) is discarded (keeps_complement False)."""

    rank_k = True

    def __init__(self, d: int, *, k: int | None = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, orthogonal_map: str | None = None):
        _check_orthogonal_map(orthogonal_map)
        super().__init__(d, k, k, seed, dtype)
        self.orthogonal_map = orthogonal_map
        self.linear = _orthogonal_linear(random_orthogonal(d, _generator(seed)).to(dtype), k, orthogonal_map)

    @property
    def options(self) -> dict[str, Any]:
        return {"orthogonal_map": self.orthogonal_map}

    def materialize(self) -> AlignmentMap:
        u = self.linear.weight  # (d, k)
        return AlignmentMap(self.kind, self.d, self.k, weight=u, inverse_weight=u.mT, keeps_complement=False)


@register_alignment("gram_schmidt")
class GramSchmidtAlignment(Alignment):
    """The paper's FCA: k free vectors (k, d) orthonormalised by differentiable Gram–Schmidt at every
    `materialize()`; A(h) = hU, A⁻¹(z) = zUᵀ, and interventions keep the complement of span(U)."""

    rank_k = True

    def __init__(self, d: int, *, k: int | None = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, method: str = "qr"):
        if method not in ORTHONORMALIZE_METHODS:
            raise choice_error("gram_schmidt method", method, ORTHONORMALIZE_METHODS)
        super().__init__(d, k, k, seed, dtype)
        self.method = method
        initial = random_orthogonal(d, _generator(seed))[:, :k].mT  # (k, d), orthonormal rows
        self.vectors = nn.Parameter(initial.to(dtype).contiguous())

    @property
    def options(self) -> dict[str, Any]:
        return {"method": self.method}

    def materialize(self) -> AlignmentMap:
        u = orthonormalize(self.vectors, self.method).mT  # (d, k)
        return AlignmentMap(self.kind, self.d, self.k, weight=u, inverse_weight=u.mT, keeps_complement=True)


@register_alignment("linear")
class LinearAlignment(Alignment):
    """Invertible affine map A(h) = (h + b) W with W = U diag(exp s) Vᵀ (U, V orthogonal) and exact
    inverse A⁻¹(z) = z V diag(exp -s) Uᵀ − b. Starts as the orthogonal alignment of the same seed
    (V = I, s = 0, b = 0). Condition number of W = exp(max s − min s)."""

    isometric = False

    def __init__(self, d: int, *, k: int | None = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, bias: bool = True, orthogonal_map: str | None = None):
        _check_orthogonal_map(orthogonal_map)
        super().__init__(d, d, k, seed, dtype)
        self.orthogonal_map, self.use_bias = orthogonal_map, bias
        self.left = _orthogonal_linear(random_orthogonal(d, _generator(seed)).to(dtype), d, orthogonal_map)
        self.right = _orthogonal_linear(torch.eye(d, dtype=dtype), d, orthogonal_map)
        self.log_scale = nn.Parameter(torch.zeros(d, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(d, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def options(self) -> dict[str, Any]:
        return {"bias": self.use_bias, "orthogonal_map": self.orthogonal_map}

    def materialize(self) -> AlignmentMap:
        u, v = self.left.weight, self.right.weight  # (d, d) each
        weight = (u * torch.exp(self.log_scale)) @ v.mT  # U diag(e^s) Vᵀ
        inverse_weight = (v * torch.exp(-self.log_scale)) @ u.mT  # V diag(e^-s) Uᵀ
        return AlignmentMap(self.kind, self.d, self.d, weight=weight, inverse_weight=inverse_weight,
                            bias=self.bias, keeps_complement=True)


@register_alignment("identity")
class IdentityAlignment(Alignment):
    """A(h) = h: no parameters (controls and golden tests)."""

    def __init__(self, d: int, *, k: int | None = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(d, d, k, seed, dtype)

    def materialize(self) -> AlignmentMap:
        return AlignmentMap(self.kind, self.d, self.d, keeps_complement=True)


class StandardizedAlignment(Alignment):
    """A(h) = inner((h − mean) / std), A⁻¹(z) = inner⁻¹(z) · std + mean; mean/std are buffers (frozen)."""

    def __init__(self, inner: Alignment, mean: Tensor, std: Tensor):
        super().__init__(inner.d, inner.dim_out, inner.k, inner.seed, inner.dtype)
        self.kind = inner.kind
        self.rank_k, self.isometric = inner.rank_k, inner.isometric
        self.inner = inner
        self.register_buffer("mean", mean.detach().clone().to(inner.dtype))
        self.register_buffer("std", std.detach().clone().to(inner.dtype))

    @property
    def spec(self) -> dict[str, Any]:
        return {**self.inner.spec, "standardize": True}

    def materialize(self) -> AlignmentMap:
        return self.inner.materialize().with_standardization(self.mean, self.std)


# ----------------------------------------------------------------------------------------------------
# Construction


def _check_standardize(standardize: Any, d: int) -> tuple[Tensor, Tensor]:
    if not (isinstance(standardize, (tuple, list)) and len(standardize) == 2
            and all(isinstance(t, Tensor) for t in standardize)):
        raise ConfigError(f"standardize must be a pair of tensors (mean (d,), std (d,)), got {standardize!r}")
    mean, std = standardize
    for name, t in (("mean", mean), ("std", std)):
        if tuple(t.shape) != (d,):
            raise ConfigError(f"standardize {name} has shape {tuple(t.shape)}, expected ({d},) for d={d}")
        if not torch.isfinite(t).all():
            raise ConfigError(f"standardize {name} contains non-finite values; recompute it from finite latents")
    if not (std > 0).all():
        bad = int((std <= 0).sum())
        raise ConfigError(
            f"standardize std has {bad} entries <= 0 (min {float(std.min()):g}); "
            "add a floor such as std.clamp_min(1e-6)"
        )
    return mean, std


def make_alignment(kind: str = "orthogonal", d: int | None = None, *, k: int | None = None,
                   seed: int | None = None, standardize: tuple[Tensor, Tensor] | None = None,
                   dtype: torch.dtype = torch.float32, **kwargs: Any) -> Alignment:
    """Build an alignment of `kind` for latents of width `d`.

    k: block width; required by `low_rank`/`gram_schmidt` (their aligned width), recorded otherwise.
    seed: initial parameters are a function of it alone (the global RNG is not consumed).
    standardize: (mean (d,), std (d,)) per-feature statistics; composes with any kind.
    dtype: parameter dtype; the initial orthogonal matrices are drawn in float64 and rounded once,
    so float64 alignments are orthogonal to float64 precision (unlike `.double()` of a float32 one).
    kwargs: kind-specific options (orthogonal_map, method, bias); unknown ones are errors.
    """
    if kind not in ALIGNMENTS:
        raise choice_error("alignment kind", kind, ALIGNMENTS)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ConfigError(f"alignment width d must be a positive int, got {d!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d):
        raise ConfigError(f"k must be an int in [1, d={d}], got {k!r}")
    if ALIGNMENTS[kind].rank_k and k is None:
        raise ConfigError(f"alignment kind {kind!r} needs k (its aligned width), e.g. k={max(1, d // 2)}")
    cls = ALIGNMENTS[kind]
    valid = [name for name, p in inspect.signature(cls.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("k", "seed", "dtype")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for alignment kind {kind!r}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    alignment = cls(d, k=k, seed=seed, dtype=dtype, **kwargs)
    if standardize is not None:
        mean, std = _check_standardize(standardize, d)
        alignment = StandardizedAlignment(alignment, mean, std)
    return alignment


def alignment_from_spec(spec: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None) -> Alignment:
    """Rebuild an alignment from its `spec` (and load `state_dict`, required when standardised)."""
    options = dict(spec)
    standardized = bool(options.pop("standardize", False))
    kind, d = options.pop("kind"), options.pop("d")
    dtype = getattr(torch, options.pop("dtype", "float32"))
    placeholder = None
    if standardized:
        if state_dict is None:
            raise ConfigError("a standardised alignment needs its state_dict (mean and std live there)")
        placeholder = (torch.zeros(d), torch.ones(d))
    alignment = make_alignment(kind, d, standardize=placeholder, dtype=dtype, **options)
    if state_dict is not None:
        alignment.load_state_dict(state_dict)
    return alignment


def orthonormality_error(alignment_map: AlignmentMap) -> float:
    """max |WᵀW − I| (and |WWᵀ − I| when square): 0 for an exactly orthogonal map, nan for identity."""
    w = alignment_map.weight
    if w is None:
        return math.nan
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    err = (w.mT @ w - eye).abs().max()
    if w.shape[0] == w.shape[1]:
        err = torch.maximum(err, (w @ w.mT - eye).abs().max())
    return float(err.detach())
