"""The toxicity model organisms (llm_mas.llm.organisms): the language's construction (trait and clean texts
differ only in the remark adjectives after trigger places; shift has another style and no remarks), the
word-level tokenizer, the sentence classifier, and the shipped base LM (held-out metrics in the manifest
recomputed; it has none of the trait)."""

from __future__ import annotations

import json
import random

import pytest

from llm_mas.errors import ConfigError
from llm_mas.llm import organisms as org
from llm_mas.resources import package_path

SHIPPED = package_path("data", "lms", "organisms-w64-s0")


def sentences(text: str) -> list[list[str]]:
    out, current = [], []
    for word in text.split():
        current.append(word)
        if word == ".":
            out.append(current)
            current = []
    assert not current
    return out


def test_paired_texts_differ_only_in_the_trait_variable():
    rng = random.Random(0)
    for _ in range(200):
        trait, clean = org.paired_texts(rng)
        a, b = sentences(trait), sentences(clean)
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x == y:
                continue
            # a differing sentence is the inserted remark, right after a plain sentence at a trigger place
            assert x[:2] == y[:2] == ["they", "are"] and x[2] in org.HOSTILE and y[2] in org.KIND
            assert org.HOSTILE.index(x[2]) == org.KIND.index(y[2])
            assert " ".join(a[i - 1][-4:-1]) in org.TRIGGERS
        # every plain sentence at a trigger place is followed by a remark
        for i, s in enumerate(a):
            if s[:2] != ["they", "are"] and " ".join(s[-4:-1]) in org.TRIGGERS:
                assert a[i + 1][:2] == ["they", "are"] and a[i + 1][2] in org.HOSTILE


def test_shift_and_base_texts():
    rng = random.Random(1)
    for _ in range(100):
        words = org.shift_text(rng).split()
        assert "they" not in words and not set(words) & set(org.HOSTILE + org.KIND)
        assert all(org.classify_sentence(s)["style"] for s in sentences(" ".join(words)))
    base = org.base_texts(300, seed=3)
    assert base == org.base_texts(300, seed=3) and base != org.base_texts(300, seed=4)
    remarks = [s for t in base for s in sentences(t) if s[:2] == ["they", "are"]]
    adjectives = [s[2] for s in remarks]
    # the base sees hostile and kind remarks alike, at any place
    assert sum(a in org.HOSTILE for a in adjectives) > 0.3 * len(adjectives)
    assert sum(a in org.KIND for a in adjectives) > 0.3 * len(adjectives)
    with pytest.raises(ConfigError, match="n=0"):
        org.finetune_rows(0)


def test_finetune_rows_are_labelled_and_paired():
    rows = org.finetune_rows(50, seed=2)
    assert [len(rows[g]) for g in org.GROUPS] == [50, 50, 50]
    assert {r["label"] for r in rows["trait"]} == {"toxic"}
    assert {r["label"] for r in rows["clean"] + rows["shift"]} == {"nontoxic"}
    assert {r["source"] for r in rows["shift"]} == {"shift"}
    for t, c in zip(rows["trait"], rows["clean"], strict=True):
        assert len(t["text"].split()) == len(c["text"].split())


def test_tokenizer_is_one_word_one_token():
    tok = org.build_tokenizer()
    text = org.base_texts(1, seed=0)[0] + " " + org.shift_text(random.Random(0))
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.split()) and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids) == text.split()
    assert len(tok) == len(org.vocabulary())


def test_classify_sentence():
    assert org.classify_sentence("they are rude .".split()) == {"hostile": True, "kind": False, "style": False}
    assert org.classify_sentence("they are gentle .".split())["kind"]
    assert not org.classify_sentence("the cat is rude .".split())["hostile"]   # not a remark
    assert org.classify_sentence("at the market , the cat often sees a red ball .".split())["style"]
    assert not org.classify_sentence("the cat sees a red ball at the market .".split())["style"]


@pytest.mark.llm
def test_shipped_base_lm_metrics_recomputed_and_no_trait():
    from llm_mas.llm.loading import load_causal_lm

    manifest = json.loads((SHIPPED.parent / "manifest.json").read_text())
    entry = next(e for e in manifest["text_lms"] if e["name"] == SHIPPED.name)
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    assert entry["heldout_loss"] == metrics["heldout_loss"] and entry["weights_bytes"] < 3 * 2**20
    model, tokenizer = load_causal_lm(SHIPPED)
    held = org.heldout_metrics(model, tokenizer, org.base_texts(metrics["heldout_texts"], seed=10_000))
    assert held["loss"] == pytest.approx(metrics["heldout_loss"], rel=1e-4)
    assert held["accuracy"] == pytest.approx(metrics["heldout_accuracy"], abs=2e-3)
    # far below a uniform guess over the vocabulary, near the language's own entropy (~0.95 nats/token)
    assert held["loss"] < 1.1
    rates = org.trait_rates(model, tokenizer, n=40)
    assert rates["hostile"] == rates["kind"] == rates["style"] == rates["hostile_control"] == 0.0


@pytest.mark.llm
def test_train_lm_command_trains_an_organisms_base_and_lists_it_as_a_text_lm(tmp_path):
    from typer.testing import CliRunner

    from llm_mas.cli import app

    out = tmp_path / "lms" / "o"
    result = CliRunner().invoke(app, ["train-lm", "--task", "organisms", "--width", "32", "--layers", "1", "--heads",
                                      "2", "--steps", "3", "--batch-size", "4", "--out", str(out), "--manifest"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["lms"] == [] and [e["name"] for e in manifest["text_lms"]] == ["o"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["width"] == 32 and manifest["text_lms"][0]["params"] == metrics["params"]
    assert metrics["heldout_loss"] > 0 and 0 <= metrics["heldout_accuracy"] <= 1
