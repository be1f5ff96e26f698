"""Property tests of pair generation for every task, variable and mode, against an independent causal model."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_mas.tasks import TASK_NAMES, build_pairs, get_task, make_pairs

COUNTING = ("multiobject", "sameobject", "singleobject", "modulo", "rounding")
RESP = {"multiobject": "R", "sameobject": "D", "singleobject": "R", "modulo": "R", "rounding": "R"}
DEMOS = {"multiobject": {"D0", "D1", "D2"}, "sameobject": {"D"}, "singleobject": {"D"}, "modulo": {"D0", "D1", "D2"},
         "rounding": {"D0", "D1", "D2"}}


def f(name: str, c: int) -> int:
    if name == "modulo":
        return c % 4
    if name == "rounding":
        return int(c / 3 + 0.5) * 3  # never a tie for integers
    return c


def counting_continuation(name, tokens, mask, state):
    """Independent CountUpDown from `state`: check tokens/mask (after the swap position)."""
    big_n, phase, count = state["obj_count"], state["phase"], state["count"]
    expected = []  # (token or "DEMO", is_task)
    if phase >= 0:
        if phase == 0:
            while count < big_n:
                expected.append(("DEMO", False))
                count += 1
            expected.append(("T", False))
            count = f(name, count)
        expected += [(RESP[name], True)] * count + [("E", True)]
    assert len(tokens) == len(expected), (tokens, expected)
    for tok, m, (want, want_m) in zip(tokens, mask, expected, strict=True):
        assert (tok in DEMOS[name]) if want == "DEMO" else tok == want, (tokens, expected)
        assert m == want_m


def arithmetic_continuation(tokens, mask, state):
    """Independent arithmetic causal model from `state`: check tokens/mask (after the swap position)."""
    rem, v, stage, op, a = (state[k] for k in ("remaining_ops", "cumulative_value", "stage", "operator", "operand"))
    i = 0
    while stage >= 0:
        tok, m = tokens[i], mask[i]
        if stage == 1:  # after n_ops (only reachable by a cross-task stepwise null): v0 is given
            v, stage = int(tok), 2
            assert not m and 0 <= v <= 20
        elif stage == 2:
            assert tok in ("+", "-") and not m
            assert not (v == 20 and tok == "+") and not (v == 0 and tok == "-")
            op, stage = (0 if tok == "+" else 1), 3
        elif stage == 3:
            a = int(tok)
            assert not m and 0 <= a <= (20 - v if op == 0 else v)
            stage = 4
        elif stage == 4:
            assert tok == "=" and m
            v, stage = (v + a if op == 0 else v - a), 5
            assert 0 <= v <= 20
        elif stage == 5:
            assert tok == str(v) and m
            stage = 6
        elif stage == 6:
            assert m and tok == ("E" if rem == 1 else ",")
            rem, stage = rem - 1, (-1 if rem == 1 else 2)
        i += 1
    assert i == len(tokens), tokens


def expected_intended(tt, tb, ts, ss, pairs, r):
    """The causal state after the swap, recomputed from the base batches' states ts / ss."""
    ti, tp, si, sp = (int(x[r]) for x in (pairs.target_index, pairs.target_pos, pairs.source_index, pairs.source_pos))
    state = {v: int(ts[v][ti, tp]) if tp < tb.width else -1 for v in tt.state_variables}
    if tt.name in COUNTING:
        state["obj_count"] = int(ts["obj_count"][ti, 0])
    for tv, sv in pairs.swaps:
        state[tv] = int(ss[sv][si, sp])
    if tt.name == "modulo" and pairs.swaps and state["phase"] == 1:
        state["count"] %= 4
    return state


def check_pairs(tt, tb, st_, sb, pairs):
    n = len(pairs)
    assert pairs.ids.shape == pairs.task_mask.shape and len(pairs.target_index) == n
    tv, sv = tt.valid_positions(tb), st_.valid_positions(sb)
    ts, ss = tt.states(tb), st_.states(sb)
    scored = pairs.scored_mask()
    pos = np.arange(pairs.width)
    assert not (scored & (pos[None, :] <= pairs.target_pos[:, None])).any()
    assert not (scored & ~pairs.task_mask).any()
    assert sv[pairs.source_index, pairs.source_pos].all()
    if not pairs.stepwise:
        assert tv[pairs.target_index, pairs.target_pos].all()
    else:
        assert (pairs.source_pos == pairs.target_pos).all()
        if pairs.variable not in ("full", "null") or (pairs.variable == "full" and tt.name == "arithmetic"):
            assert tv[pairs.target_index, pairs.target_pos].all()
    for r in range(n):
        ti, p = int(pairs.target_index[r]), int(pairs.target_pos[r])
        state = expected_intended(tt, tb, ts, ss, pairs, r)
        assert {k: int(v[r]) for k, v in pairs.intended.items()} == state
        ids, mask = pairs.ids[r], pairs.task_mask[r]
        target = np.zeros(max(pairs.width, tb.width, p + 1), dtype=np.int64)
        target[: tb.width] = tb.ids[ti]
        if pairs.stepwise:
            ended = (np.cumsum(target == 2) > 0) | (target == 0)
            want = np.where(ended, tt.filler_token, target)[: p + 1]
            assert (ids[: p + 1] == want).all() and not mask[: p + 1].any()
        else:
            assert (ids[: p + 1] == tb.ids[ti, : p + 1]).all() and (mask[: p + 1] == tb.task_mask[ti, : p + 1]).all()
        length = int((ids != 0).sum())
        assert (ids[length:] == 0).all() and not mask[length:].any()
        tokens = tt.vocab.decode(ids[p + 1: length])
        if tt.name == "arithmetic":
            arithmetic_continuation(tokens, mask[p + 1: length].tolist(), state)
        else:
            counting_continuation(tt.name, tokens, mask[p + 1: length].tolist(), state)
        if not pairs.stepwise or p < tb.lengths[ti] - 1:
            assert scored[r].any()  # something is always left to produce


