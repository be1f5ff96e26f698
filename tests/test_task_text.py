"""Tasks rendered as text, positions resolved per tokenizer, the binding task and its counterfactuals.

Golden counterfactuals are worked out by hand from the causal models (docstrings of llm_mas.tasks.counting,
llm_mas.tasks.arithmetic and llm_mas.tasks.binding) and written down as text.
"""

from __future__ import annotations

import numpy as np
import pytest
from llm_fixtures import tiny_qwen2_dir

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks import get_task
from llm_mas.tasks.binding import binding, get_text_task
from llm_mas.tasks.pairs import build_pairs, make_pairs
from llm_mas.tasks.text import counterfactual_rows, render_texts, resolve_positions, task_words


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_dir(0))


def word_tokenizer(task):
    from llm_mas.llm.train_lm import build_word_tokenizer

    return build_word_tokenizer(task)


# ---------------------------------------------------------------------------------------------- rendering
def test_render_multiobject_one_word_per_token():
    task = get_task("multiobject")
    batch = task.from_strings(["B D0 D2 T R R E", "B D1 T R E"])
    rendered = render_texts(task, batch)
    assert rendered.texts == ["<bos> D0 D2 T R R <eos>", "<bos> D1 T R <eos>"]
    assert rendered.spans[0].tolist() == [[0, 5], [6, 8], [9, 11], [12, 13], [14, 15], [16, 17], [18, 23]]
    assert len(rendered.spans[1]) == 5  # trailing PAD dropped


def test_every_task_renders(bpe_tokenizer):
    for name in ("multiobject", "sameobject", "singleobject", "modulo", "rounding", "arithmetic", "binding"):
        task = get_text_task(name)
        batch = task.sample(8, np.random.default_rng(0))
        rendered = render_texts(task, batch)
        for r, text in enumerate(rendered.texts):
            assert len(text.split(" ")) == int(batch.lengths[r])
        encoded = resolve_positions(bpe_tokenizer, rendered)
        assert ((encoded.positions >= 0) == (np.arange(batch.width)[None, :] < batch.lengths[:, None])).all()


def test_word_tokenizer_ids_equal_task_ids():
    for name in ("multiobject", "arithmetic", "binding"):
        task = get_text_task(name)
        batch = task.sample(16, np.random.default_rng(1))
        tokenizer = word_tokenizer(task)
        encoded = resolve_positions(tokenizer, render_texts(task, batch))
        # right padding with <pad> = 0 = PAD: exactly the task batch, one token per word
        assert encoded.input_ids.shape[1] == int(batch.lengths.max())
        assert (encoded.input_ids == batch.ids[:, : encoded.input_ids.shape[1]]).all()
        inside = np.arange(batch.width)[None, :] < batch.lengths[:, None]
        assert (encoded.positions == np.where(inside, np.arange(batch.width)[None, :], -1)).all()


def test_positions_correspond_across_two_tokenizers(bpe_tokenizer):
    """The byte-level BPE splits words ("<bos>", "17"), the word-level one does not; both resolve each task
    position to the token that ends that word, so they name the same word at every position."""
    task = get_task("arithmetic")
    batch = task.from_strings(["B 2 5 + 12 = 17 , - 4 = 13 E", "B 1 20 - 20 = 0 E"])
    rendered = render_texts(task, batch)
    bpe = resolve_positions(bpe_tokenizer, rendered)
    word = resolve_positions(word_tokenizer(task), rendered)
    words = [t.split(" ") for t in rendered.texts]
    # hand-checked: "<bos>" is 3+ BPE tokens, "12" and "17" are two digits each (Qwen2 splits digits)
    assert bpe.input_ids.shape[1] > word.input_ids.shape[1]
    for r in range(2):
        n = len(words[r])
        for p in range(n):
            tokens_of_p = np.flatnonzero(bpe.word_of_token[r] == p)
            assert bpe.positions[r, p] == tokens_of_p.max()  # the last token of the word
            piece = bpe_tokenizer.decode(bpe.input_ids[r, tokens_of_p]).strip()
            assert piece == words[r][p]
            assert word.positions[r, p] == p
            assert bpe.word_of_token[r, bpe.positions[r, p]] == word.word_of_token[r, word.positions[r, p]] == p
    # "17" (position 6 of row 0) is two BPE tokens: "1", "7"; the first-token choice picks "1"
    first = resolve_positions(bpe_tokenizer, rendered, which="first")
    assert bpe_tokenizer.decode(bpe.input_ids[0, first.positions[0, 6]]).strip() == "1"
    assert bpe_tokenizer.decode(bpe.input_ids[0, bpe.positions[0, 6]]).strip() == "7"
    # left padding of the BPE tokenizer: row 1 is shorter and its positions shift by the padding
    pad = int((bpe.attention_mask[1] == 0).sum())
    assert pad > 0 and bpe.positions[1, 0] >= pad


