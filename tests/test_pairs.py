"""Hand-computed counterfactuals for the counting tasks, stepwise prefixes, cross-task swaps, value_range."""

from __future__ import annotations

import numpy as np
import pytest

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks import build_pairs, get_task, make_pairs

MULTI = ["B D0 D1 D2 T R R R E", "B D2 D2 D2 D2 D2 D1 T R R R R R R E", "B D1 T R E"]


def bits(mask_row, n=None) -> str:
    s = "".join(str(int(b)) for b in mask_row)
    return s if n is None else s[:n]


def matches(task, ids_row, pattern: str) -> bool:
    """Rendered row == pattern, where 'D*' stands for any demo token of a multi-demo task."""
    got = task.render(ids_row).split()
    want = pattern.split()
    return len(got) == len(want) and all(w == g or (w == "D*" and g in ("D0", "D1", "D2")) for g, w in zip(got, want, strict=True))


def one(task, strings, variable, t_row, t_pos, s_row, s_pos, stepwise=False, seed=0, source_task=None,
        source_strings=None):
    target = task.from_strings(strings)
    source_task = source_task or task
    source = source_task.from_strings(source_strings) if source_strings else target
    return build_pairs(task, target, source_task, source, variable, [t_row], [t_pos], [s_row], [s_pos],
                       np.random.default_rng(seed), stepwise=stepwise)


def intended(p) -> dict:
    return {k: int(v[0]) for k, v in p.intended.items()}


# ---- MultiObject -------------------------------------------------------------------------------------------
def test_count_demo_into_response():
    t = get_task("multiobject")
    p = one(t, MULTI, "count", 0, 6, 1, 5)  # target after its 2nd R (count 1) <- source after 5 demos
    assert t.render(p.ids[0]) == "B D0 D1 D2 T R R R R R R R E"
    assert bits(p.task_mask[0]) == "0000011111111"
    assert bits(p.scored_mask()[0]) == "0000000111111"
    assert intended(p) == {"obj_count": 3, "phase": 1, "count": 5}
    assert p.variable == "count" and p.target_pos[0] == 6 and p.source_pos[0] == 5


def test_count_response_into_demo_reuses_target_demos():
    t = get_task("multiobject")
    p = one(t, MULTI, "count", 1, 2, 1, 12)  # N=6 target after 2 demos <- count 1 from its own response phase
    # 5 more demos (4 copied from the target, the 5th fresh where the target has T), T, 6 R's, E
    assert matches(t, p.ids[0], "B D2 D2 D2 D2 D2 D1 D* T R R R R R R E")
    assert bits(p.task_mask[0]) == "0000000001111111"
    assert intended(p) == {"obj_count": 6, "phase": 0, "count": 1}


def test_count_above_obj_count_triggers_at_once():
    t = get_task("multiobject")
    p = one(t, MULTI, "count", 0, 1, 1, 9)  # N=3 target after 1 demo <- count 4
    assert t.render(p.ids[0]) == "B D0 T R R R R E"
    assert intended(p)["count"] == 4


def test_phase_only_swaps():
    t = get_task("multiobject")
    p = one(t, MULTI, "phase", 1, 4, 0, 5)  # demo -> response: the 4 counted demos are answered
    assert t.render(p.ids[0]) == "B D2 D2 D2 D2 R R R R E"
    assert bits(p.task_mask[0]) == "0000011111"
    p = one(t, MULTI, "phase", 1, 12, 0, 2)  # response (count 1) -> demo: 5 fresh demos, T, 6 R's
    assert matches(t, p.ids[0], "B D2 D2 D2 D2 D2 D1 T R R R R R D* D* D* D* D* T R R R R R R E")
    assert bits(p.task_mask[0]) == "0000000011111" + "000000" + "1111111"
    assert intended(p) == {"obj_count": 6, "phase": 0, "count": 1}


def test_full_swaps_keep_obj_count():
    t = get_task("multiobject")
    p = one(t, MULTI, "full", 0, 2, 1, 10)  # response state (count 3) into a demo position
    assert t.render(p.ids[0]) == "B D0 D1 R R R E"
    assert intended(p) == {"obj_count": 3, "phase": 1, "count": 3}
    p = one(t, MULTI, "full", 1, 9, 0, 1)  # demo state (count 1) into the N=6 target: demos up to ITS N
    assert matches(t, p.ids[0], "B D2 D2 D2 D2 D2 D1 T R R D* D* D* D* D* T R R R R R R E")
    assert intended(p) == {"obj_count": 6, "phase": 0, "count": 1}


