"""Recorded generations (stepwise LLM MAS data): recording, caching, stale-cache refusal, pairs, CLI."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from llm_fixtures import load_tiny, tiny_qwen2_dir

from llm_mas.errors import ConfigError, DataError

pytestmark = pytest.mark.llm

PROMPT, TOTAL, N = 16, 32, 12


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def texts():
    from llm_mas.llm.tiny import tiny_corpus

    return tiny_corpus(20, seed=5) + ["Too short.", "Also short!"]


@pytest.fixture(scope="module")
def recording(tiny, texts):
    from llm_mas.llm.record import record_generations

    model, tokenizer = tiny
    return record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=TOTAL, n=N, batch_size=5,
                              seed=1, progress=False)


def test_recording_content(tiny, texts, recording):
    model, tokenizer = tiny
    assert recording.ids.shape == recording.predicted.shape == (N, TOTAL)
    assert recording.ids.dtype == recording.predicted.dtype == torch.long
    assert len(recording) == N and recording.prompt_len == PROMPT and recording.total_len == TOTAL
    meta = recording.meta
    assert meta["seed"] == 1 and meta["model"] == str(tiny_qwen2_dir()) and len(meta["fingerprint"]) == 16
    assert "Too short." not in meta["texts"] and len(set(meta["texts"])) == N
    for row, text in enumerate(recording.texts):
        # The prompt is the first PROMPT tokens of its text, with no padding.
        assert recording.ids[row, :PROMPT].tolist() == tokenizer(text)["input_ids"][:PROMPT]
    # The continuation is greedy: each generated token is the argmax after the tokens before it.
    logits = model(input_ids=recording.ids).logits  # (N, TOTAL, V)
    assert torch.equal(logits.argmax(-1), recording.predicted)
    assert torch.equal(recording.predicted[:, PROMPT - 1:-1], recording.ids[:, PROMPT:])
    assert meta["greedy_agreement"] == 1.0


def test_recording_is_deterministic_and_seeded(tiny, texts, recording):
    from llm_mas.llm.record import record_generations

    model, tokenizer = tiny
    again = record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=TOTAL, n=N, batch_size=4,
                               seed=1, progress=False)
    assert torch.equal(again.ids, recording.ids) and torch.equal(again.predicted, recording.predicted)
    other = record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=TOTAL, n=N, seed=2,
                               progress=False)
    assert other.texts != recording.texts


def test_cache_roundtrip_and_reuse(tiny, texts, tmp_path):
    from llm_mas.llm.record import TENSORS_FILE, load_recording, record_generations

    model, tokenizer = tiny
    first = record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=TOTAL, n=6, seed=0,
                               cache_dir=tmp_path, progress=False)
    (directory,) = list(tmp_path.iterdir())
    stamp = os.stat(directory / TENSORS_FILE).st_mtime_ns
    second = record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=TOTAL, n=6, seed=0,
                                cache_dir=tmp_path, progress=False)
    assert os.stat(directory / TENSORS_FILE).st_mtime_ns == stamp  # reused, not re-recorded
    assert second.path == directory and torch.equal(first.ids, second.ids) and second.meta == first.meta
    loaded = load_recording(directory / TENSORS_FILE, model, tokenizer)
    assert torch.equal(loaded.predicted, first.predicted) and loaded.texts == first.texts
    # Other settings get another cache entry.
    record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=TOTAL, n=5, seed=0,
                       cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2


def test_stale_recordings_are_refused(tiny, recording, tmp_path):
    from llm_mas.llm.record import TENSORS_FILE, Recording, load_recording

    model, tokenizer = tiny
    path = recording.save(tmp_path / "rec")
    load_recording(path, model, tokenizer)  # fresh: fine
    other_model, _ = load_tiny(seed=1)
    with pytest.raises(DataError, match=rf"{TENSORS_FILE}.*fingerprint.*llm-mas record --model"):
        load_recording(path, other_model)
    # Same fingerprint, but the recorded predictions no longer match the model.
    broken = Recording(recording.ids, (recording.predicted + 1) % 512, dict(recording.meta))
    broken_path = broken.save(tmp_path / "broken")
    with pytest.raises(DataError, match=r"reproduces only 0\.00%.*Rebuild it with: llm-mas record --model"):
        load_recording(broken_path, model)
    # Without a model nothing is checked.
    assert len(load_recording(broken_path)) == N


def test_load_errors(tmp_path, recording):
    from llm_mas.llm.record import META_FILE, load_recording

    with pytest.raises(DataError, match="does not exist.*llm-mas record"):
        load_recording(tmp_path / "nothing")
    path = recording.save(tmp_path / "rec")
    meta = json.loads((path / META_FILE).read_text())
    meta["version"] = 99
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format version"):
        load_recording(path)


def test_short_texts(tiny, texts):
    from llm_mas.llm.record import record_generations

    model, tokenizer = tiny
    with pytest.raises(DataError, match="none of the 2 texts has 16 tokens"):
        record_generations(model, tokenizer, ["Short.", "Tiny text."], prompt_len=PROMPT, total_len=TOTAL,
                           progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=20, n=50, progress=False)
    assert len(rec) == 20 and any("only 20 of 22 texts" in str(w.message) for w in caught)
    with pytest.raises(ConfigError, match="total_len 16 must exceed prompt_len 16"):
        record_generations(model, tokenizer, texts, prompt_len=PROMPT, total_len=16)


def test_split_and_subset(recording):
    train, valid = recording.split(valid_fraction=0.25, seed=741)
    assert len(train) == 9 and len(valid) == 3
    assert set(train.texts).isdisjoint(valid.texts) and set(train.texts) | set(valid.texts) == set(recording.texts)
    row = recording.texts.index(valid.texts[0])
    assert torch.equal(valid.ids[0], recording.ids[row])


def test_stepwise_pairs(recording):
    from llm_mas.llm.record import IGNORE_INDEX, stepwise_pairs

    source, target = recording.split(valid_fraction=0.5, seed=0)
    pairs = stepwise_pairs(source, target, 200, seed=3)
    assert len(pairs) == 200 and pairs.labels.shape == (200, TOTAL)
    assert int(pairs.index.min()) >= 10 and int(pairs.index.max()) < TOTAL - 10
    assert torch.equal(pairs.index, stepwise_pairs(source, target, 200, seed=3).index)
    for p in range(0, 200, 37):
        i, s, t = int(pairs.index[p]), int(pairs.source_rows[p]), int(pairs.target_rows[p])
        assert torch.equal(pairs.source_ids[p], source.ids[s])
        assert torch.equal(pairs.target_ids[p, :i + 1], target.ids[t, :i + 1])  # the target's own prefix
        assert torch.equal(pairs.target_ids[p, i + 1:], source.ids[s, i + 1:])  # then the source's tokens
        assert pairs.mask[p].tolist() == [q <= i for q in range(TOTAL)]
        assert torch.equal(pairs.labels[p, i:], source.predicted[s, i:])
        assert (pairs.labels[p, :i] == IGNORE_INDEX).all()
    sub = pairs.batch([0, 5])
    assert len(sub) == 2 and torch.equal(sub.labels[1], pairs.labels[5])
    with pytest.raises(ConfigError, match="leave no index"):
        stepwise_pairs(source, target, 4, min_prefix=16, min_suffix=16)


def test_fingerprint_tracks_weights_not_dtype(tiny):
    from llm_mas.llm.record import model_fingerprint

    model, _ = tiny
    assert model_fingerprint(model) == model_fingerprint(load_tiny()[0])
    assert model_fingerprint(model) == model_fingerprint(load_tiny(dtype="bfloat16")[0])
    changed = load_tiny()[0]
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert model_fingerprint(model) != model_fingerprint(changed)


def test_cli_record(tmp_path, texts):
    import typer
    from typer.testing import CliRunner

    from llm_mas.commands.llm import record
    from llm_mas.llm.record import load_recording

    app = typer.Typer()
    app.command("record")(record)
    app.command("unused")(lambda: None)  # two commands: typer keeps the "record" sub-command name
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    runner = CliRunner()
    for name in ("texts.jsonl", "texts.txt"):
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["record", "--model", str(tiny_qwen2_dir()), "--texts", str(tmp_path / name),
                                     "--out", str(out), "--n", "4", "--prompt-len", "16", "--total-len", "24",
                                     "--device", "cpu", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert "recorded 4 sequences of 24 tokens" in result.output
        assert load_recording(out, load_tiny()[0]).ids.shape == (4, 24)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    result = runner.invoke(app, ["record", "--model", str(tiny_qwen2_dir()), "--texts", str(tmp_path / "bad.jsonl"),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    result = runner.invoke(app, ["record", "--model", str(tiny_qwen2_dir()), "--texts", str(tmp_path / "t.csv"),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "t.csv").write_text("text\nhello\n")
    result = runner.invoke(app, ["record", "--model", str(tiny_qwen2_dir()), "--texts", str(tmp_path / "t.csv"),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'.csv'; valid choices: .jsonl, .txt" in result.output


def test_prompts_with_unknown_tokens_are_refused_unless_allowed(tmp_path):
    """A shipped binding LM (word-level tokenizer, '<unk>') given the task's own notation 'B': refused naming the
    texts and the word before anything is generated; the opt-in records them with a warning and a count;
    texts in the LM's words record without either."""
    import typer
    from typer.testing import CliRunner

    import llm_mas
    from llm_mas.commands.llm import record
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations

    lm = os.path.join(os.path.dirname(llm_mas.__file__), "data", "lms", "binding-w64-s1")
    model, tokenizer = load_causal_lm(lm)
    good = ["<bos> a = 3 , b = 5 , c = 1 ; ? b", "<bos> d = 7 , b = 2 ; ? d", "<bos> h = 0 , e = 4 ; ? e"]
    bad = [good[0], good[1].replace("<bos>", "B"), good[2].replace("<bos>", "B").replace("e = 4", "e = 44")]
    with pytest.raises(DataError) as err:
        record_generations(model, tokenizer, bad, prompt_len=8, total_len=10, n=3, progress=False)
    message = str(err.value)
    assert message.startswith("2 word(s) the model reads as its unknown token")
    assert (f"texts: {lm} reads the word 'B' (did you mean '<bos>'?) as its unknown token '<unk>', in prompt of "
            "texts 2-3") in message
    assert "the word '44' as its unknown token '<unk>', in prompt of texts 3" in message
    assert "allow_unknown_tokens=True" in message and "--allow-unknown-tokens" in message
    with pytest.warns(UserWarning, match="recording prompts with unknown tokens"):
        allowed = record_generations(model, tokenizer, bad, prompt_len=8, total_len=24, n=3, progress=False,
                                     allow_unknown_tokens=True)
    assert allowed.meta["unknown_tokens"] == 3 == int((allowed.ids[:, :8] == tokenizer.unk_token_id).sum())
    # a MAS run reading that recording says so in its log
    from llm_mas.run import run
    from llm_mas.run_config import load_mas_config

    allowed.save(tmp_path / "rec")
    entry = {"kind": "hf", "name": lm, "recording": str(tmp_path / "rec"), "site": "layer0"}
    lines = []
    run(load_mas_config(None, [], base={"name": "m", "out_dir": str(tmp_path / "runs"), "models": [entry, entry],
                                        "k": 4, "progress": False, "data": {"stepwise": True, "n_train": 4,
                                                                            "n_valid": 2},
                                        "train": {"max_steps": 1}}), log=lines.append)
    assert any("was recorded with 3 prompt tokens its tokenizer reads as the unknown token" in line for line in lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = record_generations(model, tokenizer, good, prompt_len=8, total_len=10, n=3, progress=False)
    assert clean.meta["unknown_tokens"] == 0

    app = typer.Typer()
    app.command("record")(record)
    app.command("unused")(lambda: None)
    (tmp_path / "bad.txt").write_text("\n".join(bad) + "\n")
    runner = CliRunner()
    args = ["record", "--model", lm, "--texts", str(tmp_path / "bad.txt"), "--n", "3", "--prompt-len", "8",
            "--total-len", "10", "--device", "cpu", "--no-progress"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert result.exit_code == 2 and "the word 'B'" in result.output and not (tmp_path / "refused").exists()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "allowed"), "--allow-unknown-tokens"])
    assert result.exit_code == 0, result.output
