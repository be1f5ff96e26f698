"""Shared pieces of the numeric tasks: vocabulary, sequence batches and the `Task` interface.

A task owns its causal model. Everything is vectorised over rows with numpy; the only Python loops run
over positions or operations (at most ~100), never over the rows of a batch.

State conventions (all tasks): `states(batch)[v][r, p]` is the value of state variable `v` *after*
reading token `p` of row `r` (the latent at position p is the state after reading token p);
-1 where undefined (at and after EOS, on PAD).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llm_mas.errors import ConfigError, DataError, closest

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("P", "B", "E")  # strings of PAD, BOS, EOS


@dataclass(frozen=True)
class Vocab:
    """Token strings by id. Ids 0, 1, 2 are always PAD ("P"), BOS ("B"), EOS ("E")."""

    tokens: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens)
        if tokens[:3] != SPECIAL_TOKENS:
            raise ConfigError(f"vocabulary must start with {SPECIAL_TOKENS} (PAD, BOS, EOS), got {tokens[:3]}")
        if len(set(tokens)) != len(tokens):
            raise ConfigError(f"vocabulary has duplicate tokens: {tokens}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(tokens)})

    def id(self, tok: str) -> int:
        """Id of one token string; DataError naming the closest tokens if unknown."""
        try:
            return self._index[tok]
        except KeyError:
            raise DataError(
                f"unknown token {tok!r}; did you mean one of {closest(str(tok), self.tokens)}? "
                f"valid tokens: {' '.join(self.tokens)}"
            ) from None

    def encode(self, toks: str | Sequence[str]) -> np.ndarray:
        """Ids (int64) of a space-separated string or a sequence of token strings."""
        if isinstance(toks, str):
            toks = toks.split()
        return np.array([self.id(t) for t in toks], dtype=np.int64)

    def decode(self, ids) -> list[str]:
        """Token strings of a 1-D sequence of ids (PAD included, as "P")."""
        ids = np.asarray(ids).reshape(-1)
        bad = (ids < 0) | (ids >= len(self.tokens))
        if bad.any():
            raise DataError(f"token ids {sorted(set(ids[bad].tolist()))} out of range 0..{len(self.tokens) - 1}")
        return [self.tokens[i] for i in ids.tolist()]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class SequenceBatch:
    """A batch of task sequences, right padded with PAD.

    ids: (n, L) int64, ids[:, 0] == BOS; task_mask: (n, L) bool, True on task tokens (the tokens a model
    must produce itself: scored, generated in a rollout); lengths: (n,) non-pad tokens incl. BOS and EOS.
    """

    ids: np.ndarray
    task_mask: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.task_mask = np.asarray(self.task_mask, dtype=bool)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.ids.ndim != 2 or self.task_mask.shape != self.ids.shape or self.lengths.shape != self.ids.shape[:1]:
            raise DataError(
                f"SequenceBatch shapes do not fit: ids {self.ids.shape}, task_mask {self.task_mask.shape}, "
                f"lengths {self.lengths.shape}; expected (n, L), (n, L), (n,)"
            )
        if len(self.ids) and self.ids.shape[1] and not (self.ids[:, 0] == BOS).all():
            raise DataError("every sequence must start with BOS (id 1)")

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:  # never pickle the analysis cache (Task.analysis)
        return {k: v for k, v in self.__dict__.items() if k != "_analysis_cache"}

    @property
    def width(self) -> int:
        """L, the padded width."""
        return self.ids.shape[1]

    def subset(self, idx) -> SequenceBatch:
        """Rows `idx` (indices or boolean mask) as a new batch."""
        idx = np.asarray(idx)
        return SequenceBatch(self.ids[idx], self.task_mask[idx], self.lengths[idx])

    def pad_to(self, width: int) -> SequenceBatch:
        """The same batch right padded (with PAD / False) to `width` columns (never truncates)."""
        if width < self.width:
            raise DataError(f"cannot pad a batch of width {self.width} to the smaller width {width}")
        extra = width - self.width
        return SequenceBatch(
            np.pad(self.ids, ((0, 0), (0, extra))), np.pad(self.task_mask, ((0, 0), (0, extra))), self.lengths
        )


def _fingerprint(ids: np.ndarray) -> tuple:
    """Shape, dtype and a blake2b digest of the ids (cheap: ~1 ms per MB)."""
    ids = np.ascontiguousarray(ids)
    return ids.shape, str(ids.dtype), hashlib.blake2b(memoryview(ids).cast("B"), digest_size=16).digest()


def lengths_of(ids: np.ndarray) -> np.ndarray:
    """(n,) number of non-pad tokens of right-padded rows."""
    return (ids != PAD).sum(axis=1).astype(np.int64)


def pick_uniform(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n,) one column index per row drawn uniformly among the True entries of mask (n, L).

    Rows without any True entry get -1. One `rng.random(n)` draw, no row loop.
    """
    mask = np.asarray(mask, dtype=bool)
    counts = mask.sum(axis=1)  # (n,)
    u = np.floor(rng.random(len(mask)) * counts).astype(np.int64)  # (n,) rank of the chosen True entry
    rank = np.cumsum(mask, axis=1)  # (n, L)
    choice = np.argmax(rank > u[:, None], axis=1)
    return np.where(counts > 0, choice, -1)