def test_null_is_the_target():
    t = get_task("multiobject")
    base = t.from_strings(MULTI)
    p = one(t, MULTI, "null", 1, 3, 0, 6)
    assert (p.ids[0, : base.width] == base.ids[1]).all() and (p.task_mask[0, : base.width] == base.task_mask[1]).all()
    assert intended(p) == {"obj_count": 6, "phase": 0, "count": 3}
    assert p.swaps == ()


# ---- Modulo, Rounding, SameObject, SingleObject --------------------------------------------------------------
MOD = ["B D0 D1 D2 D0 D1 T R E", "B D0 D1 D2 D0 T E", "B D0 D0 D0 D0 D0 D0 D0 T R R R E"]


def test_modulo_post_swap_mod():
    t = get_task("modulo")
    p = one(t, MOD, "count", 0, 7, 0, 5)  # count 5 into the response phase -> 5 mod 4 = 1
    assert t.render(p.ids[0]) == "B D0 D1 D2 D0 D1 T R R E"
    assert intended(p) == {"obj_count": 5, "phase": 1, "count": 1}
    p = one(t, MOD, "phase", 1, 3, 0, 7)  # demo count 3 lands in the response phase: 3 mod 4 = 3
    assert t.render(p.ids[0]) == "B D0 D1 D2 R R R E"
    p = one(t, MOD, "count", 0, 2, 2, 7)  # count 7 into the demo phase is NOT reduced; T then f(7) = 3 R's
    assert t.render(p.ids[0]) == "B D0 D1 T R R R E"
    assert intended(p) == {"obj_count": 5, "phase": 0, "count": 7}
    p = one(t, MOD, "phase", 0, 7, 1, 1)  # response -> demo with count 0: 5 demos, T, f(5) = 1 R
    assert matches(t, p.ids[0], "B D0 D1 D2 D0 D1 T R D* D* D* D* D* T R E")


def test_modulo_n_divisible_by_4():
    t = get_task("modulo")
    base = t.from_strings(MOD)
    assert t.valid_positions(base)[1].astype(int).tolist()[:7] == [0, 1, 1, 1, 1, 0, 0]
    p = one(t, MOD, "phase", 1, 4, 0, 7)  # N=4 target after 4 demos -> response: 4 mod 4 = 0 -> E at once
    assert t.render(p.ids[0]) == "B D0 D1 D2 D0 E"
    assert bits(p.task_mask[0]) == "000001"
    assert intended(p) == {"obj_count": 4, "phase": 1, "count": 0}
    p = one(t, MOD, "full", 1, 2, 0, 7)  # the source's final state (count 0, response)
    assert t.render(p.ids[0]) == "B D0 D1 E"
    p = one(t, MOD, "count", 1, 1, 0, 3)  # demo count 3 into N=4 target: one more demo, T, f(4) = 0 R's
    assert matches(t, p.ids[0], "B D0 D* T E")


def test_rounding_does_not_re_round():
    t = get_task("rounding")
    strings = ["B D0 D1 D2 D0 T R R R E", "B D0 T E"]
    p = one(t, strings, "phase", 0, 4, 0, 6)  # count 4 -> response phase: 4 R's, not round(4) = 3
    assert t.render(p.ids[0]) == "B D0 D1 D2 D0 R R R R E"
    p = one(t, strings, "count", 0, 7, 0, 4)  # count 4 into the response phase after 2 R's
    assert t.render(p.ids[0]) == "B D0 D1 D2 D0 T R R R R R R E"
    p = one(t, strings, "count", 1, 1, 0, 2)  # N=1 target (f = 0) gets count 2 in the demo phase: T, f(2) = 3
    assert t.render(p.ids[0]) == "B D0 T R R R E"
    p = one(t, strings, "phase", 0, 7, 0, 1)  # response (count 1) -> demo: 3 more demos, T, f(4) = 3 R's
    assert matches(t, p.ids[0], "B D0 D1 D2 D0 T R R D* D* D* T R R R E")