def test_text_errors(bpe_tokenizer):
    task = get_task("multiobject")
    with pytest.raises(DataError, match="outside its vocabulary"):
        render_texts(task, np.array([[1, 3, 99, 2]]))
    with pytest.raises(ConfigError, match="valid choices: last, first"):
        resolve_positions(bpe_tokenizer, render_texts(task, task.from_strings(["B D0 T R E"])), which="middle")
    from types import SimpleNamespace

    with pytest.raises(ConfigError, match="slow tokenizer"):
        resolve_positions(SimpleNamespace(is_fast=False, pad_token="<pad>"), render_texts(task, np.array([[1, 3, 2]])))


# ---------------------------------------------------------------------------------------------- golden cfs
def rows_for(task, base_strings, source_strings, variable, target_pos, source_pos, stepwise=False):
    base, source = task.from_strings(base_strings), task.from_strings(source_strings)
    n = len(target_pos)
    pairs = build_pairs(task, base, task, source, variable, np.zeros(n, int) if len(base) == 1 else np.arange(n),
                        target_pos, np.zeros(n, int), source_pos, np.random.default_rng(0), stepwise=stepwise)
    return counterfactual_rows(task, task, source, pairs)


def test_golden_multiobject_counterfactuals():
    task = get_task("multiobject")
    # target N=3, source N=5; swap count at target pos 2 (count 2) <- source pos 4 (count 4): demo phase with
    # count 4 >= N: no more demos, T, f(max(4, 3)) = 4 responses, E
    (row,) = rows_for(task, ["B D0 D1 D2 T R R R E"], ["B D1 D1 D1 D1 D1 T R R R R R E"], "count", [2], [4])
    assert row["base"] == "<bos> D0 D1"
    assert row["continuation"] == "T R R R R <eos>"
    assert row["scored"] == [0, 1, 1, 1, 1, 1]
    assert row["source"] == "<bos> D1 D1 D1 D1 D1 T R R R R R <eos>"
    # response phase: target pos 6 (after T R: count 2 left) <- source pos 8 (count 5 - 2 = 3 left): R R R E
    (row,) = rows_for(task, ["B D0 D1 D2 T R R R E"], ["B D1 D1 D1 D1 D1 T R R R R R E"], "count", [5], [8])
    assert row["base"] == "<bos> D0 D1 D2 T R" and row["continuation"] == "R R R <eos>"
    # stepwise "full" at i = 4: positions 0..4 of the target intervened with the source's state after 4 demos
    # (phase 0, count 4); the base text is the target's prefix, T is given, then 4 responses
    (row,) = rows_for(task, ["B D0 D1 D2 T R R R E"], ["B D1 D1 D1 D1 D1 T R R R R R E"], "full", [4], [4],
                      stepwise=True)
    assert row["base"] == "<bos> D0 D1 D2 T" and row["continuation"] == "T R R R R <eos>"
    assert row["scored"] == [0, 1, 1, 1, 1, 1] and row["stepwise"]


def test_golden_arithmetic_counterfactuals():
    task = get_task("arithmetic")
    base, source = ["B 2 5 + 3 = 8 , - 4 = 4 E"], ["B 1 10 + 0 = 10 E"]
    # cumulative_value 5 -> 10 after v0: the given operands stay feasible: 10 + 3 = 13, 13 - 4 = 9
    (row,) = rows_for(task, base, source, "cumulative_value", [2], [2])
    assert row["base"] == "<bos> 2 5" and row["continuation"] == "+ 3 = 13 , - 4 = 9 <eos>"
    assert row["scored"] == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1]
    # remaining_ops 2 -> 1 after v0: one operation, then E
    (row,) = rows_for(task, base, source, "remaining_ops", [2], [2])
    assert row["continuation"] == "+ 3 = 8 <eos>"


def test_golden_binding_counterfactuals():
    task = binding()
    base, source = ["B a = 3 , b = 5 , c = 1 ; ? b 5 E"], ["B e = 9 , a = 2 ; ? a 2 E"]
    # b's value (pos 7) <- 9: b is queried, the answer becomes 9
    (row,) = rows_for(task, base, source, "value", [7], [3])
    assert row["base"] == "<bos> a = 3 , b = 5" and row["continuation"] == ", c = 1 ; ? b 9 <eos>"
    assert row["scored"] == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    # a's value (pos 3) or c's value (pos 11) swapped: not queried, the answer stays 5
    (row,) = rows_for(task, base, source, "value", [3], [3])
    assert row["continuation"] == ", b = 5 , c = 1 ; ? b 5 <eos>"
    (row,) = rows_for(task, base, source, "value", [11], [7])
    assert row["continuation"] == "; ? b 5 <eos>"
    # stepwise at i = 7: the source's state at 7 is a's value 2; b now holds 2
    (row,) = rows_for(task, base, source, "value", [7], [7], stepwise=True)
    assert row["base"] == "<bos> a = 3 , b = 5" and row["continuation"] == ", c = 1 ; ? b 2 <eos>"


