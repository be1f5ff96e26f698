"""Counterfactual pair generation: (source -> target, variable) interchange datasets from causal models.

    pairs = make_pairs(task, target_base, task, source_base, "count", 10_000, rng)            # indywise
    pairs = make_pairs(task, target_base, task, source_base, "full", 1_000, rng, stepwise=True)
    pairs = make_pairs(counting, c_base, arith, a_base, ("count", "remaining_ops"), 1_000, rng)  # cross-task

Semantics (docs/method.md §7). The latent at position p is the causal state *after* reading token p. A pair
takes the source's post-token value(s) at `source_pos`, writes them into the target's post-token state at
`target_pos` (the task's post-intervention function applies, e.g. Modulo's mod 4), and lets the target's
causal model regenerate everything after `target_pos`.

- variable: a swappable variable of both tasks ("count", "phase", "remaining_ops", ...); "full" (every
  swappable variable; both tasks must have the same ones; row constants such as obj_count are never
  overwritten); "null" (nothing changes: the counterfactual is the target sequence itself); or a
  (target_variable, source_variable) tuple for cross-task alignment.
- Targets: rows arange(n) % len(target_base), shuffled with rng. Sources: drawn with replacement.
- Indywise: source_pos uniform over the source's valid positions, target_pos uniform over the target's,
  independently. ids[:, :target_pos + 1] is the target's own prefix, task mask included.
- Stepwise: one index i = target_pos = source_pos; every position 0..i of the target is intervened. For
  "full"/"null" i is uniform over the source's valid positions (positions valid in both sequences if the
  target's task needs its own state besides the swapped variables: Arithmetic); for a named variable
  uniform over the positions valid in both. The prefix 0..i is the target's tokens with EOS/PAD replaced
  by `target_task.filler_token`, and its task mask is all False.
- Given tokens of the continuation (demo tokens, operators, operands) are copied from the target where
  the target has a legal one at that position, else drawn with rng. So swapping a target's own state into
  itself reproduces the target exactly.
- Cross-task: source values outside the target variable's domain (`Task.variable_domain`) are never used
  (their positions are not sampled). value_range=(lo, hi) further restricts the sampled positions to those
  where the source value and the target's current value of the written variable both lie in [lo, hi]
  (only for named / tuple variables).
- Rows that cannot satisfy a restriction are redrawn (targets among eligible rows, sources with
  replacement); DataError if a restriction can never be met.

rng consumption order: target permutation, source rows, positions (target then source for indywise),
redraws, then the continuation's given tokens. Equal seeds give equal pair sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks.base import EOS, PAD, SequenceBatch, Task, pick_uniform

MAX_REDRAW_ROUNDS = 64


@dataclass
class PairSet:
    """One (source -> target, variable) intervention dataset; every array has n rows.

    ids (n, L): counterfactual target sequence (prefix + regenerated continuation), right padded;
    task_mask (n, L): its task tokens (prefix included; in stepwise the prefix is all False);
    target_index / source_index (n,): rows of the target / source base batch;
    target_pos / source_pos (n,): intervention positions (stepwise: positions 0..target_pos, source_pos == it);
    variable: "count", "full", "null", or "tv<-sv" for a cross-task tuple; stepwise: the mode;
    intended: {target state variable: (n,)} the target's causal state right after the swap at target_pos;
    swaps: the (target_variable, source_variable) pairs actually written (empty for "null").
    """

    ids: np.ndarray
    task_mask: np.ndarray
    target_index: np.ndarray
    target_pos: np.ndarray
    source_index: np.ndarray
    source_pos: np.ndarray
    variable: str
    stepwise: bool
    intended: dict[str, np.ndarray]
    swaps: tuple[tuple[str, str], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def width(self) -> int:
        """L, the padded width."""
        return self.ids.shape[1]

    @property
    def lengths(self) -> np.ndarray:
        """(n,) non-pad tokens of each counterfactual sequence."""
        return (self.ids != PAD).sum(axis=1)

    def scored_mask(self) -> np.ndarray:
        """(n, L) bool: task tokens after target_pos, the tokens the intervened target must get right."""
        pos = np.arange(self.width)[None, :]  # (1, L)
        return self.task_mask & (pos > self.target_pos[:, None])

    def subset(self, idx) -> PairSet:
        """Rows `idx` (indices or boolean mask) as a new pair set (same width)."""
        idx = np.asarray(idx)
        return PairSet(
            self.ids[idx], self.task_mask[idx], self.target_index[idx], self.target_pos[idx],
            self.source_index[idx], self.source_pos[idx], self.variable, self.stepwise,
            {k: v[idx] for k, v in self.intended.items()}, self.swaps,
        )

    def pad_to(self, width: int) -> PairSet:
        """The same pairs right padded to `width` columns (never truncates)."""
        if width < self.width:
            raise DataError(f"cannot pad a pair set of width {self.width} to the smaller width {width}")
        extra = ((0, 0), (0, width - self.width))
        return PairSet(
            np.pad(self.ids, extra), np.pad(self.task_mask, extra), self.target_index, self.target_pos,
            self.source_index, self.source_pos, self.variable, self.stepwise, self.intended, self.swaps,
        )


def resolve_variable(
    target_task: Task, source_task: Task, variable: str | tuple[str, str]
) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(kind, label, swaps): kind in {"null", "full", "named"}; swaps = (target_var, source_var) pairs."""
    same_vars = set(target_task.variables) == set(source_task.variables)
    if isinstance(variable, (tuple, list)):
        if len(variable) != 2 or not all(isinstance(v, str) for v in variable):
            raise ConfigError(f"a cross-task variable must be a (target_variable, source_variable) pair, got {variable!r}")
        tv, sv = variable
        problems = []
        if tv not in target_task.variables:
            problems.append(f"target variable {tv!r} is not a swappable variable of {target_task.name}; "
                            f"valid: {', '.join(target_task.variables)}")
        if sv not in source_task.variables:
            problems.append(f"source variable {sv!r} is not a swappable variable of {source_task.name}; "
                            f"valid: {', '.join(source_task.variables)}")
        if problems:
            raise ConfigError(problems)
        return "named", (tv if tv == sv else f"{tv}<-{sv}"), ((tv, sv),)
    if not isinstance(variable, str):
        raise ConfigError(f"variable must be a name or a (target_variable, source_variable) pair, got {variable!r}")
    if variable == "null":
        return "null", "null", ()
    if variable == "full":
        if not same_vars:
            raise ConfigError(
                f"'full' needs both tasks to have the same swappable variables; {target_task.name} has "
                f"{target_task.variables}, {source_task.name} has {source_task.variables}; name the pair "
                f"explicitly instead, e.g. {(target_task.variables[0], source_task.variables[0])!r}"
            )
        return "full", "full", tuple((v, v) for v in target_task.variables)
    if variable in target_task.variables and variable in source_task.variables:
        return "named", variable, ((variable, variable),)
    valid = sorted(set(target_task.variables) & set(source_task.variables)) + ["full", "null"]
    hint = "" if same_vars else (
        f"; across {source_task.name} -> {target_task.name} use a (target_variable, source_variable) tuple with "
        f"target variables {target_task.variables} and source variables {source_task.variables}"
    )
    raise ConfigError(f"unknown variable {variable!r} for {source_task.name} -> {target_task.name}; "
                      f"valid choices: {', '.join(valid)}{hint}")


