"""The counterfactual problem: an oracle (identity alignment, full swap at every step = running the source),
an LM next to the shipped GRU on the same task, config checks, and a short MAS run between two shipped LMs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llm_mas
from llm_mas.alignments import AlignmentMap
from llm_mas.errors import ConfigError, DataError
from llm_mas.problems import PROBLEMS
from llm_mas.problems.counterfactual import build_counterfactual_problem
from llm_mas.run import build_alignments, run
from llm_mas.run_config import load_mas_config

LMS = Path(llm_mas.__file__).parent / "data" / "lms"
LM0, LM1 = str(LMS / "multiobject-w128-s0"), str(LMS / "multiobject-w128-s1")


def config(models, tmp_path=None, variables=("full",), **data):
    return load_mas_config(None, base={
        "name": "cf", "out_dir": str(tmp_path or "runs"), "progress": False, "models": models,
        "variables": list(variables),
        "data": {"task": "multiobject", "n_train": 40, "n_valid": 40, **data}, "k": 16,
        "train": {"max_steps": 4, "batch_size": 16, "eval_every": 2}})


def test_registered():
    assert PROBLEMS["counterfactual"] is build_counterfactual_problem


def test_oracle_identity_full_swap_runs_the_source():
    """Stepwise 'full' with k = d and identity maps puts the source's embeddings at every position 0..i: the
    LM then reads the source's prefix and the causal model's continuation, which it predicts perfectly.
    (At a block's output the later positions have already read the target's own prefix below it.)"""
    cfg = config([{"kind": "hf", "name": LM0, "site": "embeddings"}] * 2, stepwise=True)
    cfg.k = 128
    problem = build_counterfactual_problem(cfg)
    records = problem.evaluate([AlignmentMap("identity", 128, 128)] * 2)
    assert len(records) == 4
    assert all(r.trial_iia == 1.0 and r.token_iia == 1.0 and r.n_pairs == 40 for r in records)


def test_lm_and_gru_on_the_same_task():
    """A task model reads task ids, the LM the rendered text; the same pairs, the same trainer."""
    cfg = config([{"kind": "hf", "name": LM0, "site": "layer0"},
                  {"kind": "task", "name": "multiobject-gru-s0", "site": "hidden"}], variables=["count"])
    problem = build_counterfactual_problem(cfg)
    assert [m.kind for m in problem.models] == ["hf", "task"]
    maps = [a.materialize() for a in build_alignments(cfg, problem)]
    loss, _ = problem.loss(maps, torch.arange(8))
    assert torch.isfinite(loss)
    records = problem.evaluate(maps, with_ci=True)
    assert {(r.source_index, r.target_index) for r in records} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(0 <= r.trial_iia <= 1 and len(r.trial_iia_ci) == 2 for r in records)
    # the same scored continuation in both token spaces (the LM's tokens are the task ids)
    lm_items = [d for d in problem.splits["valid"] if d.target == 0]
    gru_items = [d for d in problem.splits["valid"] if d.target == 1]
    assert torch.equal(lm_items[0].labels, gru_items[0].labels)


def test_config_checks(tmp_path):
    hf = {"kind": "hf", "name": LM0}
    with pytest.raises(ConfigError, match="data.task: unknown task 'nope'"):
        config([hf], task="nope")
    with pytest.raises(ConfigError, match="not both"):
        config([hf], dataset=str(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigError, match="a counterfactual run reads data.dataset / data.task, not a recording"):
        config([{**hf, "recording": "rec"}])
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(ConfigError, match="a dataset run takes HF models only"):
        config([hf, {"kind": "task", "name": "multiobject-gru-s0"}], task=None, dataset=str(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="mixing kinds 'hf' and 'task' in one run is supported only by "
                                          "counterfactual runs"):
        load_mas_config(None, base={"models": [{**hf, "recording": "r"}, {"kind": "task", "name": "multiobject-gru-s0"}]})
    cfg = config([hf, {"kind": "task", "name": "modulo-gru-s0"}])
    with pytest.raises(ConfigError, match="trained on task 'modulo', not data.task 'multiobject'"):
        build_counterfactual_problem(cfg)


def test_bad_dataset_row_before_models_load(tmp_path, monkeypatch):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps({"base": "<bos> D0 T", "source": "<bos> D1 T", "continuation": "R <eos>"}) + "\n"
                    + json.dumps({"base": "<bos> D0 T", "source": "<bos> D1 T", "continuation": ""}) + "\n")
    cfg = config([{"kind": "hf", "name": LM0}], task=None, dataset=str(path))
    cfg.variables = ["full"]
    import llm_mas.llm.loading as loading

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(Exception, match="row 2: empty continuation"):
        build_counterfactual_problem(cfg)


def test_short_mas_run_between_shipped_lms(tmp_path):
    cfg = config([{"kind": "hf", "name": LM0, "site": "layer0"}, {"kind": "hf", "name": LM1, "site": "layer0"}],
                 tmp_path, stepwise=True)
    result = run(cfg, log=lambda s: None)
    saved = json.loads((tmp_path / "cf" / "results.json").read_text())
    records = saved["records"] if isinstance(saved, dict) else saved
    assert len(records) == 4 and len(result.records) == 4
    assert all("trial_iia_ci" in r and "token_iia_ci" in r and r["n_pairs"] == 40 for r in records)
    assert (tmp_path / "cf" / "alignments.safetensors").is_file()


# ------------------------------------------------------------------------------------------- unknown tokens
BIND0, BIND1 = str(LMS / "binding-w64-s1"), str(LMS / "binding-w64-s10")


def _binding_rows(n: int, old_format: bool) -> list[dict]:
    """Rows of the binding query counterfactual; ``old_format``: written as the README used to show the task
    (`B a = 3 , b = 5 ; ? b 5 E`), which the binding LMs' tokenizer does not have ('B', 'E')."""
    from llm_mas.tasks.binding import binding_counterfactual_rows

    rows = binding_counterfactual_rows(n, seed=4)
    if old_format:
        rows = [{**r, "base": r["base"].replace("<bos>", "B"), "source": r["source"].replace("<bos>", "B"),
                 "continuation": r["continuation"] + " E"} for r in rows]
    return rows