# ---------------------------------------------------------------------------------------------- binding
def test_binding_sampling_and_causal_model():
    task = binding()
    batch = task.sample(500, np.random.default_rng(3))
    assert (task.task_mask_of(batch.ids) == batch.task_mask).all()
    n_vars = task.quantities(batch)
    assert set(n_vars.tolist()) == set(range(1, 7)) and (batch.lengths == 4 * n_vars + 5).all()
    states = task.states(batch)
    rows = np.arange(len(batch))
    answer_col = batch.lengths - 2  # ... ? q answer E
    binds = np.stack([states[f"bind_{c}"][rows, answer_col - 1] for c in "abcdefgh"], axis=1)  # (n, 8)
    query = states["query"][rows, answer_col - 1]
    assert (batch.ids[rows, answer_col] - 11 == binds[rows, query]).all()
    assert (task.valid_positions(batch) == (states["stage"] == 3)).all()
    assert task_words(task)[11:21] == tuple(str(v) for v in range(10))


def test_binding_pairs_follow_the_query():
    """Indywise value swaps: the answer becomes the source value iff the swapped slot is the queried one."""
    task = binding()
    rng = np.random.default_rng(4)
    base = task.sample(400, rng)
    pairs = make_pairs(task, base, task, base, "value", 400, rng)
    states = task.states(base)
    t, tp = pairs.target_index, pairs.target_pos
    swapped_name = states["current"][t, tp]
    query = states["query"][t, base.lengths[t] - 3]  # at the queried name
    source_value = states["value"][pairs.source_index, pairs.source_pos]
    original_answer = base.ids[t, base.lengths[t] - 2] - 11
    cf_answer = pairs.ids[np.arange(len(pairs)), pairs.lengths - 2] - 11
    expected = np.where(swapped_name == query, source_value, original_answer)
    assert (cf_answer == expected).all()
    assert (swapped_name == query).any() and (swapped_name != query).any()
    # everything but the answer is the target's own sequence
    answer_col = base.lengths[t] - 2
    assert (pairs.lengths == base.lengths[t]).all()
    keep = np.arange(pairs.width)[None, :] != answer_col[:, None]
    assert ((pairs.ids == base.ids[t][:, : pairs.width]) | ~keep).all()
    stepwise = make_pairs(task, base, task, base, "value", 200, rng, stepwise=True)
    assert (stepwise.target_pos == stepwise.source_pos).all()


def test_binding_errors():
    task = binding()
    with pytest.raises(DataError, match="row 1, position 5"):  # a name bound twice
        task.from_strings(["B a = 1 ; ? a 1 E", "B a = 1 , a = 2 ; ? a 2 E"])
    with pytest.raises(DataError, match="row 0, position 6"):  # a query of an unbound name
        task.from_strings(["B a = 1 ; ? b 1 E"])
    with pytest.raises(ConfigError, match="1..6"):
        task.sample(3, np.random.default_rng(0), quantities=[7])
    with pytest.raises(ConfigError, match="valid choices"):
        get_text_task("bindings")


# ------------------------------------------------------------------- binding counterfactuals at the query
def test_golden_query_counterfactual_labels():
    """Intervening at the queried name: hand-computed answers of the causal model."""
    from llm_mas.tasks.binding import query_counterfactual_labels

    task = binding()
    base = task.from_strings(["B a = 3 , b = 5 , c = 1 ; ? b 5 E", "B d = 4 ; ? d 4 E"]).ids
    source = task.from_strings(["B e = 9 , a = 2 ; ? a 2 E", "B c = 7 , d = 0 ; ? c 7 E"])
    src = np.zeros_like(base)
    src[:, : source.ids.shape[1]] = source.ids
    # answer: the source's retrieved value (a -> 2; c -> 7)
    assert query_counterfactual_labels(base, src, "answer").tolist() == [2, 7]
    # query: the base's binding of the source's query name (a -> 3 in row 0; c is unbound in row 1: -1)
    assert query_counterfactual_labels(base, src, "query").tolist() == [3, -1]
    with pytest.raises(ConfigError, match="valid choices: answer, query"):
        query_counterfactual_labels(base, src, "value")


