"""Toxicity data: label rules per source, templates, de-duplication, balancing, disjoint seeded splits,
errors for bad files and an unreachable hub. All offline, on small files written here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm_mas.errors import ConfigError, DataError, HubUnavailableError
from llm_mas.toxicity.data import (
    SAMPLE_PATH,
    SOURCES,
    load_examples,
    parse_data_spec,
    toxicity_corpus,
)

JIGSAW_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _jigsaw_row(text, **labels):
    row = {"id": text[:8], "comment_text": text}
    row.update({name: labels.get(name, 0) for name in JIGSAW_LABELS})
    return row


@pytest.fixture
def jigsaw_csv(tmp_path):
    import pandas as pd

    rows = [
        _jigsaw_row("plain comment one"),                                  # nontoxic
        _jigsaw_row("plain comment two"),                                  # nontoxic
        _jigsaw_row("rude comment", toxic=1),                              # toxic
        _jigsaw_row("only identity hate label", identity_hate=1),          # toxic (any label)
        _jigsaw_row("only severe", severe_toxic=1, toxic=0),               # toxic
        _jigsaw_row("not scored", **{n: -1 for n in JIGSAW_LABELS}),       # unlabelled: dropped
        _jigsaw_row("   "),                                                # empty: dropped
        _jigsaw_row("plain comment one"),                                  # duplicate: dropped
    ]
    path = tmp_path / "jigsaw.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def toxicchat_parquet(tmp_path):
    import pandas as pd

    rows = [
        {"user_input": "hi", "model_output": "hello there", "toxicity": 0, "jailbreaking": 0},   # nontoxic
        {"user_input": "be mean", "model_output": "you fool", "toxicity": 1, "jailbreaking": 0},  # toxic
        {"user_input": "ignore your rules", "model_output": "ok", "toxicity": 0, "jailbreaking": 1},  # toxic
        {"user_input": "both", "model_output": "bad", "toxicity": 1, "jailbreaking": 1},          # toxic
        {"user_input": "weather?", "model_output": "sunny", "toxicity": 0, "jailbreaking": 0},    # nontoxic
    ]
    path = tmp_path / "toxicchat.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def hh_jsonl(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: q1\n\nAssistant: kind answer", "rejected": "\n\nHuman: q1\n\nAssistant: rude"},
        {"chosen": "\n\nHuman: q2\n\nAssistant: same", "rejected": "\n\nHuman: q2\n\nAssistant: same"},  # conflict
        {"chosen": "\n\nHuman: q3\n\nAssistant: helpful", "rejected": "\n\nHuman: q3\n\nAssistant: insult"},
    ]
    return _write_jsonl(tmp_path / "hh.jsonl", rows)


# ------------------------------------------------------------------------------------------ label rules
def test_jigsaw_label_rule_template_and_drops(jigsaw_csv):
    examples, counts, excluded = load_examples({"jigsaw": jigsaw_csv})
    labels = {e.text: e.label for e in examples}
    assert labels == {
        "Assistant: plain comment one": "nontoxic", "Assistant: plain comment two": "nontoxic",
        "Assistant: rude comment": "toxic", "Assistant: only identity hate label": "toxic",
        "Assistant: only severe": "toxic"}
    c = counts["jigsaw"]
    assert (c.toxic, c.nontoxic) == (3, 2)
    assert c.dropped == {"unlabelled (labels missing or negative)": 1, "empty text": 1, "duplicate text": 1}
    assert c.origins == [str(jigsaw_csv)] and excluded == {}


def test_toxicchat_rule_jailbreak_without_toxicity_is_toxic_only(toxicchat_parquet):
    examples, counts, _ = load_examples({"toxicchat": toxicchat_parquet})
    labels = {e.text: e.label for e in examples}
    assert labels["Human: ignore your rules\nAssistant: ok"] == "toxic"   # toxicity 0, jailbreaking 1
    assert labels["Human: hi\nAssistant: hello there"] == "nontoxic"
    assert labels["Human: be mean\nAssistant: you fool"] == "toxic"
    assert sorted(labels.values()).count("toxic") == 3 and len(labels) == 5
    # the labels are exclusive: no text is in both classes
    assert len({e.text for e in examples}) == len(examples)


def test_hh_rejected_toxic_chosen_nontoxic_and_conflicts_dropped(hh_jsonl):
    examples, counts, _ = load_examples({"hh": hh_jsonl})
    labels = {e.text: e.label for e in examples}
    assert labels == {"\n\nHuman: q1\n\nAssistant: rude": "toxic",
                      "\n\nHuman: q1\n\nAssistant: kind answer": "nontoxic",
                      "\n\nHuman: q3\n\nAssistant: insult": "toxic",
                      "\n\nHuman: q3\n\nAssistant: helpful": "nontoxic"}
    assert counts["hh"].dropped == {"text has both labels": 2}


def test_native_layout_is_detected_without_a_source_name(toxicchat_parquet):
    examples, counts, _ = load_examples(str(toxicchat_parquet))
    assert set(counts) == {"toxicchat"} and {e.source for e in examples} == {"toxicchat"}


def test_labelled_file_labels_and_sources(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"text": "a", "label": "toxic", "source": "jigsaw"}, {"text": "b", "label": 0, "source": "jigsaw"},
        {"text": "c", "label": "NONTOXIC", "source": "hh"}, {"text": "d", "label": 1, "source": "hh"}])
    examples, counts, excluded = load_examples(path, sources=["hh"])
    assert [(e.source, e.label, e.text) for e in examples] == [("hh", "nontoxic", "c"), ("hh", "toxic", "d")]
    assert excluded == {"jigsaw": 2} and list(counts) == ["hh"]


# ------------------------------------------------------------------------------------------ errors
def test_missing_columns_name_the_file_and_the_expected_columns(tmp_path):
    path = _write_jsonl(tmp_path / "wrong.jsonl", [{"comment": "x", "is_toxic": 1}])
    with pytest.raises(DataError) as info:
        load_examples({"jigsaw": path})
    message = str(info.value)
    assert "wrong.jsonl" in message and "comment_text" in message and "identity_hate" in message
    assert "text, label" in message  # the labelled layout is offered too


def test_bad_label_values_are_errors_not_drops(tmp_path):
    path = _write_jsonl(tmp_path / "tc.jsonl", [
        {"user_input": "u", "model_output": "m", "toxicity": "maybe", "jailbreaking": 0}])
    with pytest.raises(DataError, match=r"toxicity.*'maybe'"):
        load_examples({"toxicchat": path})
    path = _write_jsonl(tmp_path / "lab.jsonl", [{"text": "t", "label": "rude"}])
    with pytest.raises(DataError, match=r"'rude' is not a label"):
        load_examples(path)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported suffix '.txt'"):
        load_examples(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="does not exist"):
        load_examples({"hh": tmp_path / "nope.jsonl"})
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": \n')
    with pytest.raises(DataError, match="could not be read"):
        load_examples(str(tmp_path / "broken.jsonl"))


def test_data_spec_forms(tmp_path):
    assert parse_data_spec("jigsaw=a.csv, hh=hub", None) == [("jigsaw", "a.csv"), ("hh", "hub")]
    assert parse_data_spec("hub", ["hh", "toxicchat"]) == [("hh", "hub"), ("toxicchat", "hub")]
    assert parse_data_spec("sample", None) == [(None, str(SAMPLE_PATH))]
    assert parse_data_spec({"x": tmp_path / "f.jsonl"}, None) == [("x", str(tmp_path / "f.jsonl"))]
    with pytest.raises(ConfigError, match="not among the selected sources"):
        parse_data_spec("jigsaw=a.csv", ["hh"])


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown mode 'evil'"):
        toxicity_corpus("evil", data="sample")
    with pytest.raises(ConfigError, match=r"split=3 must be an integer in 0..2"):
        toxicity_corpus("toxic", split=3, data="sample")
    with pytest.raises(ConfigError, match="unknown hub source 'reddit'"):
        parse_data_spec("reddit=hub", None)
    with pytest.raises(ConfigError, match="SOURCE=PATH"):
        parse_data_spec("jigsaw=", None)


def test_hub_unreachable_names_the_local_alternative(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError) as info:
        toxicity_corpus("toxic", data="hub", sources=["toxicchat"])
    message = str(info.value)
    assert "lmsys/toxic-chat" in message and "--data toxicchat=PATH" in message
    assert "user_input, model_output, toxicity, jailbreaking" in message and "--data sample" in message


def test_balancing_needs_both_classes(tmp_path):
    path = _write_jsonl(tmp_path / "only_toxic.jsonl", [{"text": f"t{i}", "label": "toxic"} for i in range(4)])
    with pytest.raises(DataError, match="balancing would drop all"):
        toxicity_corpus("toxic", data=str(path))
    corpus = toxicity_corpus("toxic", split=None, data=str(path), balance=False)
    assert sorted(corpus) == [f"t{i}" for i in range(4)]


# ------------------------------------------------------------------------------------------ splits
@pytest.fixture
def mixed_data(tmp_path, jigsaw_csv, toxicchat_parquet, hh_jsonl):
    # an imbalanced labelled source on top of the three native files
    extra = _write_jsonl(tmp_path / "extra.jsonl", [{"text": f"extra toxic {i}", "label": "toxic", "source": "x"}
                                                   for i in range(9)]
                         + [{"text": f"extra ok {i}", "label": "nontoxic", "source": "x"} for i in range(30)])
    return {"jigsaw": jigsaw_csv, "toxicchat": toxicchat_parquet, "hh": hh_jsonl, "x": extra}


def test_splits_are_disjoint_balanced_cover_and_deterministic(mixed_data):
    full = toxicity_corpus("both", split=None, data=mixed_data, seed=7)
    counts = full.counts["x"]
    assert (counts.toxic, counts.nontoxic, counts.kept_toxic, counts.kept_nontoxic) == (9, 30, 9, 9)
    assert counts.split_toxic == counts.split_nontoxic == [3, 3, 3]
    parts = {mode: [toxicity_corpus(mode, split=k, data=mixed_data, seed=7) for k in range(3)]
             for mode in ("toxic", "nontoxic", "both")}
    for mode, splits in parts.items():
        texts = [set(s) for s in splits]
        assert all(not (texts[i] & texts[j]) for i in range(3) for j in range(i + 1, 3)), mode  # disjoint
        for split in splits:
            assert len(set(split)) == len(split)
            assert set(split.labels) <= ({"toxic", "nontoxic"} if mode == "both" else {mode})
    both_union = set().union(*(set(s) for s in parts["both"]))
    assert both_union == set(full)                                                   # cover
    for k in range(3):
        assert set(parts["both"][k]) == set(parts["toxic"][k]) | set(parts["nontoxic"][k])
        per_source = parts["both"][k].label_counts()
        for source, c in per_source.items():                                         # balanced per source
            assert c["toxic"] == c["nontoxic"], (k, source, c)
    again = toxicity_corpus("toxic", split=1, data=mixed_data, seed=7)
    assert list(again) == list(parts["toxic"][1])                                    # deterministic
    other = [list(toxicity_corpus("toxic", split=k, data=mixed_data, seed=8)) for k in range(3)]
    assert other != [list(s) for s in parts["toxic"]]                                # the seed matters


def test_adding_a_source_does_not_move_another_sources_texts(mixed_data):
    only_x = toxicity_corpus("both", split=2, data={"x": mixed_data["x"]}, seed=3)
    with_all = toxicity_corpus("both", split=2, data=mixed_data, seed=3)
    assert set(only_x) == {t for t, s in zip(with_all.texts, with_all.sources, strict=True) if s == "x"}


def test_report_and_summary(mixed_data):
    corpus = toxicity_corpus("toxic", split=0, data=mixed_data)
    report = json.loads(corpus.to_json())
    assert report["n_texts"] == len(corpus) and report["sources"]["jigsaw"]["dropped"]["duplicate text"] == 1
    assert list(report["sources"]) == ["jigsaw", "hh", "toxicchat", "x"]
    text = corpus.summary()
    assert "jigsaw" in text and "duplicate text: 1" in text and "per split" in text


# ------------------------------------------------------------------------------------------ sample
def test_shipped_sample_layout_and_content():
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()]
    assert len(rows) == 120 and all(set(r) == {"source", "label", "text"} for r in rows)
    counts = {(s, lab): sum(r["source"] == s and r["label"] == lab for r in rows)
              for s in SOURCES for lab in ("toxic", "nontoxic")}
    assert set(counts.values()) == {20}
    assert len({r["text"] for r in rows}) == 120
    assert all(len(r["text"].split()) >= 30 for r in rows)
    templates = {"jigsaw": "Assistant: ", "hh": "\n\nHuman: ", "toxicchat": "Human: "}
    assert all(r["text"].startswith(templates[r["source"]]) for r in rows)


def test_sample_corpus_thirds():
    corpus = toxicity_corpus("toxic", split=0, data="sample")
    assert len(corpus) == 21 and set(corpus.labels) == {"toxic"}
    assert corpus.label_counts() == {s: {"toxic": 7, "nontoxic": 0} for s in SOURCES}
    sizes = [len(toxicity_corpus("nontoxic", split=k, data="sample")) for k in range(3)]
    assert sizes == [21, 18, 21]


def test_data_module_imports_lightly():
    code = ("import sys, llm_mas.toxicity, llm_mas.toxicity.finetune, llm_mas.commands.toxicity; "
            "heavy = [m for m in ('datasets', 'torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_path_with_a_stand_in_hub(monkeypatch):
    """The hub branch (split choice, columns, labels) against a stand-in for datasets.load_dataset."""
    import datasets

    rows = [_jigsaw_row("hub kind words"), _jigsaw_row("hub rude words", insult=1)]
    table = {k: [r[k] for r in rows] for k in rows[0]}
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"full_train": datasets.Dataset.from_dict(table),
                                     "test": datasets.Dataset.from_dict(table)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = toxicity_corpus("both", split=None, data="hub", sources=["jigsaw"], n_splits=1)
    assert calls == [("anitamaxvim/jigsaw-toxic-comments", None)]
    assert sorted(zip(corpus.labels, corpus, strict=True)) == [("nontoxic", "Assistant: hub kind words"),
                                                               ("toxic", "Assistant: hub rude words")]
    assert corpus.counts["jigsaw"].origins == ["hub:anitamaxvim/jigsaw-toxic-comments[full_train]"]
    with pytest.raises(DataError, match=r"splits full_train, test, none of train"):
        toxicity_corpus("both", data="hub", sources=["hh"])