def _dataset_config(tmp_path, rows, **data):
    path = tmp_path / "cf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config([{"kind": "hf", "name": BIND0, "site": "layer0"}, {"kind": "hf", "name": BIND1, "site": "layer0"}],
                 tmp_path, task=None, dataset=str(path), n_train=16, n_valid=8, **data)
    cfg.k = 8
    return cfg


def test_old_readme_format_is_refused_naming_rows_models_and_words(tmp_path, monkeypatch):
    assert _binding_rows(2, True)[0]["base"].startswith("B ") and _binding_rows(2, False)[0]["base"].startswith("<bos> ")
    cfg = _dataset_config(tmp_path, _binding_rows(24, old_format=True))
    import llm_mas.llm.loading as loading

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(DataError) as err:
        build_counterfactual_problem(cfg)
    message = str(err.value)
    assert message.startswith("4 word(s) a model reads as its unknown token")
    for model in (BIND0, BIND1):
        assert (f"models.{[BIND0, BIND1].index(model)} ({model}) reads the word 'B' (did you mean '<bos>'?) as its "
                "unknown token '<unk>', in base of rows 1-24; source of rows 1-24") in message
        assert (f"({model}) reads the word 'E' (did you mean '<eos>'?) as its unknown token '<unk>', in continuation "
                "of rows 1-24") in message
    assert "data.allow_unknown_tokens: true" in message and "The text each shipped LM reads" in message
    assert not (tmp_path / "cf").exists()


def test_corrected_format_runs_and_the_opt_in_allows_the_old_one(tmp_path):
    from llm_mas.problems.counterfactual import _load_tokenizer, encode_pairs

    cfg = _dataset_config(tmp_path, _binding_rows(24, old_format=False))
    tokenizers = [_load_tokenizer(m.name) for m in cfg.models]
    encoded, _ = encode_pairs(cfg, tokenizers, lambda s: None)
    for split in encoded.values():
        for enc in split["full"]:
            assert enc.unknown == [] and (enc.target_ids[:, 0] == 1).all() and (enc.source_ids[:, 0] == 1).all()
            assert not (enc.target_ids == tokenizers[0].unk_token_id).any()
    result = run(cfg, log=lambda s: None)
    assert len(result.records) == 4

    old = _dataset_config(tmp_path, _binding_rows(24, old_format=True), allow_unknown_tokens=True)
    old.name = "cf-old"
    lines = []
    result = run(old, log=lines.append)
    assert len(result.records) == 4
    allowed = [line for line in lines if line.startswith("data.allow_unknown_tokens: running with unknown tokens")]
    assert len(allowed) == 1 and "'B'" in allowed[0] and "'E'" in allowed[0] and "rows 1-24" in allowed[0]
    # a permission, not a result: the fingerprint (and a default run name) does not depend on it
    from llm_mas.run import run_fingerprint

    assert "data.allow_unknown_tokens" not in run_fingerprint(old)["values"]


def test_readme_shows_the_text_each_shipped_lm_reads():
    """The README's section on the shipped LMs' text: its vocabulary lists are their tokenizers' vocabularies,
    its whole sequences are what each LM generates (greedy) from their prefix, and its JSONL rows read with no
    unknown token, the continuation being what the source itself goes on with."""
    import re

    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.tasks.counterfactual_data import TextRow, encode_text_rows

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("#### The text each shipped LM reads", 1)[1].split("\n#", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    rows = [json.loads(line) for line in section.split("```jsonl\n", 1)[1].split("```", 1)[0].splitlines()]
    assert len(table) == len(rows) == 2
    for line, row in zip(table, rows):
        names = re.findall(r"`([a-z]+-w\d+-s\d+)`", line.split("|")[1])
        whole = re.findall(r"`([^`]+)`", line.split("|")[3])[0]
        prefix, generated = whole.rsplit(" ", 2)[0], " ".join(whole.split()[-2:])
        assert len(names) == 3
        for name in names:
            model, tokenizer = load_causal_lm(LMS / name)
            cell = re.sub(r"`(.)`–`(.)`", lambda m: " ".join(f"`{chr(c)}`" for c in range(ord(m[1]), ord(m[2]) + 1)),
                          line.split("|")[2])  # `a`–`h` -> `a` `b` ... `h`
            listed = {word for code in re.findall(r"`([^`]+)`", cell) for word in code.split()}
            assert listed == set(tokenizer.get_vocab()) - {"<pad>", "<unk>"}, name
            enc = encode_text_rows([TextRow(1, **row)], tokenizer)
            assert enc.unknown == [], name
            for text, expected in ((prefix, generated), (row["source"], row["continuation"])):
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                n_new = len(expected.split())
                out = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                assert tokenizer.decode(out[0, ids.shape[1]:]) == expected, (name, text)