def check_quantities(
    quantities: Sequence[int] | None, hold_outs: Sequence[int], lo: int, hi: int, what: str
) -> np.ndarray:
    """The allowed quantities (sorted, unique) = quantities (default lo..hi) minus hold_outs."""
    allowed = np.arange(lo, hi + 1) if quantities is None else np.unique(np.asarray(list(quantities), dtype=np.int64))
    bad = allowed[(allowed < lo) | (allowed > hi)]
    if len(bad):
        raise ConfigError(f"{what} {bad.tolist()} out of range; this task supports {lo}..{hi}")
    allowed = np.setdiff1d(allowed, np.asarray(list(hold_outs), dtype=np.int64))
    if len(allowed) == 0:
        raise ConfigError(
            f"no {what} left to sample: quantities {None if quantities is None else list(quantities)} "
            f"minus hold_outs {list(hold_outs)} is empty"
        )
    return allowed


class Task:
    """A numeric task: vocabulary, sampler and causal model.

    Public contract (see `llm_mas.tasks`): name, vocab, variables, state_variables, quantity_name, max_len,
    filler_token, sample, quantities, states, valid_positions, render. The methods starting with `cf_` are
    the causal-model hooks `llm_mas.tasks.pairs` builds counterfactuals with.
    """

    name: str
    vocab: Vocab
    variables: tuple[str, ...]
    state_variables: tuple[str, ...]
    quantity_name: str
    max_len: int
    filler_token: int
    # Whether a "full" swap sets every state variable that matters (besides row constants such as obj_count).
    # If False, stepwise "full" needs positions valid in both sequences (the target's own state is needed).
    full_swap_covers_state: bool = True

    # ---- public API -------------------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        rng: np.random.Generator,
        quantities: Sequence[int] | None = None,
        hold_outs: Sequence[int] = (),
    ) -> SequenceBatch:
        """`n` fresh sequences, the quantity N uniform over `quantities` (default 1..20) minus `hold_outs`."""
        raise NotImplementedError

    def quantities(self, batch: SequenceBatch) -> np.ndarray:
        """(n,) the quantity N of each row."""
        raise NotImplementedError

    def states(self, batch: SequenceBatch) -> dict[str, np.ndarray]:
        """{state variable: (n, L) int64} post-token values; -1 at/after EOS and on PAD (fresh copies)."""
        return {k: v.copy() for k, v in self.analysis(batch)["states"].items()}

    def valid_positions(self, batch: SequenceBatch) -> np.ndarray:
        """(n, L) bool: positions whose latent may be intervened on (a fresh copy)."""
        return self.analysis(batch)["valid"].copy()

    def analysis(self, batch: SequenceBatch) -> dict:
        """{"states": {...}, "valid": (n, L)} of a batch, cached on the batch (keyed by task and a hash of ids).

        The arrays are shared with the cache: treat them as read-only (states()/valid_positions() copy).
        """
        fingerprint = _fingerprint(batch.ids)
        cache = batch.__dict__.setdefault("_analysis_cache", {})
        hit = cache.get(self.name)
        if hit is None or hit[0] != fingerprint:  # first use, or ids changed in place since
            hit = cache[self.name] = (fingerprint, self._analyse(batch.ids))
        return hit[1]

    def _analyse(self, ids: np.ndarray) -> dict:
        """Compute {"states": {var: (n, L)}, "valid": (n, L) bool} for (n, L) ids."""
        raise NotImplementedError

    def render(self, ids_row) -> str:
        """Human-readable form of one row ("B D0 D2 T R R E"); trailing PAD dropped."""
        ids_row = np.asarray(ids_row).reshape(-1)
        n = len(ids_row)
        while n > 0 and ids_row[n - 1] == PAD:
            n -= 1
        return " ".join(self.vocab.decode(ids_row[:n]))

    def from_strings(self, seqs: Sequence[str]) -> SequenceBatch:
        """A batch from human-written sequences ("B D0 T R E"), task_mask computed by the causal model."""
        rows = [self.vocab.encode(s) for s in seqs]
        width = max((len(r) for r in rows), default=1)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return SequenceBatch(ids, self.task_mask_of(ids), lengths_of(ids))

    def task_mask_of(self, ids: np.ndarray) -> np.ndarray:
        """(n, L) bool: which tokens of natural sequences `ids` are task tokens."""
        raise NotImplementedError

    def variable_domain(self, variable: str) -> tuple[int, int]:
        """(lo, hi): values a swappable variable may take (cross-task swaps are restricted to it)."""
        raise NotImplementedError

    # ---- causal-model hooks used by pairs.py --------------------------------------------------------------
    def cf_row_constants(self, batch: SequenceBatch) -> dict[str, np.ndarray]:
        """{state variable: (n,)} variables fixed for a whole row (obj_count); never swapped."""
        return {}

    def cf_post_swap(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The causal model's post-intervention function (identity unless a task overrides it)."""
        return state

    def cf_continue(
        self,
        prefix_ids: np.ndarray,
        prefix_len: np.ndarray,
        state: dict[str, np.ndarray],
        reuse_ids: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Regenerate every sequence after its prefix from the post-swap causal state.

        prefix_ids (n, P): the first prefix_len[r] tokens of row r are kept; state: {var: (n,)} the causal
        state after the last prefix token (phase/stage -1 = terminal: nothing follows);
        reuse_ids (n, Lr): the target's original tokens: a given token the continuation needs at a position
        is copied from there when it is legal at that point, else drawn with rng.
        Returns (ids (n, L'), continuation task mask (n, L')); the mask is False on the prefix.
        """
        raise NotImplementedError
