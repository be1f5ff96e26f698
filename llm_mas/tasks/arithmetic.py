"""Arithmetic: running sums with values in 0..20, and its causal model (runs through MAS end to end).

Sequence: `B <n_ops> <v0> (<op> <operand> = <result> ,)×(n_ops-1) <op> <operand> = <result> E`, e.g.
`B 3 5 + 12 = 17 , - 2 = 15 , - 5 = 10 E`; its length is 3 + 5·n_ops (max 103 for n_ops = 20).
n_ops ∈ 1..20 is the quantity (hold-outs apply to it); v0 is uniform over 0..20. Each operator is '+' or
'-' uniformly, forced '-' at 20 and '+' at 0; the operand is uniform over the feasible range
('+': 0..20-v, '-': 0..v), so every value stays in 0..20. Given tokens: B, n_ops, v0, op, operand.
Task tokens: '=', the result and the ',' / E after it.

Vocabulary: P=0 B=1 E=2, numbers "0".."20" = ids 3..23 (id = 3 + value), "+"=24, "-"=25, "="=26, ","=27.

Causal model. State variables (post-token, -1 where undefined):
- remaining_ops: set by n_ops, decremented when ',' is read; at the separator E is emitted iff it is 1;
- cumulative_value: set by v0; updated when '=' is read (v <- v op operand); the result token emits it;
- stage: where the grammar stands: 0 after B, 1 after n_ops, 2 expecting an operator (after v0 or ','),
  3 after an operator, 4 after an operand, 5 after '=', 6 after a result;
- operator (0 '+', 1 '-'; defined at stages 3-4) and operand (defined at stage 4): the pending operation.
Swappable variables: remaining_ops, cumulative_value ("full" swaps both; stage and the pending operation
stay the target's).

Valid intervention positions: every position from v0 to the last token before E, except operand inputs
(i.e. the positions whose post-token stage is 2, 3, 5 or 6). An operand was drawn feasible for the target's value; a swapped cumulative_value
could make it leave 0..20, which the task cannot express, so operand positions are not intervened on.
What a swap means there: after v0/','/a result (stage 2/6) the next operations start from the swapped
value (remaining_ops: that many operations remain, counting the current one); after an operator
(stage 3) the operand that follows is drawn feasible for the swapped value; after '=' (stage 5) the
result emitted is the swapped value. Because the target's own state is needed besides the swapped
variables, stepwise "full" uses positions valid in both sequences (`full_swap_covers_state = False`).
"""

from __future__ import annotations

import numpy as np

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks.base import BOS, EOS, PAD, SPECIAL_TOKENS, SequenceBatch, Task, Vocab, check_quantities

MAX_VALUE = 20
MIN_OPS, MAX_OPS = 1, 20
NUM0 = 3  # id of "0"
PLUS, MINUS, EQUALS, COMMA = NUM0 + MAX_VALUE + 1, NUM0 + MAX_VALUE + 2, NUM0 + MAX_VALUE + 3, NUM0 + MAX_VALUE + 4
UNDEF = -1
# stage after reading a token = what is expected next: n_ops, v0, operator, operand, '=', result, ',' / E
(S_START, S_NOPS, S_OP, S_OPERAND, S_EQUALS, S_RESULT, S_SEP) = range(7)
ADD, SUB = 0, 1