def test_sameobject_and_singleobject():
    t = get_task("sameobject")
    strings = ["B D D T D D E", "B D D D D D T D D D D D E"]
    p = one(t, strings, "count", 0, 4, 1, 5)
    assert t.render(p.ids[0]) == "B D D T D D D D D D E"
    assert bits(p.task_mask[0]) == "00001111111"
    p = one(t, strings, "phase", 0, 1, 1, 8)
    assert t.render(p.ids[0]) == "B D D E" and bits(p.task_mask[0]) == "0011"
    p = one(t, strings, "full", 0, 2, 0, 5)
    assert t.render(p.ids[0]) == "B D D E" and bits(p.task_mask[0]) == "0001"
    p = one(t, strings, "phase", 0, 5, 0, 1)  # response count 0 -> demo: 2 demos, T, 2 responses
    assert t.render(p.ids[0]) == "B D D T D D D D T D D E"
    assert bits(p.task_mask[0]) == "000011000111"

    s = get_task("singleobject")
    p = one(s, ["B D D D T R R R E", "B D D T R R E"], "count", 0, 1, 1, 2)
    assert s.render(p.ids[0]) == "B D D T R R R E"  # count 2 after 1 demo: one more demo, T, f(3) R's


# ---- stepwise ------------------------------------------------------------------------------------------------
def test_stepwise_prefix_mask_and_filler():
    t = get_task("multiobject")
    p = one(t, MULTI, "count", 0, 5, 1, 5, stepwise=True)  # i = 5: target's 1st R, source's 5th demo
    assert t.render(p.ids[0]) == "B D0 D1 D2 T R R R R R R E"
    assert bits(p.task_mask[0]) == "000000111111"  # the prefix (its R at 5 included) is never scored
    assert p.stepwise and p.source_pos[0] == p.target_pos[0] == 5

    # "full" beyond the end of a short target: E/PAD in the prefix become the filler D2
    p = one(t, MULTI, "full", 2, 8, 1, 8, stepwise=True)
    assert t.render(p.ids[0]) == "B D1 T R D2 D2 D2 D2 D2 R R R R R E"
    assert bits(p.task_mask[0]) == "000000000111111"
    assert intended(p) == {"obj_count": 1, "phase": 1, "count": 5}
    p = one(t, MULTI, "full", 2, 6, 1, 6, stepwise=True)  # demo state count 6 >= N = 1: T, 6 R's
    assert t.render(p.ids[0]) == "B D1 T R D2 D2 D2 T R R R R R R E"
    assert bits(p.task_mask[0]) == "000000001111111"

    # null: the target itself (prefix unscored); beyond its end only filler, nothing scored
    p = one(t, MULTI, "null", 0, 3, 1, 3, stepwise=True)
    assert t.render(p.ids[0]) == MULTI[0] and bits(p.task_mask[0]) == "000001111"
    p = one(t, MULTI, "null", 2, 9, 1, 9, stepwise=True)
    assert t.render(p.ids[0]) == "B D1 T R D2 D2 D2 D2 D2 D2" and not p.scored_mask().any()

    with pytest.raises(DataError, match="target_pos == source_pos"):
        one(t, MULTI, "count", 0, 5, 1, 4, stepwise=True)


def test_make_pairs_stepwise_positions():
    t = get_task("multiobject")
    rng = np.random.default_rng(3)
    short, long_ = t.sample(200, rng, quantities=[1, 2]), t.sample(200, rng, quantities=[18, 19, 20])
    vt, vs = t.valid_positions(short), t.valid_positions(long_)
    p = make_pairs(t, short, t, long_, "count", 500, rng, stepwise=True)
    assert (p.target_pos == p.source_pos).all()
    assert vt[p.target_index, p.target_pos].all() and vs[p.source_index, p.source_pos].all()
    p = make_pairs(t, short, t, long_, "full", 500, rng, stepwise=True)
    assert vs[p.source_index, p.source_pos].all()
    beyond = p.target_pos >= short.lengths[p.target_index]
    assert beyond.mean() > 0.5  # most source positions lie past the end of a 1-2 demo target
    filler_rows = np.flatnonzero(beyond)
    for r in filler_rows[:20]:
        ln = short.lengths[p.target_index[r]]
        assert (p.ids[r, ln - 1: p.target_pos[r] + 1] == t.filler_token).all()
    assert not (p.task_mask & (np.arange(p.width) <= p.target_pos[:, None])).any()


