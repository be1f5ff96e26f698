"""Variable binding, a language template task with its own causal model: `a = 3 , b = 5 ; ? b 5`.

A sequence binds N distinct variable names (N = n_vars, 1..6, names from a..h) to values 0..9, then asks
for one of them ('?' then the name); the answer, right after the queried name, is the value bound to it:

    B a = 3 , b = 5 , c = 1 ; ? b 5 E          (length 4·N + 5; text: "<bos> a = 3 , b = 5 , c = 1 ; ? b 5 <eos>")

The question mark comes before the name so that the answer is predicted at the queried name itself: a
lookup keyed on the current token (find the binding of this name, copy its value). Small LMs learn it in
1 500-3 400 steps with `train_lm`'s curriculum and extra questions (3 of the 5 seeds tried). With the
name first (`; b ? 5`) the answer is predicted at '?', the query name has to be moved there first, and
no LM we trained (GPT-2 and Llama, 2-4 layers, up to 30 000 steps, curricula, extra queries) got beyond
guessing among the bound values.

Given tokens: B, names, '=', values, ',', ';', '?' and the query name. Task tokens: the answer and E.
Vocabulary: P=0 B=1 E=2, names a..h = 3..10, values "0".."9" = 11..20, "=" 21, "," 22, ";" 23, "?" 24.

Causal model. State after each token (-1 where undefined, i.e. at/after E and on PAD):
- stage: 0 after B, 1 after a binding's name, 2 after '=', 3 after its value, 4 after ',', 5 after ';',
  6 after '?', 7 after the query name, 8 after the answer;
- current: the name (0..7) being bound (stages 1-3); value: the value just bound (stage 3 only);
- bind_a .. bind_h: the value bound to each name so far (-1 unbound); query: the queried name (stages 7-8).
Emission: the answer is bind[query], then E.
Swappable variable: `value` (domain 0..9). Valid intervention positions: the value tokens (stage 3). The
post-intervention function writes the swapped value into bind[current]; so swapping the value of the
queried variable's binding changes the answer to the source's value, swapping any other binding's value
leaves the answer unchanged. The target's bindings are needed besides the swapped variable, so stepwise
"full" uses positions valid in both sequences (`full_swap_covers_state = False`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks.base import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SequenceBatch,
    Task,
    Vocab,
    check_quantities,
    pick_uniform,
)

NAMES = tuple("abcdefgh")
N_VALUES = 10
MIN_VARS, MAX_VARS = 1, 6
NAME0 = 3  # id of "a"
VALUE0 = NAME0 + len(NAMES)  # id of "0"
EQUALS, COMMA, SEMICOLON, QUESTION = VALUE0 + N_VALUES, VALUE0 + N_VALUES + 1, VALUE0 + N_VALUES + 2, VALUE0 + N_VALUES + 3
UNDEF = -1
(S_START, S_NAME, S_EQUALS, S_VALUE, S_COMMA, S_SEMICOLON, S_QUESTION, S_QUERY, S_ANSWER) = range(9)
BIND_VARIABLES = tuple(f"bind_{name}" for name in NAMES)


class BindingTask(Task):
    """The variable-binding task (see the module docstring)."""

    name = "binding"
    variables = ("value",)
    state_variables = ("stage", "current", "value", "query") + BIND_VARIABLES
    quantity_name = "n_vars"
    quantity_range = (MIN_VARS, MAX_VARS)
    max_len = 4 * MAX_VARS + 5
    filler_token = COMMA
    full_swap_covers_state = False

    def __init__(self) -> None:
        values = tuple(str(v) for v in range(N_VALUES))
        self.vocab = Vocab(SPECIAL_TOKENS + NAMES + values + ("=", ",", ";", "?"))
        assert self.vocab.id("a") == NAME0 and self.vocab.id("0") == VALUE0 and self.vocab.id("?") == QUESTION

    def __repr__(self) -> str:
        return "BindingTask()"

    # ---- sampling ------------------------------------------------------------------------------------------
    def sample(self, n, rng, quantities=None, hold_outs=()) -> SequenceBatch:
        allowed = check_quantities(quantities, hold_outs, MIN_VARS, MAX_VARS, "n_vars values")
        if n < 0:
            raise ConfigError(f"number of samples must be >= 0, got {n}")
        n_vars = allowed[rng.integers(0, len(allowed), size=n)]  # (n,)
        names = np.argsort(rng.random((n, len(NAMES))), axis=1)[:, :MAX_VARS]  # (n, 6) distinct names
        values = rng.integers(0, N_VALUES, size=(n, MAX_VARS))  # (n, 6)
        query_slot = np.floor(rng.random(n) * n_vars).astype(np.int64)  # (n,) uniform over the bound slots
        rows = np.arange(n)
        pos = np.arange(self.max_len)[None, :]  # (1, L)
        slot = np.maximum(pos - 1, 0) // 4  # (1, L) binding slot of a position
        off = np.maximum(pos - 1, 0) % 4  # (1, L) name, '=', value, separator
        nv = n_vars[:, None]
        slot_b = np.broadcast_to(np.minimum(slot, MAX_VARS - 1), (n, self.max_len))
        in_bindings = (pos >= 1) & (slot < nv)
        ids = np.full((n, self.max_len), PAD, dtype=np.int64)
        ids[:, 0] = BOS
        ids = np.where(in_bindings & (off == 0), NAME0 + names[rows[:, None], slot_b], ids)
        ids = np.where(in_bindings & (off == 1), EQUALS, ids)
        ids = np.where(in_bindings & (off == 2), VALUE0 + values[rows[:, None], slot_b], ids)
        ids = np.where(in_bindings & (off == 3), np.where(slot == nv - 1, SEMICOLON, COMMA), ids)
        q = 4 * nv + 1  # (n, 1) column of '?'
        ids = np.where(pos == q, QUESTION, ids)
        ids = np.where(pos == q + 1, NAME0 + names[rows, query_slot][:, None], ids)
        ids = np.where(pos == q + 2, VALUE0 + values[rows, query_slot][:, None], ids)
        ids = np.where(pos == q + 3, EOS, ids)
        task_mask = (pos == q + 2) | (pos == q + 3)
        return SequenceBatch(ids, task_mask, 4 * n_vars + 5)

    # ---- the causal model, vectorised over rows ----------------------------------------------------------------
    @staticmethod
    def _initial_state(n: int) -> dict[str, np.ndarray]:
        """The state after reading BOS."""
        state = {"stage": np.full(n, S_START), "current": np.full(n, UNDEF), "value": np.full(n, UNDEF),
                 "query": np.full(n, UNDEF)}
        state.update({b: np.full(n, UNDEF) for b in BIND_VARIABLES})
        return {k: v.astype(np.int64) for k, v in state.items()}

    @staticmethod
    def _bindings(state) -> np.ndarray:
        return np.stack([state[b] for b in BIND_VARIABLES], axis=1)  # (n, 8)

    def _transition(self, state: dict[str, np.ndarray], tok: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Read one token per row: (new state, legal (n,) bool). Terminal rows stay terminal (PAD is legal)."""
        stage = state["stage"]
        binds = self._bindings(state)  # (n, 8)
        rows = np.arange(len(tok))
        is_name = (tok >= NAME0) & (tok < NAME0 + len(NAMES))
        is_value = (tok >= VALUE0) & (tok < VALUE0 + N_VALUES)
        name = np.where(is_name, tok - NAME0, 0)
        bound = binds[rows, name] >= 0
        legal = np.select(
            [stage == S_START, stage == S_NAME, stage == S_EQUALS, stage == S_VALUE, stage == S_COMMA,
             stage == S_SEMICOLON, stage == S_QUESTION, stage == S_QUERY, stage == S_ANSWER],
            [is_name, tok == EQUALS, is_value, (tok == COMMA) | (tok == SEMICOLON), is_name & ~bound,
             tok == QUESTION, is_name & bound, is_value, tok == EOS],
            tok == PAD)
        new_stage = np.select(
            [stage == S_START, stage == S_NAME, stage == S_EQUALS, (stage == S_VALUE) & (tok == COMMA),
             stage == S_VALUE, stage == S_COMMA, stage == S_SEMICOLON, stage == S_QUESTION, stage == S_QUERY],
            [S_NAME, S_EQUALS, S_VALUE, S_COMMA, S_SEMICOLON, S_NAME, S_QUESTION, S_QUERY, S_ANSWER], UNDEF)
        new = dict(state)
        new["stage"] = new_stage
        new["current"] = np.where(np.isin(new_stage, (S_NAME, S_EQUALS, S_VALUE)),
                                  np.where(is_name & np.isin(stage, (S_START, S_COMMA)), name, state["current"]), UNDEF)
        new["value"] = np.where(new_stage == S_VALUE, tok - VALUE0, UNDEF)
        writes = new_stage == S_VALUE
        for j, b in enumerate(BIND_VARIABLES):
            kept = np.where(writes & (new["current"] == j), tok - VALUE0, state[b])
            new[b] = np.where(new_stage == UNDEF, UNDEF, kept)
        new["query"] = np.where(np.isin(new_stage, (S_QUERY, S_ANSWER)),
                                np.where(stage == S_QUESTION, name, state["query"]), UNDEF)
        return {k: v.astype(np.int64) for k, v in new.items()}, legal

    def _read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Post-token states {var: (n, L)} of natural sequences; DataError naming the first malformed row."""
        ids = np.asarray(ids, dtype=np.int64)
        n, width = ids.shape
        states = {k: np.full((n, width), UNDEF, dtype=np.int64) for k in self.state_variables}
        if width == 0:
            return states
        if not (ids[:, 0] == BOS).all():
            raise DataError(f"row {int(np.flatnonzero(ids[:, 0] != BOS)[0])}: a binding sequence starts with B")
        state = self._initial_state(n)
        for k in self.state_variables:
            states[k][:, 0] = state[k]
        for p in range(1, width):
            state, legal = self._transition(state, ids[:, p])
            if not legal.all():
                r = int(np.flatnonzero(~legal)[0])
                raise DataError(f"not a binding sequence (row {r}, position {p}): {self.render(ids[r])!r}; expected "
                                "'B <name> = <value> (, <name> = <value>)... ; ? <bound name> <value> E'")
            for k in self.state_variables:
                states[k][:, p] = state[k]
        ended = (np.cumsum(ids == EOS, axis=1) > 0) | (ids == PAD)
        return {k: np.where(ended, UNDEF, v) for k, v in states.items()}

    def quantities(self, batch) -> np.ndarray:
        stage = self.analysis(batch)["states"]["stage"]
        return (stage == S_VALUE).sum(axis=1).astype(np.int64)

    def _analyse(self, ids: np.ndarray) -> dict:
        states = self._read(ids)
        return {"states": states, "valid": states["stage"] == S_VALUE}

    def task_mask_of(self, ids: np.ndarray) -> np.ndarray:
        stage = self._read(ids)["stage"]
        ids = np.asarray(ids)
        after_question = np.cumsum(ids == QUESTION, axis=1) > 0
        first_eos = np.cumsum(np.cumsum(ids == EOS, axis=1) > 0, axis=1) == 1
        return after_question & (ids != QUESTION) & ((stage == S_ANSWER) | first_eos)

    def variable_domain(self, variable: str) -> tuple[int, int]:
        if variable == "value":
            return (0, N_VALUES - 1)
        raise ConfigError(f"binding has no swappable variable {variable!r}; valid: {', '.join(self.variables)}")

    # ---- causal-model hooks ----------------------------------------------------------------------------------
    def cf_post_swap(self, state):
        """At a value position the swapped value is what gets bound to the current name."""
        state = dict(state)
        at_value = (np.asarray(state["stage"]) == S_VALUE) & (np.asarray(state["current"]) >= 0)
        for j, b in enumerate(BIND_VARIABLES):
            state[b] = np.where(at_value & (state["current"] == j), state["value"], state[b])
        return state

    def cf_continue(self, prefix_ids, prefix_len, state, reuse_ids, rng):
        """Run the causal model on from each row's state, one token per column (<= 4·8 + 5 columns).

        Given tokens are the target's (reuse_ids) where legal, else drawn: a fresh name among the unbound
        ones, a uniform value, ';' for a separator that is not legal, a query among the bound names.
        """
        n = len(prefix_len)
        start = np.asarray(prefix_len, dtype=np.int64)
        state = {k: np.asarray(state[k], dtype=np.int64).copy() for k in self.state_variables}
        live = state["stage"] >= 0
        binds = self._bindings(state)
        if (live & (state["stage"] >= S_QUERY) & ((state["query"] < 0) | (binds[np.arange(n), np.maximum(
                state["query"], 0)] < 0))).any():
            raise DataError("binding state has a query without a bound value")
        max_width = int(start.max(initial=0)) + 4 * len(NAMES) + 5
        width = max(max_width, prefix_ids.shape[1], 1)
        ids = np.zeros((n, width), dtype=np.int64)
        ids[:, : prefix_ids.shape[1]] = prefix_ids
        ids = np.where(np.arange(width)[None, :] < start[:, None], ids, PAD)
        mask = np.zeros((n, width), dtype=bool)
        reuse = np.zeros((n, width), dtype=np.int64)
        k = min(width, reuse_ids.shape[1])
        reuse[:, :k] = reuse_ids[:, :k]
        rows = np.arange(n)
        col = start.copy()
        for _ in range(width):
            stage = state["stage"]
            active = (stage >= 0) & (col < width)
            if not active.any():
                break
            c = np.minimum(col, width - 1)
            old = reuse[rows, c]
            binds = self._bindings(state)  # (n, 8)
            unbound, bound = binds < 0, binds >= 0
            old_name = np.clip(old - NAME0, 0, len(NAMES) - 1)
            old_is_name = (old >= NAME0) & (old < NAME0 + len(NAMES))
            fresh_name = NAME0 + np.maximum(pick_uniform(unbound, rng), 0)
            fresh_query = NAME0 + np.maximum(pick_uniform(bound, rng), 0)
            new_binding = np.where(old_is_name & unbound[rows, old_name], old, fresh_name)
            query = np.where(old_is_name & bound[rows, old_name], old, fresh_query)
            value = np.where((old >= VALUE0) & (old < VALUE0 + N_VALUES), old, VALUE0 + rng.integers(0, N_VALUES, n))
            separator = np.where((old == COMMA) & (unbound.sum(axis=1) > 0), COMMA, SEMICOLON)
            answer = VALUE0 + binds[rows, np.maximum(state["query"], 0)]
            tok = np.select(
                [stage == S_START, stage == S_NAME, stage == S_EQUALS, stage == S_VALUE, stage == S_COMMA,
                 stage == S_SEMICOLON, stage == S_QUESTION, stage == S_QUERY, stage == S_ANSWER],
                [new_binding, np.full(n, EQUALS), value, separator, new_binding, np.full(n, QUESTION), query, answer,
                 np.full(n, EOS)], PAD)
            tok = np.where(active, tok, PAD)
            ids[rows[active], c[active]] = tok[active]
            mask[rows[active], c[active]] = np.isin(stage[active], (S_QUERY, S_ANSWER))
            state, legal = self._transition(state, tok)
            if not legal[active].all():  # cannot happen for states the causal model produced itself
                r = int(np.flatnonzero(active & ~legal)[0])
                raise DataError(f"binding: no legal continuation from the state of row {r} (stage {stage[r]})")
            col = col + active
        used = max(int(col.max(initial=1)), prefix_ids.shape[1], 1)  # drop the all-PAD columns on the right
        return ids[:, :used], mask[:, :used]


_BINDING: BindingTask | None = None


def binding() -> BindingTask:
    """The (shared) binding task instance."""
    global _BINDING
    if _BINDING is None:
        _BINDING = BindingTask()
    return _BINDING


def get_text_task(name: str) -> Task:
    """A task by name (`llm_mas.tasks.get_task`, registered tasks included) or "binding"."""
    from llm_mas.errors import choice_error
    from llm_mas.tasks import get_task, task_names

    key = str(name).strip().lower()
    if key == "binding":
        return binding()
    if key not in task_names():
        raise choice_error("task", name, (*task_names(), "binding"))
    return get_task(key)


# ---- counterfactual datasets at the queried name -----------------------------------------------------------
CF_MODES = ("answer", "query")


def query_counterfactual_labels(base_ids: np.ndarray, source_ids: np.ndarray, mode: str) -> np.ndarray:
    """(n,) the value (0..9) the causal model answers after intervening at the queried name of each base.

    base_ids / source_ids (n, L): binding sequences (at least up to the name after '?', where the answer is
    predicted). The causal model's state there (stage 7) holds the bindings and the query. ``answer`` swaps
    the retrieved value: the answer becomes the source's answer, bind[query] of the source. ``query`` swaps
    the queried name: the answer becomes the base's binding of the source's query name (-1 where the base
    does not bind that name).
    """
    if mode not in CF_MODES:
        raise ConfigError(f"unknown binding counterfactual mode {mode!r}; valid choices: {', '.join(CF_MODES)}")
    task = binding()
    states = []
    for ids in (base_ids, source_ids):
        ids = np.asarray(ids, dtype=np.int64)
        state = task._read(ids)
        rows = np.arange(len(ids))
        is_question = ids == QUESTION  # (n, L)
        has_question = is_question.any(axis=1)
        at = np.argmax(is_question, axis=1) + 1  # (n,) column of the queried name
        if not has_question.all() or (at >= ids.shape[1]).any():
            bad = int(np.flatnonzero(~has_question | (at >= ids.shape[1]))[0])
            raise DataError(f"row {bad}: a binding sequence of a query counterfactual needs '? <name>'")
        states.append({k: v[rows, at] for k, v in state.items()})  # {var: (n,)} the state at the queried name
    base, source = states
    rows = np.arange(len(base_ids))
    if mode == "answer":
        return task._bindings(source)[rows, source["query"]]
    return task._bindings(base)[rows, source["query"]]


def binding_counterfactual_rows(n: int, seed: int, mode: str = "answer", quantities=None) -> list[dict]:
    """`n` counterfactual rows (`llm_mas.tasks.counterfactual_data` format) intervening at the queried name.

    Both texts end at the name after '?' (where the answer is predicted); base and source positions are
    ``last`` (that name); the continuation is the value `query_counterfactual_labels` gives (one word):
    - ``answer``: the retrieved value is swapped: label = the source's answer;
    - ``query``: the queried name is swapped: label = the base's value bound to the source's query name.
    Only informative pairs are kept: the label differs from the base's own answer (and, for ``query``, the
    base binds the source's query name). N (bindings) is drawn per sequence from `quantities` (default
    1..6), for base and source independently; seeded by `seed`.
    """
    if mode not in CF_MODES:
        raise ConfigError(f"unknown binding counterfactual mode {mode!r}; valid choices: {', '.join(CF_MODES)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"number of rows must be a positive integer, got {n!r}")
    from llm_mas.tasks.text import task_words

    task = binding()
    words = task_words(task)
    rng = np.random.default_rng([seed, 1407])
    rows: list[dict] = []
    while len(rows) < n:
        want = 2 * (n - len(rows)) + 16
        base, source = task.sample(want, rng, quantities), task.sample(want, rng, quantities)
        labels = query_counterfactual_labels(base.ids, source.ids, mode)  # (want,)
        answers = base.ids[np.arange(want), base.lengths - 2] - VALUE0  # (want,) the base's own answers
        for r in np.flatnonzero((labels >= 0) & (labels != answers))[: n - len(rows)]:
            b_end, s_end = int(base.lengths[r]) - 2, int(source.lengths[r]) - 2  # up to the queried name
            rows.append({"base": " ".join(words[t] for t in base.ids[r, :b_end]),
                         "source": " ".join(words[t] for t in source.ids[r, :s_end]),
                         "continuation": str(int(labels[r])), "base_position": "last", "source_position": "last"})
    return rows


def write_counterfactual_dataset(path, n: int, seed: int, mode: str = "answer") -> Path:
    """Write `binding_counterfactual_rows(n, seed, mode)` as JSONL to `path` (its folder is created)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = binding_counterfactual_rows(n, seed, mode)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- training rows with several questions ---------------------------------------------------------------------
