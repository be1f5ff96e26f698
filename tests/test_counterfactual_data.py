"""Counterfactual datasets: JSONL/CSV rows, markers resolved per tokenizer, built-in task pairs per model.

The golden row is worked out by hand with the shipped LMs' word-level tokenizer (ids = the MultiObject
task ids: P 0, B 1, E 2, D0 3, D1 4, D2 5, R 6, T 7).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from llm_fixtures import tiny_qwen2_dir

from llm_mas.errors import ConfigError, DataError
from llm_mas.llm.record import IGNORE_INDEX
from llm_mas.tasks import get_task, make_pairs
from llm_mas.tasks.counterfactual_data import encode_task_pairs, encode_text_rows, load_dataset, split_rows

X = IGNORE_INDEX
GOLDEN = {"base": "<bos> D0 D2 T", "source": "<bos> D1 D1 D1 T R", "continuation": "R R R <eos>",
          "base_position": "T", "source_position": "last"}


@pytest.fixture(scope="module")
def word_tokenizer():
    from llm_mas.llm.train_lm import build_word_tokenizer

    return build_word_tokenizer(get_task("multiobject"))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_dir(0))


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_golden_jsonl_row(tmp_path, word_tokenizer):
    rows = load_dataset(write_jsonl(tmp_path / "cf.jsonl", [GOLDEN]))
    enc = encode_text_rows(rows, word_tokenizer)
    # target reads "<bos> D0 D2 T R R R <eos>"; the continuation's 4 tokens are the labels of positions 3..6
    assert enc.target_ids.tolist() == [[1, 3, 5, 7, 6, 6, 6, 2]]
    assert enc.labels.tolist() == [[X, X, X, 6, 6, 6, 2, X]]
    assert enc.target_pos.tolist() == [[3]]            # the word "T"
    assert enc.source_ids.tolist() == [[1, 4, 4, 4, 7, 6]]
    assert enc.source_pos.tolist() == [[5]]            # last
    assert enc.target_mask.tolist() == [[1] * 8]


def test_token_index_markers_and_csv(tmp_path, word_tokenizer):
    path = tmp_path / "cf.csv"
    path.write_text("base,source,continuation,base_position,source_position\n"
                    "<bos> D0 D2 T,<bos> D1 T R,R R <eos>,-2,1\n"
                    "<bos> D0 T,<bos> D1 D1 T,R <eos>,text:D0,\n")
    rows = load_dataset(path)
    assert [r.row for r in rows] == [1, 2]
    enc = encode_text_rows(rows, word_tokenizer)
    assert enc.target_pos.tolist() == [[2], [1]]       # -2 of 4 base tokens; the substring "D0"
    assert enc.source_pos.tolist() == [[1], [3]]
    assert enc.labels.tolist()[1] == [X, X, 6, 2, X, X, X]  # "<bos> D0 T R <eos>", padded to 7 tokens


def test_positions_correspond_across_tokenizers(tmp_path, word_tokenizer, bpe_tokenizer):
    """Two tokenizers put the intervention on the same word and score the same continuation."""
    rows = load_dataset(write_jsonl(tmp_path / "cf.jsonl", [GOLDEN, {**GOLDEN, "base_position": "D0"}]))
    for tok in (word_tokenizer, bpe_tokenizer):
        enc = encode_text_rows(rows, tok)
        for r, word in enumerate(["T", "D0"]):
            ids = enc.target_ids[r][enc.target_mask[r] == 1].tolist()
            t = int(enc.target_pos[r, 0])
            assert tok.decode(ids[:t + 1]).replace(" ", "").endswith(word)      # last token of that word
            scored = [int(x) for x in enc.labels[r] if x != X]
            assert tok.decode(scored).split() == ["R", "R", "R", "<eos>"]
            s_ids = enc.source_ids[r][enc.source_mask[r] == 1].tolist()
            assert int(enc.source_pos[r, 0]) == len(s_ids) - 1
    bpe = encode_text_rows(rows, bpe_tokenizer)
    assert bpe.target_ids.shape[1] > 8                 # the BPE splits words: other token indices, same words


def test_task_pairs_word_tokenizer_equals_task_ids(word_tokenizer):
    """The shipped LMs' tokens are the task ids, so text rendering and the task model's view coincide."""
    task = get_task("multiobject")
    rng = np.random.default_rng(0)
    base = task.sample(40, rng)
    for stepwise in (False, True):
        pairs = make_pairs(task, base, task, base, "count" if not stepwise else "full", 40, rng, stepwise=stepwise)
        as_text = encode_task_pairs(task, pairs, base, word_tokenizer)
        as_ids = encode_task_pairs(task, pairs, base, None)
        for field in ("target_ids", "target_mask", "labels", "target_pos", "source_ids", "source_pos"):
            np.testing.assert_array_equal(getattr(as_text, field), getattr(as_ids, field), err_msg=field)
        if stepwise:  # every position 0..i is intervened, at the same index in source and target
            i = pairs.target_pos
            assert ((as_ids.target_pos >= 0).sum(1) == i + 1).all()
            np.testing.assert_array_equal(as_ids.target_pos, as_ids.source_pos)


def test_task_pairs_bpe_positions_hit_the_same_words(bpe_tokenizer):
    task = get_task("multiobject")
    rng = np.random.default_rng(1)
    base = task.sample(20, rng)
    pairs = make_pairs(task, base, task, base, "count", 20, rng)
    enc = encode_task_pairs(task, pairs, base, bpe_tokenizer)
    words = task.vocab.tokens
    for r in range(20):
        ids = enc.target_ids[r][enc.target_mask[r] == 1].tolist()
        word = words[pairs.ids[r, pairs.target_pos[r]]].replace("B", "<bos>")
        assert bpe_tokenizer.decode(ids[:enc.target_pos[r, 0] + 1]).replace(" ", "").endswith(word)
        scored = [int(x) for x in enc.labels[r] if x != X]
        expected = [words[t] for t, m in zip(pairs.ids[r], pairs.scored_mask()[r]) if m]
        # every token of a scored word is scored (a space token of its own belongs to no word)
        assert bpe_tokenizer.decode(scored).replace(" ", "") == "".join(expected).replace("E", "<eos>")


@pytest.mark.parametrize("row, message", [
    ({**GOLDEN, "base_position": "D1"}, "row 2: base_position: marker 'D1' does not occur in '<bos> D0 D2 T'"),
    ({**GOLDEN, "source_position": "text:X"}, "row 2: source_position: marker 'text:X' does not occur"),
    ({**GOLDEN, "continuation": "  "}, "row 2: empty continuation '  '"),
    ({**GOLDEN, "continuation": 5}, "row 2: continuation must be text, got 5"),
    ({"base": "<bos> D0", "source": "<bos>"}, "row 2: missing continuation"),
    ({**GOLDEN, "label": "R"}, "row 2: unknown keys ['label']"),
    ({**GOLDEN, "base_position": True}, "row 2: base_position: position marker True"),
    ('{"base": "<bos> D0", ', "row 2: not valid JSON"),
    ('[1, 2]', "row 2: expected an object"),
])
def test_bad_rows_name_the_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "cf.jsonl", [GOLDEN, row])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_dataset(path)


def test_bad_csv_row_and_files(tmp_path):
    path = tmp_path / "cf.csv"
    path.write_text("base,source,continuation\n<bos> D0,<bos> D1,R\n<bos> D0,<bos> D1,R,extra\n")
    with pytest.raises(DataError, match=r"row 2: more cells than header columns: \['extra'\]"):
        load_dataset(path)
    with pytest.raises(ConfigError, match="must be a .jsonl or .csv file"):
        load_dataset(tmp_path / "cf.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl")


def test_marker_errors_resolved_per_tokenizer(tmp_path, word_tokenizer):
    rows = load_dataset(write_jsonl(tmp_path / "cf.jsonl", [GOLDEN, {**GOLDEN, "base_position": 4}]))
    with pytest.raises(DataError, match=r"row 2: base_position: token index 4 is outside the 4 tokens"):
        encode_text_rows(rows, word_tokenizer)


def test_split_rows_is_seeded_and_disjoint(tmp_path):
    rows = load_dataset(write_jsonl(tmp_path / "cf.jsonl", [GOLDEN] * 10))
    a, b = split_rows(rows, 100, 100, seed=0), split_rows(rows, 100, 100, seed=0)
    assert [r.row for r in a["valid"]] == [r.row for r in b["valid"]] and len(a["valid"]) == 2
    assert sorted(r.row for r in a["train"] + a["valid"]) == list(range(1, 11))
    with pytest.raises(DataError, match="at least 2 rows"):
        split_rows(rows[:1], 10, 10, seed=0)


# ------------------------------------------------------------------------------------------- unknown tokens
def test_unknown_words_are_listed_per_row_and_field(tmp_path, word_tokenizer, bpe_tokenizer):
    """The word-level tokenizer (unknown token '<unk>', id 8) reads the task's own notation 'B'/'E' and a
    stray word as '<unk>'; each one is listed with its row and field, and the report names all of them."""
    from llm_mas.tasks.counterfactual_data import unknown_token_id, unknown_token_report

    rows = load_dataset(write_jsonl(tmp_path / "cf.jsonl", [
        GOLDEN,
        {"base": "B D0 D2 T", "source": "<bos> D1 X T R", "continuation": "R R R E"},
        {"base": "B D1 T", "source": "<bos> D1 T", "continuation": "R <eos>", "base_position": "T"},
        {"base": "B D2 T", "source": "B D1 T", "continuation": "R <eos>"},
    ]))
    assert unknown_token_id(word_tokenizer) == 8 and unknown_token_id(bpe_tokenizer) is None
    enc = encode_text_rows(rows, word_tokenizer)
    assert enc.unknown == [(2, "base", "B"), (2, "continuation", "E"), (2, "source", "X"), (3, "base", "B"),
                           (4, "base", "B"), (4, "source", "B")]
    assert enc.target_ids[1, 0] == 8 and enc.target_ids[1, 7] == 8  # what the model would have read
    lines = unknown_token_report(enc.unknown, word_tokenizer, "models.0 (lm)", "cf.jsonl")
    assert lines == [
        "cf.jsonl: models.0 (lm) reads the word 'B' (did you mean '<bos>'?) as its unknown token '<unk>', in base "
        "of rows 2-4; source of rows 4",
        "cf.jsonl: models.0 (lm) reads the word 'E' (did you mean '<eos>'?) as its unknown token '<unk>', in "
        "continuation of rows 2",
        "cf.jsonl: models.0 (lm) reads the word 'X' as its unknown token '<unk>', in source of rows 2"]
    assert encode_text_rows(rows[:1], word_tokenizer).unknown == []
    csv_path = tmp_path / "cf.csv"
    csv_path.write_text("base,source,continuation\n<bos> D0 T,<bos> D1 T,R <eos>\nB D0 T,<bos> D1 T,R E\n")
    assert encode_text_rows(load_dataset(csv_path), word_tokenizer).unknown == [(2, "base", "B"),
                                                                               (2, "continuation", "E")]
    assert encode_text_rows(rows, bpe_tokenizer).unknown == []  # a byte-level BPE has no unknown token


def test_task_pairs_list_words_another_task_uses(word_tokenizer):
    """The MultiObject word tokenizer reading the binding task: its names, digits and signs are unknown."""
    from llm_mas.tasks.binding import get_text_task

    task = get_text_task("binding")
    rng = np.random.default_rng(0)
    base = task.sample(6, rng)
    pairs = make_pairs(task, base, task, base, "full", 6, rng)
    enc = encode_task_pairs(task, pairs, base, word_tokenizer)
    words = {word for _, _, word in enc.unknown}
    assert {"=", ",", ";", "?"} <= words and not words & {"<bos>", "<eos>"}
    assert {field for _, field, _ in enc.unknown} == {"target", "source"}
    # per pair and text: exactly the tokens that are '<unk>'
    n_unknown_target = int((enc.target_ids == 8).sum())
    assert sum(1 for _, field, _ in enc.unknown if field == "target") == n_unknown_target > 0
    multiobject = get_task("multiobject")
    mo_base = multiobject.sample(6, rng)
    mo_pairs = make_pairs(multiobject, mo_base, multiobject, mo_base, "full", 6, rng)
    assert encode_task_pairs(multiobject, mo_pairs, mo_base, word_tokenizer).unknown == []