# ---- sampling of pairs -----------------------------------------------------------------------------------------
def test_make_pairs_indices_and_positions_uniform():
    t = get_task("multiobject")
    rng = np.random.default_rng(0)
    base = t.sample(7, rng)
    p = make_pairs(t, base, t, base, "count", 30, rng)
    assert sorted(p.target_index.tolist()) == sorted((np.arange(30) % 7).tolist())
    assert not (p.target_index == np.arange(30) % 7).all()  # shuffled
    single = t.from_strings(["B D0 D1 D2 D0 T R R R R E"])  # valid positions 1-4, 6-9
    p = make_pairs(t, single, t, single, "count", 8000, rng)
    counts = np.bincount(p.target_pos, minlength=11)
    assert counts[[0, 5, 10]].sum() == 0
    assert (np.abs(counts[[1, 2, 3, 4, 6, 7, 8, 9]] - 1000) < 150).all()
    counts = np.bincount(p.source_pos, minlength=11)
    assert (np.abs(counts[[1, 2, 3, 4, 6, 7, 8, 9]] - 1000) < 150).all()


def test_value_range():
    t = get_task("multiobject")
    rng = np.random.default_rng(1)
    base = t.sample(300, rng)
    states = t.states(base)
    p = make_pairs(t, base, t, base, "count", 2000, rng, value_range=(3, 5))
    src = states["count"][p.source_index, p.source_pos]
    tgt = states["count"][p.target_index, p.target_pos]
    assert ((src >= 3) & (src <= 5)).all() and ((tgt >= 3) & (tgt <= 5)).all()
    assert set(src.tolist()) == {3, 4, 5}
    assert (p.intended["count"] == src).all()
    p = make_pairs(t, base, t, base, "count", 300, rng, stepwise=True, value_range=(10, 12))
    assert (states["count"][p.source_index, p.source_pos] >= 10).all()
    assert (states["count"][p.target_index, p.target_pos] <= 12).all()
    with pytest.raises(DataError, match="no target sequence"):
        make_pairs(t, base, t, base, "count", 10, rng, value_range=(30, 40))
    with pytest.raises(ConfigError, match="value_range applies to one named variable"):
        make_pairs(t, base, t, base, "full", 10, rng, value_range=(1, 2))
    with pytest.raises(ConfigError, match="empty"):
        make_pairs(t, base, t, base, "count", 10, rng, value_range=(5, 2))


def test_variable_errors():
    t, a = get_task("multiobject"), get_task("arithmetic")
    rng = np.random.default_rng(0)
    tb, ab = t.sample(20, rng), a.sample(20, rng)
    with pytest.raises(ConfigError, match="unknown variable 'cout'.*count, phase, full, null"):
        make_pairs(t, tb, t, tb, "cout", 5, rng)
    with pytest.raises(ConfigError, match="'full' needs both tasks"):
        make_pairs(t, tb, a, ab, "full", 5, rng)
    with pytest.raises(ConfigError, match="tuple"):
        make_pairs(t, tb, a, ab, "count", 5, rng)
    with pytest.raises(ConfigError) as err:
        make_pairs(t, tb, a, ab, ("cnt", "remaining"), 5, rng)
    assert len(err.value.problems) == 2 and "remaining_ops" in str(err.value)
    with pytest.raises(ConfigError, match="non-negative"):
        make_pairs(t, tb, t, tb, "count", -1, rng)


def test_cross_counting_tasks():
    """A MultiObject target takes a Modulo source's count: the target's own causal model continues."""
    m, mod = get_task("multiobject"), get_task("modulo")
    p = one(m, MULTI, "count", 1, 3, 0, 5, source_task=mod, source_strings=MOD)  # modulo demo count 5
    assert m.render(p.ids[0]) == "B D2 D2 D2 D2 T R R R R R R E"  # 5 < N=6: one more (copied) demo
    assert intended(p) == {"obj_count": 6, "phase": 0, "count": 5}
    p = one(mod, MOD, "count", 0, 7, 1, 11, source_task=m, source_strings=MULTI)  # multi response count 2
    assert mod.render(p.ids[0]) == "B D0 D1 D2 D0 D1 T R R R E"
    rng = np.random.default_rng(0)
    pairs = make_pairs(m, m.sample(50, rng), mod, mod.sample(50, rng), "full", 100, rng)
    assert pairs.variable == "full" and pairs.swaps == (("count", "count"), ("phase", "phase"))