class ArithmeticTask(Task):
    """The Arithmetic task (see the module docstring)."""

    name = "arithmetic"
    variables = ("remaining_ops", "cumulative_value")
    state_variables = ("remaining_ops", "cumulative_value", "stage", "operator", "operand")
    quantity_name = "n_ops"
    max_len = 3 + 5 * MAX_OPS
    full_swap_covers_state = False

    def __init__(self) -> None:
        numbers = tuple(str(v) for v in range(MAX_VALUE + 1))
        self.vocab = Vocab(SPECIAL_TOKENS + numbers + ("+", "-", "=", ","))
        assert self.vocab.id("+") == PLUS and self.vocab.id(",") == COMMA
        self.filler_token = PLUS  # a given token that is never scored

    def __repr__(self) -> str:
        return "ArithmeticTask()"

    # ---- sampling ------------------------------------------------------------------------------------------
    def sample(self, n, rng, quantities=None, hold_outs=()) -> SequenceBatch:
        allowed = check_quantities(quantities, hold_outs, MIN_OPS, MAX_OPS, "n_ops values")
        if n < 0:
            raise ConfigError(f"number of samples must be >= 0, got {n}")
        n_ops = allowed[rng.integers(0, len(allowed), size=n)]  # (n,)
        v0 = rng.integers(0, MAX_VALUE + 1, size=n)  # (n,)
        prefix = np.stack([np.full(n, BOS), NUM0 + n_ops, NUM0 + v0], axis=1).astype(np.int64)  # (n, 3)
        state = {"remaining_ops": n_ops, "cumulative_value": v0, "stage": np.full(n, S_OP),
                 "operator": np.full(n, UNDEF), "operand": np.full(n, UNDEF)}
        ids, task_mask = self.cf_continue(prefix, np.full(n, 3), state, np.zeros((n, 0), np.int64), rng)
        width = ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, self.max_len - width)))
        task_mask = np.pad(task_mask, ((0, 0), (0, self.max_len - width)))
        return SequenceBatch(ids, task_mask, 3 + 5 * n_ops)

    # ---- reading sequences -----------------------------------------------------------------------------------
    def _read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Post-token causal states and the task-token mask (n, L) of well-formed sequences, in closed form.

        The grammar has a fixed stride (B n v0, then 5 tokens per operation), so every position's stage is a
        function of the position; values come from v0 plus the cumulative signed operands (what the causal
        model computes when reading '='; result tokens are not consulted). A malformed row raises DataError.
        """
        ids = np.asarray(ids, dtype=np.int64)
        n, width = ids.shape
        full = np.zeros((n, max(width, self.max_len)), dtype=np.int64)  # (n, W >= 103)
        full[:, :width] = ids
        pos = np.arange(full.shape[1])[None, :]  # (1, W)
        n_ops = full[:, 1] - NUM0  # (n,)
        bad_n = (n_ops < MIN_OPS) | (n_ops > MAX_OPS)
        length = np.where(bad_n, 0, 3 + 5 * n_ops)[:, None]  # (n, 1)
        off = (pos - 3) % 5  # (1, W) slot in the operation: op, operand, =, result, sep
        k = np.maximum(pos - 3, 0) // 5  # (1, W) index of the operation
        is_num = (full >= NUM0) & (full <= NUM0 + MAX_VALUE)
        is_op = (full == PLUS) | (full == MINUS)
        expect_num = ((pos == 1) | (pos == 2) | ((pos >= 3) & ((off == 1) | (off == 3)))) & (pos < length - 1)
        ok = np.where(pos == 0, full == BOS, True)
        ok &= np.where(expect_num, is_num, True)
        ok &= np.where((pos >= 3) & (off == 0) & (pos < length - 1), is_op, True)
        ok &= np.where((pos >= 3) & (off == 2) & (pos < length - 1), full == EQUALS, True)
        ok &= np.where((pos >= 3) & (off == 4) & (pos < length - 1), full == COMMA, True)
        ok &= np.where(pos == length - 1, full == EOS, True)
        ok &= np.where(pos >= length, full == PAD, True)
        bad = bad_n | ~ok.all(axis=1) | (length[:, 0] > width)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise DataError(f"not an arithmetic sequence (row {r}): {self.render(ids[r])!r}; expected "
                            f"'B <n_ops 1..20> <v0> (<op> <operand> = <result> ,)... E'")

        n_slots = MAX_OPS
        op_tok = full[:, 3:3 + 5 * n_slots:5]  # (n, 20)
        arg = full[:, 4:4 + 5 * n_slots:5] - NUM0  # (n, 20)
        op = np.where(op_tok == PLUS, ADD, SUB)
        v0 = full[:, 2] - NUM0  # (n,)
        live_op = np.arange(n_slots)[None, :] < n_ops[:, None]  # (n, 20)
        after = v0[:, None] + np.cumsum(np.where(live_op, np.where(op == ADD, arg, -arg), 0), axis=1)  # (n, 20)
        before = np.concatenate([v0[:, None], after[:, :-1]], axis=1)  # (n, 20)
        kk = np.broadcast_to(np.minimum(k, n_slots - 1), full.shape)  # (n, W)
        rows = np.arange(n)[:, None]
        in_ops = pos >= 3
        stage = np.select([pos == 0, pos == 1, pos == 2, off == 0, off == 1, off == 2, off == 3],
                          [S_START, S_NOPS, S_OP, S_OPERAND, S_EQUALS, S_RESULT, S_SEP], S_OP)
        value = np.where(in_ops, np.where(off >= 2, after[rows, kk], before[rows, kk]), v0[:, None])
        value = np.where(pos >= 2, value, UNDEF)
        rem = np.where(in_ops, n_ops[:, None] - k - (off == 4), n_ops[:, None])
        rem = np.where(pos >= 1, rem, UNDEF)
        operator = np.where(in_ops & (off <= 1), op[rows, kk], UNDEF)
        operand = np.where(in_ops & (off == 1), arg[rows, kk], UNDEF)
        ended = pos >= length - 1
        out = {
            "remaining_ops": rem, "cumulative_value": value, "stage": np.broadcast_to(stage, full.shape),
            "operator": operator, "operand": operand,
        }
        out = {key: np.where(ended, UNDEF, v)[:, :width] for key, v in out.items()}
        task = (in_ops & (off >= 2) & (pos < length))[:, :width]
        return {**out, "task": task}

    def quantities(self, batch) -> np.ndarray:
        n_tok = batch.ids[:, 1] if batch.width > 1 else np.zeros(len(batch), np.int64)
        if ((n_tok < NUM0 + MIN_OPS) | (n_tok > NUM0 + MAX_OPS)).any():
            raise DataError("the second token of an arithmetic sequence must be n_ops in 1..20")
        return (n_tok - NUM0).astype(np.int64)

    def _analyse(self, ids: np.ndarray) -> dict:
        read = self._read(ids)
        states = {k: read[k] for k in self.state_variables}
        return {"states": states, "valid": np.isin(read["stage"], (S_OP, S_OPERAND, S_RESULT, S_SEP))}

    def task_mask_of(self, ids: np.ndarray) -> np.ndarray:
        return self._read(ids)["task"]

    def variable_domain(self, variable: str) -> tuple[int, int]:
        if variable == "remaining_ops":
            return (MIN_OPS, MAX_OPS)
        if variable == "cumulative_value":
            return (0, MAX_VALUE)
        raise ConfigError(f"arithmetic has no swappable variable {variable!r}; valid: {', '.join(self.variables)}")

    # ---- causal-model hooks ----------------------------------------------------------------------------------
    def cf_continue(self, prefix_ids, prefix_len, state, reuse_ids, rng):
        """Run the causal model on from each row's state, one operation (5 tokens) at a time, vectorised over
        rows (<= 20 iterations). Slots of an operation: 0 op, 1 operand, 2 '=', 3 result, 4 ',' / E; a row
        at stage s (2..6) resumes at slot s - 2; a row at stage 1 first emits v0."""
        n = len(prefix_len)
        start = np.asarray(prefix_len, dtype=np.int64)
        rem = np.asarray(state["remaining_ops"], dtype=np.int64).copy()
        val = np.asarray(state["cumulative_value"], dtype=np.int64).copy()
        stage = np.asarray(state["stage"], dtype=np.int64)
        op = np.asarray(state["operator"], dtype=np.int64).copy()
        arg = np.asarray(state["operand"], dtype=np.int64).copy()
        live = stage >= 0
        if (live & (stage == S_START)).any():
            raise DataError("arithmetic cannot continue from the state after BOS (n_ops not read yet)")
        if (live & (stage >= S_OP) & ((rem < MIN_OPS) | (val < 0) | (val > MAX_VALUE))).any():
            raise DataError("arithmetic state out of range: remaining_ops must be >= 1 and cumulative_value in 0..20")
        pending = live & (stage == S_EQUALS)
        if (pending & ((np.where(op == ADD, val + arg, val - arg) < 0) | (np.where(op == ADD, val + arg, val - arg)
                                                                           > MAX_VALUE))).any():
            raise DataError("a swapped cumulative_value makes the pending operand infeasible (result outside "
                            "0..20); operand positions are not valid intervention sites")
        # tokens still to come: stage 1 -> v0 + 5R; stage s >= 2 -> 5R - (s - 2); terminal -> 0
        remaining = np.where(~live, 0, np.where(stage == S_NOPS, 1 + 5 * rem, 5 * rem - (stage - S_OP)))
        width = int(max((start + remaining).max(initial=0), prefix_ids.shape[1], 1))
        pos = np.arange(width)[None, :]
        ids = np.zeros((n, width), dtype=np.int64)
        ids[:, : prefix_ids.shape[1]] = prefix_ids
        ids = np.where(pos < start[:, None], ids, PAD)
        mask = np.zeros((n, width), dtype=bool)
        reuse = np.zeros((n, width), dtype=np.int64)  # the target's tokens in the same frame
        k = min(width, reuse_ids.shape[1])
        reuse[:, :k] = reuse_ids[:, :k]
        rows = np.arange(n)

        def old_number(col):
            tok = reuse[rows, np.minimum(col, width - 1)]
            return np.where((tok >= NUM0) & (tok <= NUM0 + MAX_VALUE), tok - NUM0, -1), tok

        def emit(where, col, tok, is_task):
            ids[rows[where], col[where]] = np.broadcast_to(tok, (n,))[where]
            mask[rows[where], col[where]] = is_task

        # stage 1: v0 (given) first, then a fresh operation
        at_v0 = live & (stage == S_NOPS)
        old_v0, _ = old_number(start)
        v0 = np.where(old_v0 >= 0, old_v0, rng.integers(0, MAX_VALUE + 1, size=n))
        emit(at_v0, start, NUM0 + v0, False)
        val = np.where(at_v0, v0, val)
        first_slot = np.where(at_v0, 0, stage - S_OP)  # (n,) slot the first operation resumes at
        base = np.where(at_v0, start + 1, start) - first_slot  # (n,) column of slot 0 of operation 0
        ops_to_go = np.where(live, rem, 0)  # operations still (at least partly) to write, the current one included
        for j in range(int(ops_to_go.max(initial=0))):
            act = j < ops_to_go
            col0 = base + 5 * j
            first = j == 0
            # slot 0: operator (given): forced '-' at 20 and '+' at 0, the target's if legal, else a coin
            w = act & ((first_slot <= 0) | (not first))
            _, old = old_number(col0)
            legal_old = ((old == PLUS) & (val < MAX_VALUE)) | ((old == MINUS) & (val > 0))
            new_op = np.where(legal_old, np.where(old == PLUS, ADD, SUB), rng.integers(0, 2, size=n))
            new_op = np.where(val >= MAX_VALUE, SUB, np.where(val <= 0, ADD, new_op))
            op = np.where(w, new_op, op)
            emit(w, col0, np.where(op == ADD, PLUS, MINUS), False)
            # slot 1: operand (given): the target's if feasible, else uniform over the feasible range
            w = act & ((first_slot <= 1) | (not first))
            bound = np.clip(np.where(op == ADD, MAX_VALUE - val, val), 0, MAX_VALUE)
            old_arg, _ = old_number(col0 + 1)
            new_arg = np.where((old_arg >= 0) & (old_arg <= bound), old_arg, rng.integers(0, bound + 1))
            arg = np.where(w, new_arg, arg)
            emit(w, col0 + 1, NUM0 + arg, False)
            # slot 2: '=' updates the value
            w = act & ((first_slot <= 2) | (not first))
            emit(w, col0 + 2, EQUALS, True)
            val = np.where(w, np.where(op == ADD, val + arg, val - arg), val)
            # slot 3: the result; slot 4: ',' (remaining_ops - 1) or E on the last operation
            w = act & ((first_slot <= 3) | (not first))
            emit(w, col0 + 3, NUM0 + val, True)
            emit(act, col0 + 4, np.where(rem <= 1, EOS, COMMA), True)
            rem = np.where(act, rem - 1, rem)
        return ids, mask
