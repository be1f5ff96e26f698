"""Generalized Procrustes analysis (hyperalignment): one orthogonal map per model into a shared space.

Activations alone, no behaviour: an n-model, correlative counterpart of MAS's learned orthogonal alignments
(docs/method.md), used next to linear CKA to read an n×n similarity matrix of many models.

    >>> from llm_mas.hyperalignment import generalized_procrustes, procrustes
    >>> fit = generalized_procrustes([X0, X1, X2])      # (n_rows, d_i) each, the same rows in every model
    >>> fit.similarity                                  # (3, 3), ones on the diagonal
    >>> fit.transform(1, X1_new)                        # model 1's latents in the shared space

Rows: row r of every input must be the latent of the same token of the same sequence (as for RSA/CKA,
``llm_mas.correlative.collect_rows``). Everything is computed in float64 with numpy.

Fit (Gower 1975; Haxby et al. 2011 call it hyperalignment):
1. each model's latents are centred (column means removed) and, with ``normalize=True`` (default), divided
   by their Frobenius norm, so every model weighs the same whatever the scale of its latents;
2. latents narrower than the widest model are zero-padded on the right to the common width w
   (``pad=False`` makes unequal widths an error instead);
3. start: ``init="sequential"`` maps model 0 by the identity and each later model by the orthogonal
   Procrustes map onto the mean of the models mapped before it (deterministic); ``init="random"`` fits from
   that start *and* from ``n_starts`` starts of Haar-random maps seeded by ``seed``, and keeps the fit with
   the lowest residual (random starts can stop at worse local optima);
4. repeat: template T = mean over models of X_i R_i; each R_i = the orthogonal Procrustes solution of
   X_i R ≈ T (SVD of X_iᵀT = UΣVᵀ, R_i = UVᵀ); stop when a round lowers the residual
   Σ_i ‖X_i R_i − T‖²_F by at most ``tol``·Σ_i ‖X_i‖²_F or after ``max_iter`` rounds. Each round cannot
   increase the residual. Two models are solved exactly instead, in one step: the residual is
   ‖X_0 R_0 − X_1 R_1‖²_F / 2, whose global minimum given R_0 is R_1 = the Procrustes map of X_1 onto
   X_0 R_0 (alternating rounds from a random start can stall at a map of the wrong determinant sign).
5. the maps are defined up to one rotation shared by all models; it is fixed by making model 0's map the
   identity (the shared space is model 0's padded latent space).

Similarity of models i and j in the shared space (``GPAResult.similarity``), for the centred (normalized)
latents X_i, X_j and their maps:

    s_ij = 1 − ‖X_i R_i − X_j R_j‖²_F / (‖X_i‖²_F + ‖X_j‖²_F) = 2⟨X_i R_i, X_j R_j⟩_F / (‖X_i‖²_F + ‖X_j‖²_F)

1 when one model's latents are an exact rotation (and, with ``normalize=True``, rescaling and translation)
of the other's; in [−1, 1]; with ``normalize=True`` it is the cosine between the two mapped matrices. It
measures how well a rotation into the shared space superimposes the two models, so unrelated latents still
score above 0: about sqrt(w / n_rows) for isotropic Gaussian noise (the maps have w(w−1)/2 free
parameters each) — use many more rows than the width. With two models GPA is ordinary Procrustes: the
relative map R_1 R_0ᵀ = R_1 is :func:`procrustes` of X_1 onto X_0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, DataError, choice_error
from .similarity import _as_rows

INITS = ("sequential", "random")


def procrustes(X: Any, Y: Any) -> np.ndarray:
    """The orthogonal R (d, d) minimising ‖X R − Y‖_F for (n, d) X and Y (no centring or scaling here).

    R = U Vᵀ from the SVD Xᵀ Y = U Σ Vᵀ (Schönemann 1966).
    """
    x, y = _as_rows(X, "X"), _as_rows(Y, "Y")
    if x.shape != y.shape:
        raise DataError(f"X has shape {x.shape} but Y {y.shape}; Procrustes needs the same rows and width "
                        f"(zero-pad the narrower one)")
    u, _, vt = np.linalg.svd(x.T @ y)  # (d, d) each
    return u @ vt


def _random_orthogonal(width: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random (width, width) orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(width, width)))
    return q * np.sign(np.diag(r))


@dataclass
class GPAResult:
    """A fitted generalized Procrustes alignment of n models.

    maps: (w, w) orthogonal map per model (model 0's is the identity); apply it to that model's centred,
        scaled, zero-padded latents (:meth:`transform` does all of it).
    means: (d_i,) column means removed from each model; scales: the Frobenius norm each centred input
        was divided by (1.0 with ``normalize=False``); widths: d_i.
    template: (n_rows, w) mean of the mapped training latents at the end.
    similarity: (n, n) s_ij of the module docstring; residuals: Σ_i ‖X_i R_i − T‖²_F at the start and after
        each round of the kept fit; start_residuals: the final residual of every start tried (the sequential
        one first, then each random one).
    """

    maps: list[np.ndarray]
    means: list[np.ndarray]
    scales: list[float]
    widths: list[int]
    template: np.ndarray
    similarity: np.ndarray
    iterations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    start_residuals: list[float] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.template.shape[1])

    def transform(self, index: int, X: Any) -> np.ndarray:
        """Latents (m, d_index) of model `index` in the shared space, (m, w): centred with the training
        means, scaled, zero-padded, then mapped."""
        if not 0 <= index < len(self.maps):
            raise ConfigError(f"model index {index} is outside 0..{len(self.maps) - 1}")
        x = _as_rows(X)
        if x.shape[1] != self.widths[index]:
            raise DataError(f"model {index} was fitted on width {self.widths[index]} but X has {x.shape[1]} "
                            f"columns")
        return _pad((x - self.means[index]) / self.scales[index], self.width) @ self.maps[index]


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    """(n, d) → (n, width) with zero columns on the right."""
    if x.shape[1] == width:
        return x
    out = np.zeros((x.shape[0], width))
    out[:, :x.shape[1]] = x
    return out


def _check_integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")


def generalized_procrustes(latents: Sequence[Any], *, normalize: bool = True, pad: bool = True,
                           init: str = "sequential", seed: int = 0, n_starts: int = 1, tol: float = 1e-12,
                           max_iter: int = 200) -> GPAResult:
    """Fit one orthogonal map per model into a shared space (the algorithm of the module docstring).

    Args:
        latents: n ≥ 2 arrays (numpy, torch or lists) of shape (n_rows, d_i), the same rows in every model.
        normalize: divide each centred input by its Frobenius norm (models weigh the same).
        pad: zero-pad narrower models to the widest width; False: unequal widths are an error.
        init: ``"sequential"`` (deterministic start) or ``"random"``: also `n_starts` starts from Haar-random
            maps drawn from `seed`; the fit with the lowest residual is kept (the sequential one unless a random
            start ends lower by more than round-off), so a random start never reports a worse optimum.
        n_starts: random starts with ``init="random"`` (ignored with ``"sequential"``).
        tol: stop when a round lowers the residual by ≤ tol·Σ_i‖X_i‖²; max_iter: rounds at most
            (``converged`` says which stop it was).

    Deterministic: the same inputs and arguments give the same maps bit for bit.
    """
    if init not in INITS:
        raise choice_error("GPA init", init, INITS)
    _check_integer("max_iter", max_iter, 1)
    _check_integer("n_starts", n_starts, 1)
    if not tol >= 0:
        raise ConfigError(f"tol={tol!r} must be >= 0, e.g. 1e-12")
    if len(latents) < 2:
        raise ConfigError(f"got {len(latents)} model(s); generalized Procrustes aligns at least two")
    raw = [_as_rows(x, f"latents[{i}]") for i, x in enumerate(latents)]
    rows = {x.shape[0] for x in raw}
    if len(rows) != 1:
        raise DataError(f"the models have different numbers of rows {[x.shape[0] for x in raw]}; row r must be "
                        f"the same token position in every model (llm_mas.correlative.collect_rows)")
    widths = [x.shape[1] for x in raw]
    if len(set(widths)) > 1 and not pad:
        raise DataError(f"the models have different widths {widths}; pass pad=True to zero-pad them to "
                        f"{max(widths)}")
    width = max(widths)
    means = [x.mean(axis=0) for x in raw]  # (d_i,) each
    centred = [x - m for x, m in zip(raw, means)]
    norms = [float(np.linalg.norm(c)) for c in centred]
    for i, (c, x) in enumerate(zip(norms, raw)):
        if c <= 1e-12 * max(float(np.linalg.norm(x)), 1e-300):
            raise DataError(f"latents[{i}] is constant over these rows; pass rows that differ")
    scales = norms if normalize else [1.0] * len(raw)
    xs = [_pad(c / s, width) for c, s in zip(centred, scales)]  # (n_rows, w) each
    n_models = len(xs)

    # Every quantity of the iteration is a function of the cross products C_ij = X_iᵀX_j (w × w): the template
    # never needs materialising, so a round costs O(n²w³) whatever the number of rows.
    cross = [[None] * n_models for _ in range(n_models)]
    for i in range(n_models):
        for j in range(i, n_models):
            cross[i][j] = xs[i].T @ xs[j]  # (w, w)
            cross[j][i] = cross[i][j].T
    total = float(sum(np.trace(cross[i][i]) for i in range(n_models)))  # Σ_i ‖X_i‖²

    def polar(matrix: np.ndarray) -> np.ndarray:  # the orthogonal factor U Vᵀ of M = U Σ Vᵀ
        u, _, vt = np.linalg.svd(matrix)
        return u @ vt

    def residual(maps: list[np.ndarray]) -> float:  # Σ_i ‖X_i R_i − T‖² = Σ_i ‖X_i‖² − n‖T‖²
        template_sq = sum(float(np.sum(maps[i] * (cross[i][j] @ maps[j])))
                          for i in range(n_models) for j in range(n_models)) / n_models ** 2
        return max(total - n_models * template_sq, 0.0)

    def iterate(maps: list[np.ndarray]) -> tuple[list[np.ndarray], list[float], bool, int]:
        """Alternate template and Procrustes updates from `maps` → (maps, residuals, converged, rounds)."""
        residuals, converged, iterations = [residual(maps)], False, 0
        if n_models == 2:
            # Two models: the residual is ‖X_0 R_0 − X_1 R_1‖²/2, and given R_0 its global minimum over R_1 is
            # the Procrustes map onto X_0 R_0. One exact step; alternating updates from a random start can stall
            # at a map of the other determinant sign (a worse local optimum) and stop there.
            maps = [maps[0], polar(cross[1][0] @ maps[0])]
            residuals.append(residual(maps))
            return maps, residuals, True, 1
        while iterations < max_iter:
            iterations += 1
            # R_i = Procrustes of X_i onto T = mean_j X_j R_j: polar factor of X_iᵀT ∝ Σ_j C_ij R_j
            maps = [polar(sum(cross[i][j] @ maps[j] for j in range(n_models))) for i in range(n_models)]
            residuals.append(residual(maps))
            if residuals[-2] - residuals[-1] <= tol * total:
                converged = True
                break
        return maps, residuals, converged, iterations

    # model 0 as is, each later model onto the mean of those before it: R_i = polar(X_iᵀ Σ_{j<i} X_j R_j)
    sequential = [np.eye(width)]
    for i in range(1, n_models):
        sequential.append(polar(sum(cross[i][j] @ sequential[j] for j in range(i))))
    maps, residuals, converged, iterations = iterate(sequential)
    start_residuals = [residuals[-1]]
    if init == "random":
        # Each random start may stop at a worse local optimum than the sequential one: keep the lowest residual,
        # and the sequential fit unless a random start beats it by more than round-off.
        rng = np.random.default_rng(seed)
        for _ in range(n_starts):
            fit = iterate([_random_orthogonal(width, rng) for _ in xs])
            start_residuals.append(fit[1][-1])
            if fit[1][-1] < residuals[-1] - 1e-12 * total:
                maps, residuals, converged, iterations = fit
    # fix the rotation shared by every map: model 0's map becomes the identity
    gauge = maps[0].T  # (w, w)
    maps = [r @ gauge for r in maps]
    template = sum(x @ r for x, r in zip(xs, maps)) / n_models  # (n_rows, w)
    inner = np.array([[float(np.sum(maps[i] * (cross[i][j] @ maps[j]))) for j in range(n_models)]
                      for i in range(n_models)])  # (n, n) ⟨X_i R_i, X_j R_j⟩ = tr(R_iᵀ C_ij R_j)
    squared = np.array([float(np.trace(cross[i][i])) for i in range(n_models)])  # (n,) ‖X_i‖²
    similarity = 2.0 * inner / (squared[:, None] + squared[None, :])
    np.fill_diagonal(similarity, 1.0)
    return GPAResult(maps=maps, means=means, scales=[float(s) for s in scales], widths=widths,
                     template=template, similarity=similarity, iterations=iterations, converged=converged,
                     residuals=residuals, start_residuals=start_residuals)


__all__ = ["GPAResult", "INITS", "generalized_procrustes", "procrustes"]