def test_binding_counterfactual_rows_follow_the_causal_model(tmp_path):
    from llm_mas.llm.train_lm import build_word_tokenizer
    from llm_mas.tasks.binding import binding_counterfactual_rows, write_counterfactual_dataset
    from llm_mas.tasks.counterfactual_data import encode_text_rows, load_dataset

    task = binding()
    for mode in ("answer", "query"):
        rows = binding_counterfactual_rows(300, seed=5, mode=mode)
        assert len(rows) == 300 and rows == binding_counterfactual_rows(300, seed=5, mode=mode)
        vocab = {w: i for i, w in enumerate(task_words(task))}
        for row in rows:
            base = [vocab[w] for w in row["base"].split()]
            source = [vocab[w] for w in row["source"].split()]
            assert base[-2] == vocab["?"] and source[-2] == vocab["?"]  # both end at the queried name
            binds = {base[i]: int(row["base"].split()[i + 2]) for i in range(1, len(base) - 3, 4)}
            s_binds = {source[i]: int(row["source"].split()[i + 2]) for i in range(1, len(source) - 3, 4)}
            expected = s_binds[source[-1]] if mode == "answer" else binds[source[-1]]
            assert int(row["continuation"]) == expected != binds[base[-1]]  # informative: not the base's answer
        lengths = {len(r["base"].split()) for r in rows}
        assert lengths >= {4 * n + 3 for n in range(2, 7)}  # N = 2..6 in the bases (N = 1 too for answer)
        assert (4 * 1 + 3 in lengths) == (mode == "answer")
    path = write_counterfactual_dataset(tmp_path / "cf" / "answer.jsonl", 20, seed=1)
    loaded = load_dataset(path)
    assert [r.continuation for r in loaded] == [r["continuation"] for r in binding_counterfactual_rows(20, 1)]
    encoded = encode_text_rows(loaded, build_word_tokenizer(task))
    rows_ = np.arange(len(loaded))
    names = [vocab[c] for c in "abcdefgh"]
    target_tokens = encoded.target_ids[rows_, encoded.target_pos[:, 0]]  # intervened at the queried name
    assert np.isin(target_tokens, names).all()
    assert (encoded.target_ids[rows_, encoded.target_pos[:, 0] - 1] == vocab["?"]).all()
    assert (target_tokens == [vocab[r.base.split()[-1]] for r in loaded]).all()
    assert (encoded.source_ids[rows_, encoded.source_pos[:, 0] - 1] == vocab["?"]).all()
    with pytest.raises(ConfigError, match="valid choices"):
        binding_counterfactual_rows(5, 0, mode="name")
    with pytest.raises(ConfigError, match="positive integer"):
        binding_counterfactual_rows(0, 0)


def test_extra_queries_ask_bound_names_and_score_their_values():
    from llm_mas.tasks.binding import EOS, QUESTION, SEMICOLON, with_extra_queries

    task = binding()
    rng = np.random.default_rng(11)
    batch = task.sample(300, rng)
    ids, scored = with_extra_queries(batch, 4, 0.5, rng)
    assert ids.shape == scored.shape == (300, task.max_len + 12)
    drilled = (ids == QUESTION).sum(axis=1) == 4
    assert 0.4 < drilled.mean() < 0.6 and ((ids == QUESTION).sum(axis=1)[~drilled] == 1).all()
    assert (ids[~drilled, : batch.ids.shape[1]] == batch.ids[~drilled]).all()
    assert (scored[~drilled, : batch.ids.shape[1]] == batch.task_mask[~drilled]).all()
    words = task_words(task)
    for r in np.flatnonzero(drilled)[:50]:
        tokens = [words[t] for t in ids[r] if t != 0]
        cut = tokens.index("?")
        assert tokens[:cut] == [words[t] for t in batch.ids[r, :cut]]  # the bindings are kept
        binds = {tokens[i]: tokens[i + 2] for i in range(1, cut - 1, 4)}
        questions = tokens[cut:]
        assert len(questions) == 16 and questions[-1] == words[EOS]
        for j in range(4):
            mark, name, value, end = questions[4 * j: 4 * j + 4]
            assert mark == "?" and binds[name] == value and end == (words[EOS] if j == 3 else words[SEMICOLON])
        assert (np.flatnonzero(scored[r]) == cut + 2 + 4 * np.arange(4)).all()  # the answers only
    assert with_extra_queries(batch, 1, 0.0, rng)[0].shape == batch.ids.shape
    with pytest.raises(ConfigError, match="positive integer, got 0"):
        with_extra_queries(batch, 0, 0.5, rng)
    with pytest.raises(ConfigError, match=r"in \[0, 1\], got 2"):
        with_extra_queries(batch, 2, 2, rng)