def check_extra_queries(n_queries, fraction) -> None:
    """ConfigError unless `n_queries` is a positive integer and `fraction` (of drilled rows) is in [0, 1]."""
    if not isinstance(n_queries, int) or isinstance(n_queries, bool) or n_queries < 1:
        raise ConfigError(f"extra_queries (questions per drilled row) must be a positive integer, got {n_queries!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(f"extra_query_fraction must be in [0, 1], got {fraction!r} (the fraction of rows drilled)")


def extra_query_length(n_queries: int) -> int:
    """Length of a row asking `n_queries` questions: the longest binding sequence plus 4 per extra question."""
    return binding().max_len + 4 * (n_queries - 1)


def with_extra_queries(batch: SequenceBatch, n_queries: int, fraction: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training rows for a binding LM: a `fraction` of the rows ask `n_queries` questions instead of one.

    A drilled row keeps its bindings and then asks ``? <name> <value> ;`` `n_queries` times (each name drawn
    uniformly among the row's bound names, with replacement), the last answer followed by E; its scored
    positions are the answers. The other rows are the batch's own, scored on its task mask. Every question
    is a lookup, so a drilled row gives the LM `n_queries` answers to learn from instead of one. Drilled rows
    are training data only (the causal model reads one question per sequence).
    Returns (ids, scored), both (n, `extra_query_length(n_queries)`).
    """
    check_extra_queries(n_queries, fraction)
    n, width = len(batch.lengths), extra_query_length(n_queries)
    ids = np.full((n, width), PAD, dtype=np.int64)
    ids[:, : batch.ids.shape[1]] = batch.ids
    scored = np.zeros((n, width), dtype=bool)
    scored[:, : batch.ids.shape[1]] = batch.task_mask
    drilled = rng.random(n) < fraction  # (n,)
    n_vars = (np.asarray(batch.lengths) - 5) // 4  # (n,)
    slots = np.floor(rng.random((n, n_queries)) * n_vars[:, None]).astype(np.int64)  # (n, Q) bound slots
    rows = np.flatnonzero(drilled)
    if len(rows) == 0:
        return ids, scored
    first = 4 * n_vars[rows] + 1  # (r,) column of the first '?'
    ids[rows] = np.where(np.arange(width)[None, :] >= first[:, None], PAD, ids[rows])
    scored[rows] = False
    for j in range(n_queries):
        col = first + 4 * j  # (r,)
        slot = slots[rows, j]
        ids[rows, col] = QUESTION
        ids[rows, col + 1] = batch.ids[rows, 1 + 4 * slot]  # the slot's name
        ids[rows, col + 2] = batch.ids[rows, 3 + 4 * slot]  # its value: the answer
        ids[rows, col + 3] = EOS if j == n_queries - 1 else SEMICOLON
        scored[rows, col + 2] = True
    return ids, scored
