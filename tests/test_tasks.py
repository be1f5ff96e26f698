"""Counting tasks: vocabularies, hand-written sequences, states, valid positions, sampling properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks import TASK_NAMES, get_task

COUNTING = ("multiobject", "sameobject", "singleobject", "modulo", "rounding")
F = {
    "multiobject": lambda n: n,
    "sameobject": lambda n: n,
    "singleobject": lambda n: n,
    "modulo": lambda n: n % 4,
    "rounding": lambda n: {1: 0, 2: 3, 3: 3, 4: 3, 5: 6, 6: 6, 7: 6, 8: 9, 9: 9, 10: 9, 11: 12, 12: 12, 13: 12,
                           14: 15, 15: 15, 16: 15, 17: 18, 18: 18, 19: 18, 20: 21}[n],
}
DEMO = {"multiobject": {"D0", "D1", "D2"}, "sameobject": {"D"}, "singleobject": {"D"}, "modulo": {"D0", "D1", "D2"},
        "rounding": {"D0", "D1", "D2"}}
RESP = {"multiobject": "R", "sameobject": "D", "singleobject": "R", "modulo": "R", "rounding": "R"}


def check_counting(name: str, tokens: list[str]) -> int:
    """Independent checker: tokens (no padding) form `B D×N T R×f(N) E`; returns N."""
    assert tokens[0] == "B" and tokens[-1] == "E", tokens
    t = tokens.index("T")
    demos = tokens[1:t]
    assert all(d in DEMO[name] for d in demos), tokens
    n = len(demos)
    assert 1 <= n <= 20
    assert tokens[t + 1:-1] == [RESP[name]] * F[name](n), tokens
    return n


def test_vocab_ids():
    assert get_task("multiobject").vocab.tokens == ("P", "B", "E", "D0", "D1", "D2", "R", "T")
    for name in ("modulo", "rounding"):
        assert get_task(name).vocab.tokens == get_task("multiobject").vocab.tokens
    assert get_task("singleobject").vocab.tokens == ("P", "B", "E", "D", "R", "T")
    assert get_task("sameobject").vocab.tokens == ("P", "B", "E", "D", "T")
    v = get_task("multiobject").vocab
    assert (v.id("D0"), v.id("D1"), v.id("D2"), v.id("R"), v.id("T")) == (3, 4, 5, 6, 7)
    assert v.encode("B D2 T R E").tolist() == [1, 5, 7, 6, 2]
    assert v.decode([1, 3, 7, 6, 2, 0]) == ["B", "D0", "T", "R", "E", "P"]
    with pytest.raises(DataError, match="unknown token 'D9'"):
        v.id("D9")


def test_get_task_errors_and_names():
    assert TASK_NAMES == ("multiobject", "sameobject", "singleobject", "modulo", "rounding", "arithmetic")
    with pytest.raises(ConfigError, match="unknown task 'multiobjct'.*multiobject"):
        get_task("multiobjct")
    assert get_task("MultiObject") is get_task("multiobject")


def test_registered_task_is_a_task_like_the_built_in_ones(monkeypatch):
    import llm_mas.tasks as tasks
    from llm_mas.models.training import TrainConfig
    from llm_mas.tasks import counting, register_task, task_names
    from llm_mas.tasks.binding import get_text_task

    monkeypatch.setattr(tasks, "_FACTORIES", dict(tasks._FACTORIES))
    monkeypatch.setattr(tasks, "_CACHE", dict(tasks._CACHE))
    built = []

    def my_task():
        built.append(1)
        return counting.modulo()

    register_task("My-Modulo", my_task)
    assert task_names() == (*TASK_NAMES, "my-modulo")
    assert get_task("my-modulo") is get_task("MY-MODULO") and len(built) == 1  # built once
    assert get_text_task("my-modulo") is get_task("my-modulo")
    assert not any("unknown task" in p for p in TrainConfig(task="my-modulo").validate())
    with pytest.raises(ConfigError, match="already registered"):
        register_task("my-modulo", my_task)
    register_task("my-modulo", counting.rounding, replace=True)
    assert get_task("my-modulo").name == counting.rounding().name
    with pytest.raises(ConfigError, match="my-modulo"):  # the error lists registered tasks too
        get_task("nope")


def test_max_len_and_filler():
    assert get_task("multiobject").max_len == 43
    assert get_task("modulo").max_len == 26
    assert get_task("rounding").max_len == 44
    assert get_task("multiobject").filler_token == 5  # D2
    assert get_task("sameobject").filler_token == 3  # D


def test_hand_written_states_multiobject():
    task = get_task("multiobject")
    batch = task.from_strings(["B D0 D2 D1 T R R R E", "B D1 T R E"])
    assert batch.lengths.tolist() == [9, 5]
    assert batch.task_mask[0].astype(int).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.task_mask[1].astype(int).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    s = task.states(batch)
    assert s["count"][0].tolist() == [0, 1, 2, 3, 3, 2, 1, 0, -1]
    assert s["phase"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert s["obj_count"][0].tolist() == [3] * 8 + [-1]
    assert s["count"][1].tolist() == [0, 1, 1, 0, -1, -1, -1, -1, -1]
    assert s["phase"][1].tolist() == [0, 0, 1, 1, -1, -1, -1, -1, -1]
    assert task.valid_positions(batch)[0].astype(int).tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert task.valid_positions(batch)[1].astype(int).tolist() == [0, 1, 0, 1, 0, 0, 0, 0, 0]
    assert task.quantities(batch).tolist() == [3, 1]
    assert task.render(batch.ids[1]) == "B D1 T R E"


def test_hand_written_states_modulo_rounding_sameobject():
    mod = get_task("modulo")
    b = mod.from_strings(["B D0 D0 D0 D0 D0 T R E", "B D0 D1 D2 D0 T E"])
    s = mod.states(b)
    assert s["count"][0].tolist() == [0, 1, 2, 3, 4, 5, 1, 0, -1]
    assert s["count"][1].tolist() == [0, 1, 2, 3, 4, 0, -1, -1, -1]  # N = 4 = 0 mod 4: T E
    assert mod.valid_positions(b)[1].astype(int).tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert b.task_mask[1].astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0]

    rnd = get_task("rounding")
    b = rnd.from_strings(["B D0 T E", "B D0 D1 T R R R E"])
    s = rnd.states(b)
    assert s["count"][0].tolist() == [0, 1, 0, -1, -1, -1, -1, -1]
    assert s["count"][1].tolist() == [0, 1, 2, 3, 2, 1, 0, -1]

    same = get_task("sameobject")
    b = same.from_strings(["B D D T D D E"])
    s = same.states(b)
    assert s["count"][0].tolist() == [0, 1, 2, 2, 1, 0, -1]
    assert s["phase"][0].tolist() == [0, 0, 0, 1, 1, 1, -1]
    assert same.valid_positions(b)[0].astype(int).tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert b.task_mask[0].astype(int).tolist() == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name", COUNTING)
def test_sample_distribution_and_holdouts(name):
    task = get_task(name)
    rng = np.random.default_rng(0)
    batch = task.sample(4000, rng, hold_outs=(4, 9, 14, 17))
    assert batch.ids.shape == (4000, task.max_len) and batch.ids.dtype == np.int64
    q = task.quantities(batch)
    assert set(q.tolist()) == set(range(1, 21)) - {4, 9, 14, 17}
    counts = np.bincount(q, minlength=21)[[n for n in range(1, 21) if n not in (4, 9, 14, 17)]]
    assert counts.min() > 4000 / 16 * 0.7  # uniform over the allowed values
    assert (batch.ids[:, 0] == 1).all()
    assert (batch.lengths == np.array([3 + n + F[name](n) for n in q])).all()
    only = task.sample(50, rng, quantities=[7])
    assert (task.quantities(only) == 7).all()
    with pytest.raises(ConfigError, match="no obj_count values left"):
        task.sample(5, rng, quantities=[4], hold_outs=[4])
    with pytest.raises(ConfigError, match="out of range"):
        task.sample(5, rng, quantities=[0, 21])


@pytest.mark.parametrize("name", COUNTING)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_sampled_sequences_are_valid(name, seed, n):
    task = get_task(name)
    batch = task.sample(n, np.random.default_rng(seed))
    states = task.states(batch)
    valid = task.valid_positions(batch)
    for r in range(n):
        length = batch.lengths[r]
        toks = task.vocab.decode(batch.ids[r])
        big_n = check_counting(name, toks[:length])
        assert all(t == "P" for t in toks[length:])
        assert task.quantities(batch)[r] == big_n
        # task tokens: everything after T up to and including E
        t = toks.index("T")
        assert batch.task_mask[r].tolist() == [t < i < length for i in range(batch.width)]
        # valid positions: demo and response inputs
        assert valid[r].tolist() == [(1 <= i <= big_n) or (t < i < length - 1) for i in range(batch.width)]
        # states re-derived by reading tokens one at a time
        count, phase = 0, 0
        for i in range(length - 1):
            tok = toks[i]
            if tok == "T":
                phase, count = 1, F[name](count)
            elif i > 0:
                count += 1 if phase == 0 else -1
            assert (states["count"][r, i], states["phase"][r, i], states["obj_count"][r, i]) == (count, phase, big_n)
        assert (states["count"][r, length - 1:] == -1).all()


def test_sample_determinism():
    task = get_task("multiobject")
    a = task.sample(100, np.random.default_rng(5))
    b = task.sample(100, np.random.default_rng(5))
    assert (a.ids == b.ids).all() and (a.task_mask == b.task_mask).all()
    c = task.sample(100, np.random.default_rng(6))
    assert not (a.ids == c.ids).all()


def test_subset_and_pad():
    task = get_task("singleobject")
    batch = task.sample(10, np.random.default_rng(0))
    sub = batch.subset([3, 1])
    assert len(sub) == 2 and (sub.ids[0] == batch.ids[3]).all() and sub.lengths[1] == batch.lengths[1]
    padded = batch.pad_to(50)
    assert padded.ids.shape == (10, 50) and (padded.ids[:, task.max_len:] == 0).all()
    with pytest.raises(DataError):
        batch.pad_to(5)


def test_analysis_cache_follows_in_place_changes():
    task = get_task("multiobject")
    batch = task.from_strings(["B D0 D1 T R R E"])
    states = task.states(batch)
    states["count"][:] = 99  # returned arrays are copies
    assert task.states(batch)["count"][0].tolist() == [0, 1, 2, 2, 1, 0, -1]
    batch.ids[0] = task.vocab.encode("B D0 T R E P P")  # in-place edit: the cache must not be stale
    assert task.states(batch)["count"][0].tolist() == [0, 1, 1, 0, -1, -1, -1]
    assert get_task("modulo").states(batch)["count"][0].tolist() == [0, 1, 1, 0, -1, -1, -1]
    assert task.states(batch)["count"][0].tolist() == [0, 1, 1, 0, -1, -1, -1]