def _in_range(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return (values >= lo) & (values <= hi)


def _fit(a: np.ndarray, width: int) -> np.ndarray:
    """(n, L) -> (n, width): cut or pad with zeros/False on the right."""
    if a.shape[1] >= width:
        return a[:, :width]
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def make_pairs(
    target_task: Task,
    target_base: SequenceBatch,
    source_task: Task,
    source_base: SequenceBatch,
    variable: str | tuple[str, str],
    n: int,
    rng: np.random.Generator,
    stepwise: bool = False,
    value_range: tuple[int, int] | None = None,
) -> PairSet:
    """`n` counterfactual pairs source -> target for `variable` (see the module docstring for semantics)."""
    kind, label, swaps = resolve_variable(target_task, source_task, variable)
    if int(n) != n or n < 0:
        raise ConfigError(f"number of pairs must be a non-negative integer, got {n!r}")
    n = int(n)
    if len(target_base) == 0 or len(source_base) == 0:
        raise DataError(f"empty base batch (target {len(target_base)} rows, source {len(source_base)} rows)")
    if value_range is not None:
        if kind != "named":
            raise ConfigError(f"value_range applies to one named variable (or a tuple), not to {label!r}")
        lo, hi = (int(v) for v in value_range)
        if lo > hi:
            raise ConfigError(f"value_range {tuple(value_range)} is empty: need lo <= hi")

    t_analysis, s_analysis = target_task.analysis(target_base), source_task.analysis(source_base)
    t_states, s_states = t_analysis["states"], s_analysis["states"]
    t_elig = t_analysis["valid"]  # (n_t, L_t)
    s_elig = s_analysis["valid"]  # (n_s, L_s)
    for tv, sv in swaps:
        lo_d, hi_d = target_task.variable_domain(tv)
        s_elig = s_elig & _in_range(s_states[sv], lo_d, hi_d)
        if value_range is not None:
            s_elig = s_elig & _in_range(s_states[sv], lo, hi)
            t_elig = t_elig & _in_range(t_states[tv], lo, hi)
    joint = stepwise and (kind == "named" or (kind == "full" and not target_task.full_swap_covers_state))
    if joint:  # one index for both: keep only positions some row of the other side can also use
        width = max(t_elig.shape[1], s_elig.shape[1])
        t_elig, s_elig = _fit(t_elig, width), _fit(s_elig, width)
        t_any, s_any = t_elig.any(axis=0), s_elig.any(axis=0)  # (L,)
        t_elig, s_elig = t_elig & s_any, s_elig & t_any
    t_rows = np.flatnonzero(t_elig.any(axis=1))
    s_rows = np.flatnonzero(s_elig.any(axis=1))
    what = f"{source_task.name} -> {target_task.name}, variable {label!r}, value_range {value_range}"
    if len(t_rows) == 0 or len(s_rows) == 0:
        raise DataError(f"no {'target' if len(t_rows) == 0 else 'source'} sequence has a position usable for {what}")

    target_index = rng.permutation(t_rows[np.arange(n) % len(t_rows)])  # (n,)
    source_index = s_rows[rng.integers(0, len(s_rows), size=n)]  # (n,)

    if not stepwise:
        target_pos = pick_uniform(t_elig[target_index], rng)
        source_pos = pick_uniform(s_elig[source_index], rng)
    elif not joint:
        source_pos = pick_uniform(s_elig[source_index], rng)
        target_pos = source_pos.copy()
    else:
        both = t_elig[target_index] & s_elig[source_index]  # (n, L)
        missing = np.flatnonzero(~both.any(axis=1))
        for _ in range(MAX_REDRAW_ROUNDS):
            if len(missing) == 0:
                break
            source_index[missing] = s_rows[rng.integers(0, len(s_rows), size=len(missing))]
            both[missing] = t_elig[target_index[missing]] & s_elig[source_index[missing]]
            missing = missing[~both[missing].any(axis=1)]
        for r in missing:  # rare: search every source for one sharing a position with this target
            ok = s_rows[(s_elig[s_rows] & t_elig[target_index[r]]).any(axis=1)]
            if len(ok) == 0:  # excluded by the filtering above; kept as a guard
                raise DataError(f"target row {target_index[r]} shares no usable position with any source ({what})")
            source_index[r] = ok[rng.integers(0, len(ok))]
            both[r] = t_elig[target_index[r]] & s_elig[source_index[r]]
        source_pos = pick_uniform(both, rng)
        target_pos = source_pos.copy()

    return build_pairs(
        target_task, target_base, source_task, source_base, variable, target_index, target_pos,
        source_index, source_pos, rng, stepwise=stepwise, _states=(t_states, s_states),
    )


def build_pairs(
    target_task: Task,
    target_base: SequenceBatch,
    source_task: Task,
    source_base: SequenceBatch,
    variable: str | tuple[str, str],
    target_index,
    target_pos,
    source_index,
    source_pos,
    rng: np.random.Generator,
    stepwise: bool = False,
    _states: tuple[dict, dict] | None = None,
) -> PairSet:
    """The counterfactuals for explicitly chosen rows and positions (make_pairs samples them first).

    No validity check of the positions beyond bounds (hand-made pairs may use any in-sequence position);
    in stepwise mode target_pos must equal source_pos.
    """
    kind, label, swaps = resolve_variable(target_task, source_task, variable)
    target_index = np.asarray(target_index, dtype=np.int64)
    source_index = np.asarray(source_index, dtype=np.int64)
    target_pos = np.asarray(target_pos, dtype=np.int64)
    source_pos = np.asarray(source_pos, dtype=np.int64)
    n = len(target_index)
    if not (len(source_index) == len(target_pos) == len(source_pos) == n):
        raise DataError("target_index, target_pos, source_index and source_pos must have the same length")
    if stepwise and not (target_pos == source_pos).all():
        raise DataError("stepwise pairs need target_pos == source_pos")
    if (source_pos < 0).any() or (source_pos >= source_base.width).any() or (target_pos < 0).any():
        raise DataError("a swap position is outside its sequence (negative or beyond the source width)")
    if not stepwise and (target_pos >= target_base.width).any():
        raise DataError("an indywise target position lies beyond the target width")
    if _states is None:
        _states = (target_task.analysis(target_base)["states"], source_task.analysis(source_base)["states"])
    t_states, s_states = _states

    target_ids = target_base.ids[target_index]  # (n, L_t)
    prefix_len = target_pos + 1
    width = int(max(prefix_len.max(initial=1), 1))
    prefix_ids = _fit(target_ids, width)  # (n, P)
    in_prefix = np.arange(width)[None, :] < prefix_len[:, None]  # (n, P)
    if stepwise:
        ended = (np.cumsum(prefix_ids == EOS, axis=1) > 0) | (prefix_ids == PAD)
        prefix_ids = np.where(ended & in_prefix, target_task.filler_token, prefix_ids)
        prefix_mask = np.zeros_like(in_prefix)
    else:
        prefix_mask = _fit(target_base.task_mask[target_index], width) & in_prefix
    prefix_ids = np.where(in_prefix, prefix_ids, PAD)

    # the target's post-token state at target_pos (-1 beyond its end), row constants always filled in
    inside = target_pos < target_base.width
    clipped = np.minimum(target_pos, target_base.width - 1)
    state = {v: np.where(inside, t_states[v][target_index, clipped], -1) for v in target_task.state_variables}
    state.update({k: v[target_index] for k, v in target_task.cf_row_constants(target_base).items()})
    for tv, sv in swaps:
        state[tv] = s_states[sv][source_index, source_pos]
    if swaps:
        state = target_task.cf_post_swap(state)

    ids, cont_mask = target_task.cf_continue(prefix_ids, prefix_len, state, target_ids, rng)
    task_mask = cont_mask | _fit(prefix_mask, ids.shape[1])
    return PairSet(
        ids=ids, task_mask=task_mask, target_index=target_index, target_pos=target_pos,
        source_index=source_index, source_pos=source_pos, variable=label, stepwise=bool(stepwise),
        intended={v: np.asarray(state[v], dtype=np.int64) for v in target_task.state_variables}, swaps=swaps,
    )