@st.composite
def setups(draw, cross: bool):
    tname = draw(st.sampled_from(TASK_NAMES))
    sname = draw(st.sampled_from(TASK_NAMES)) if cross else tname
    tt, st_ = get_task(tname), get_task(sname)
    if set(tt.variables) == set(st_.variables):
        variable = draw(st.sampled_from(tt.variables + ("full", "null")))
    else:
        variable = draw(st.sampled_from([(a, b) for a in tt.variables for b in st_.variables] + ["null"]))
    return tt, st_, variable, draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None)
@given(setup=setups(cross=False))
def test_pairs_follow_the_causal_model(setup):
    tt, st_, variable, stepwise, seed = setup
    rng = np.random.default_rng(seed)
    tb, sb = tt.sample(12, rng), st_.sample(15, rng)
    pairs = make_pairs(tt, tb, st_, sb, variable, 25, rng, stepwise=stepwise)
    check_pairs(tt, tb, st_, sb, pairs)


@settings(max_examples=40, deadline=None)
@given(setup=setups(cross=True))
def test_cross_task_pairs_follow_the_target_causal_model(setup):
    tt, st_, variable, stepwise, seed = setup
    rng = np.random.default_rng(seed)
    tb, sb = tt.sample(12, rng), st_.sample(15, rng)
    pairs = make_pairs(tt, tb, st_, sb, variable, 25, rng, stepwise=stepwise)
    check_pairs(tt, tb, st_, sb, pairs)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(TASK_NAMES), stepwise=st.booleans(), seed=st.integers(0, 2**31))
def test_self_swap_and_null_reproduce_the_target(name, stepwise, seed):
    task = get_task(name)
    rng = np.random.default_rng(seed)
    base = task.sample(20, rng)
    valid = task.valid_positions(base)
    rows = np.repeat(np.arange(20), 3)
    pos = np.concatenate([np.flatnonzero(valid[r])[rng.integers(0, valid[r].sum(), 3)] for r in range(20)])
    for variable in task.variables + ("full", "null"):
        p = build_pairs(task, base, task, base, variable, rows, pos, rows, pos, rng, stepwise=stepwise)
        width = max(p.width, base.width)
        got, want = p.pad_to(width), base.subset(rows).pad_to(width)
        assert (got.ids == want.ids).all(), variable
        prefix = np.arange(width)[None, :] <= pos[:, None]
        want_mask = want.task_mask & ~prefix if stepwise else want.task_mask
        assert (got.task_mask == want_mask).all()
    null = make_pairs(task, base, task, base, "null", 40, rng)
    width = max(null.width, base.width)
    assert (null.pad_to(width).ids == base.subset(null.target_index).pad_to(width).ids).all()
    assert (null.pad_to(width).task_mask == base.subset(null.target_index).pad_to(width).task_mask).all()


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(TASK_NAMES), stepwise=st.booleans(), seed=st.integers(0, 2**31))
def test_determinism(name, stepwise, seed):
    task = get_task(name)
    base = task.sample(30, np.random.default_rng(seed))
    variable = task.variables[seed % 2]
    a = make_pairs(task, base, task, base, variable, 50, np.random.default_rng(seed + 1), stepwise=stepwise)
    b = make_pairs(task, base, task, base, variable, 50, np.random.default_rng(seed + 1), stepwise=stepwise)
    for field in ("ids", "task_mask", "target_index", "target_pos", "source_index", "source_pos"):
        assert (getattr(a, field) == getattr(b, field)).all()
    assert all((a.intended[k] == b.intended[k]).all() for k in a.intended)
    sub = a.subset(np.arange(10, 20))
    assert (sub.ids == a.ids[10:20]).all() and (sub.intended[task.state_variables[0]] ==
                                               a.intended[task.state_variables[0]][10:20]).all()


def test_value_range_all_tasks():
    rng = np.random.default_rng(0)
    for name in TASK_NAMES:
        task = get_task(name)
        base = task.sample(200, rng)
        states = task.states(base)
        var = task.variables[0]
        for stepwise in (False, True):
            p = make_pairs(task, base, task, base, var, 300, rng, stepwise=stepwise, value_range=(2, 4))
            for idx, pos in ((p.source_index, p.source_pos), (p.target_index, p.target_pos)):
                v = states[var][idx, pos]
                assert ((v >= 2) & (v <= 4)).all(), name
            check_pairs(task, base, task, base, p)
