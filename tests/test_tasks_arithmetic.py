"""Arithmetic: vocabulary, grammar, states, valid positions, hand-computed counterfactuals, cross-task swaps."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_mas.errors import DataError
from llm_mas.tasks import build_pairs, get_task, make_pairs

A0 = "B 3 5 + 12 = 17 , - 2 = 15 , - 5 = 10 E"
A1 = "B 2 20 - 20 = 0 , + 7 = 7 E"


def check_arithmetic(tokens: list[str]) -> int:
    """Independent checker of a natural sequence (no padding); returns n_ops."""
    assert tokens[0] == "B" and tokens[-1] == "E"
    n = int(tokens[1])
    assert 1 <= n <= 20 and len(tokens) == 3 + 5 * n
    v = int(tokens[2])
    assert 0 <= v <= 20
    for k in range(n):
        op, a, eq, res, sep = tokens[3 + 5 * k: 8 + 5 * k]
        assert op in "+-" and eq == "=" and sep == ("E" if k == n - 1 else ",")
        if v == 20:
            assert op == "-"
        if v == 0:
            assert op == "+"
        v = v + int(a) if op == "+" else v - int(a)
        assert 0 <= int(a) <= 20 and 0 <= v <= 20 and int(res) == v
    return n


def one(strings, variable, t_row, t_pos, s_row, s_pos, stepwise=False, seed=0):
    t = get_task("arithmetic")
    base = t.from_strings(strings)
    return build_pairs(t, base, t, base, variable, [t_row], [t_pos], [s_row], [s_pos], np.random.default_rng(seed),
                       stepwise=stepwise)


def test_vocab():
    t = get_task("arithmetic")
    assert t.vocab.tokens[:3] == ("P", "B", "E")
    assert [t.vocab.id(str(v)) for v in (0, 1, 20)] == [3, 4, 23]
    assert [t.vocab.id(x) for x in "+-=,"] == [24, 25, 26, 27]
    assert t.max_len == 103 and t.quantity_name == "n_ops"
    assert t.variables == ("remaining_ops", "cumulative_value")
    assert t.filler_token == t.vocab.id("+")


def test_hand_written_states():
    t = get_task("arithmetic")
    b = t.from_strings([A0, A1])
    s = t.states(b)
    assert s["remaining_ops"][0].tolist() == [-1, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, -1]
    assert s["cumulative_value"][0].tolist() == [-1, -1, 5, 5, 5, 17, 17, 17, 17, 17, 15, 15, 15, 15, 15, 10, 10, -1]
    assert s["stage"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6, 2, 3, 4, 5, 6, -1]
    assert s["operator"][0].tolist() == [-1, -1, -1, 0, 0, -1, -1, -1, 1, 1, -1, -1, -1, 1, 1, -1, -1, -1]
    assert s["operand"][0].tolist() == [-1] * 4 + [12] + [-1] * 4 + [2] + [-1] * 4 + [5, -1, -1, -1]
    assert s["cumulative_value"][1].tolist()[:13] == [-1, -1, 20, 20, 20, 0, 0, 0, 0, 0, 7, 7, -1]
    assert s["remaining_ops"][1, 12:].tolist() == [-1] * 6
    # task tokens: '=', result, ',' / E
    assert b.task_mask[0].astype(int).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    # valid: v0 .. last token before E, operand inputs excluded
    assert t.valid_positions(b)[0].astype(int).tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0]
    assert t.quantities(b).tolist() == [3, 2]
    assert t.render(b.ids[1]) == A1


def test_malformed_rejected():
    t = get_task("arithmetic")
    for bad in ["B 3 5 + 12 = 17 E", "B 1 5 * 2 = 7 E", "B 0 5 E", "B 1 5 + 2 = 7 ,"]:
        with pytest.raises(DataError):
            t.from_strings([bad])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60))
def test_sampled_sequences_are_valid(seed, n):
    t = get_task("arithmetic")
    b = t.sample(n, np.random.default_rng(seed), hold_outs=(4, 9))
    assert b.ids.shape == (n, 103)
    q = t.quantities(b)
    for r in range(n):
        toks = t.vocab.decode(b.ids[r])
        assert check_arithmetic(toks[: b.lengths[r]]) == q[r]
        assert q[r] not in (4, 9)
        assert all(x == "P" for x in toks[b.lengths[r]:])
        assert b.task_mask[r].tolist() == [3 <= i < b.lengths[r] and (i - 3) % 5 >= 2 for i in range(103)]


def test_sample_covers_ops_and_forced_operators():
    t = get_task("arithmetic")
    b = t.sample(3000, np.random.default_rng(0))
    assert set(t.quantities(b).tolist()) == set(range(1, 21))
    s = t.states(b)
    v_before_op = s["cumulative_value"][:, :-1][s["stage"][:, 1:] == 3]  # value when an operator is read
    ops = b.ids[:, 1:][s["stage"][:, 1:] == 3]
    assert (ops[v_before_op == 20] == t.vocab.id("-")).all() and (ops[v_before_op == 0] == t.vocab.id("+")).all()
    mid = (v_before_op > 0) & (v_before_op < 20)
    assert 0.45 < (ops[mid] == t.vocab.id("+")).mean() < 0.55


def test_remaining_ops_swaps():
    t = get_task("arithmetic")
    p = one([A0, A1], "remaining_ops", 0, 11, 1, 7)  # after the 2nd result (R=2) <- R=1: stop now
    assert t.render(p.ids[0]) == "B 3 5 + 12 = 17 , - 2 = 15 E"
    assert p.scored_mask()[0].astype(int).tolist() == [0] * 12 + [1]
    assert {k: int(v[0]) for k, v in p.intended.items()} == {
        "remaining_ops": 1, "cumulative_value": 15, "stage": 6, "operator": -1, "operand": -1}
    p = one([A0, A1], "remaining_ops", 1, 11, 0, 2)  # last result (R=1) <- R=3: two more operations
    toks = t.render(p.ids[0])
    assert re.fullmatch(r"B 2 20 - 20 = 0 , \+ 7 = 7 , [+-] \d+ = \d+ , [+-] \d+ = \d+ E", toks), toks
    vals = toks.split()
    assert check_arithmetic(["B", "2", "7"] + vals[13:]) == 2  # the continuation is arithmetic from 7
    assert p.task_mask[0].astype(int).tolist()[12:] == [1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]


def test_cumulative_value_swaps():
    t = get_task("arithmetic")
    # after ',' (stage 2): the target's operators/operands are kept where legal
    p = one([A0, A1], "cumulative_value", 0, 7, 1, 2)
    assert t.render(p.ids[0]) == "B 3 5 + 12 = 17 , - 2 = 18 , - 5 = 13 E"
    # after an operator (stage 3): the operand 12 is still feasible for '+' from 7
    p = one([A0, A1], "cumulative_value", 0, 3, 1, 11)
    assert t.render(p.ids[0]) == "B 3 5 + 12 = 19 , - 2 = 17 , - 5 = 12 E"
    assert p.intended["operator"][0] == 0 and p.intended["cumulative_value"][0] == 7
    # after '=' (stage 5): the result is the swapped value; '-' is illegal at 0 so '+' is forced; operand 2 kept;
    # then '-' is kept but 5 > 2 is infeasible: a fresh operand in 0..2
    for seed in range(5):
        p = one([A0, A1], "cumulative_value", 0, 5, 1, 6, seed=seed)
        toks = t.render(p.ids[0])
        m = re.fullmatch(r"B 3 5 \+ 12 = 0 , \+ 2 = 2 , - (\d+) = (\d+) E", toks)
        assert m and int(m.group(1)) <= 2 and int(m.group(2)) == 2 - int(m.group(1)), toks
    # after an operator whose operand becomes infeasible: a fresh operand in 0..5
    p = one([A0, A1], "cumulative_value", 1, 3, 0, 2, seed=3)
    m = re.fullmatch(r"B 2 20 - (\d+) = (\d+) , \+ 7 = (\d+) E", t.render(p.ids[0]))
    assert m and int(m.group(1)) <= 5 and int(m.group(2)) == 5 - int(m.group(1)) and int(m.group(3)) == 12 - int(
        m.group(1))


def test_full_and_stepwise_arithmetic():
    t = get_task("arithmetic")
    p = one([A0, A1], "full", 0, 11, 1, 5)  # R=2, V=0 into the 2nd result: ',' then '+' forced at 0
    assert t.render(p.ids[0]) == "B 3 5 + 12 = 17 , - 2 = 15 , + 5 = 5 E"
    p = one([A0, A1], "remaining_ops", 0, 7, 1, 7, stepwise=True)
    assert t.render(p.ids[0]) == "B 3 5 + 12 = 17 , - 2 = 15 E"
    assert p.task_mask[0].astype(int).tolist() == [0] * 10 + [1, 1, 1]
    rng = np.random.default_rng(0)
    short, long_ = t.sample(100, rng, quantities=[1]), t.sample(100, rng, quantities=[20])
    for var in ("full", "remaining_ops"):
        p = make_pairs(t, short, t, long_, var, 300, rng, stepwise=True)
        assert t.valid_positions(short)[p.target_index, p.target_pos].all()  # arithmetic: valid in both
        assert t.valid_positions(long_)[p.source_index, p.source_pos].all()
    p = make_pairs(t, short, t, long_, "null", 300, rng, stepwise=True)
    assert (p.target_pos >= 8).mean() > 0.8 and not p.scored_mask()[p.target_pos >= 7].any()
    assert (p.ids[p.target_pos >= 8, 7] == t.filler_token).all()


def test_operand_position_swap_is_refused():
    assert not get_task("arithmetic").valid_positions(get_task("arithmetic").from_strings([A0]))[0, 4]
    with pytest.raises(DataError, match="operand"):
        one([A0, A1], "cumulative_value", 0, 4, 1, 2)  # after '12' (pending + 12) with value 20


def test_cross_task_tuples():
    m, a = get_task("multiobject"), get_task("arithmetic")
    mb, ab = m.from_strings(["B D0 D1 D2 T R R R E"]), a.from_strings([A0])
    p = build_pairs(m, mb, a, ab, ("count", "remaining_ops"), [0], [6], [0], [2], np.random.default_rng(0))
    assert m.render(p.ids[0]) == "B D0 D1 D2 T R R R R R E" and p.variable == "count<-remaining_ops"
    assert p.swaps == (("count", "remaining_ops"),)
    mb2 = m.from_strings(["B D0 D1 D2 D0 D1 D2 T R R R R R R E"])
    p = build_pairs(a, ab, m, mb2, ("cumulative_value", "count"), [0], [7], [0], [3], np.random.default_rng(0))
    m_ = re.fullmatch(r"B 3 5 \+ 12 = 17 , - 2 = 1 , - (\d) = (\d) E", a.render(p.ids[0]))
    assert m_ and int(m_.group(1)) <= 1 and int(m_.group(2)) == 1 - int(m_.group(1))

    rng = np.random.default_rng(0)
    cb, abig = m.sample(300, rng), a.sample(300, rng)
    p = make_pairs(a, abig, m, cb, ("remaining_ops", "count"), 2000, rng)
    src = m.states(cb)["count"][p.source_index, p.source_pos]
    assert src.min() >= 1 and src.max() <= 20  # count 0 is outside remaining_ops' domain 1..20
    assert (p.intended["remaining_ops"] == src).all()
    p = make_pairs(m, cb, a, abig, ("phase", "cumulative_value"), 500, rng)
    assert set(a.states(abig)["cumulative_value"][p.source_index, p.source_pos].tolist()) <= {0, 1}
