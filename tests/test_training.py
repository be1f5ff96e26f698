"""Task-model training, free-running evaluation, run directories, the registry and the CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llm_mas.cli import app
from llm_mas.errors import ConfigError
from llm_mas.models import build_task_model, registry
from llm_mas.models.training import (
    COUNTS,
    TrainConfig,
    evaluate,
    load_run,
    lr_factor,
    make_config,
    make_eval_set,
    train_task_model,
)
from llm_mas.tasks import get_task

TINY = dict(steps=6, eval_every=3, eval_per_count=2, final_per_count=3, batch_size=16, warmup_steps=2,
            target_accuracy=1.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "multiobject-gru-s3"
    result = train_task_model(make_config(task="multiobject", arch="gru", seed=3, **TINY), out,
                              command="llm-mas train-model --seed 3", progress=False, log=lambda m: None)
    return out, result


def test_config_reports_every_problem_with_valid_choices():
    with pytest.raises(ConfigError) as info:
        make_config(task="multiobjekt", arch="rnn", lr=-1.0, hold_outs=[0, 4])
    message = str(info.value)
    assert "multiobject" in message and "arithmetic" in message  # the task choices
    assert "gru, lstm, transformer" in message
    assert "lr -1.0" in message and "hold_outs [0]" in message
    assert len(info.value.problems) == 4
    with pytest.raises(ConfigError, match="unknown key 'stpes'"):
        make_config(stpes=3)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(1000, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(100, 1000))


def test_eval_set_covers_every_count_including_hold_outs():
    task = get_task("multiobject")
    eval_set = make_eval_set(task, 3, np.random.default_rng(0))
    assert eval_set.ids.shape[0] == 3 * len(COUNTS)
    assert np.array_equal(task.quantities(_batch(task, eval_set)), eval_set.groups["count"])


def _batch(task, eval_set):
    from llm_mas.tasks import SequenceBatch

    ids = eval_set.ids.numpy()
    return SequenceBatch(ids, eval_set.task_mask.numpy(), (ids != 0).sum(1))


def test_evaluate_counts_a_trial_right_only_when_every_task_token_is(monkeypatch):
    """Bookkeeping of trial accuracy per group, with a rollout that errs on chosen rows."""
    task = get_task("multiobject")
    eval_set = make_eval_set(task, 4, np.random.default_rng(1))
    model = build_task_model("gru", "multiobject", len(task.vocab), seed=0, d_model=8, head_width=8)
    wrong_rows = {0, 1, 5}  # rows 0, 1: N = 1; row 5: N = 2

    def fake_rollout(ids, free_mask, state=None, position_offset=0):
        tokens = ids.clone()
        for row in wrong_rows:
            if row < len(ids):
                last = int(free_mask[row].nonzero().max())
                tokens[row, last] = 3 if int(ids[row, last]) != 3 else 4  # the final task token wrong
        return tokens, torch.zeros(*ids.shape, len(task.vocab))

    monkeypatch.setattr(model, "rollout", fake_rollout)
    result = evaluate(model, eval_set, batch_size=1000)
    assert result.per_count[1] == 0.5 and result.per_count[2] == 0.75 and result.per_count[3] == 1.0
    assert result.overall == pytest.approx(1 - 3 / 80)
    assert result.min_accuracy == 0.5


def test_free_running_trial_accuracy_equals_teacher_forced_trial_accuracy(tiny_run):
    """All task tokens right under teacher forcing <=> all right free running (the first error is shared)."""
    _, result = tiny_run
    model = result.model
    task = get_task("multiobject")
    eval_set = make_eval_set(task, 5, np.random.default_rng(2))
    with torch.no_grad():
        tokens, _ = model.rollout(eval_set.ids, eval_set.task_mask)
        free = ((tokens == eval_set.ids) | ~eval_set.task_mask).all(1)
        predicted = model(eval_set.ids[:, :-1]).argmax(-1)
        forced = ((predicted == eval_set.ids[:, 1:]) | ~eval_set.task_mask[:, 1:]).all(1)
    assert torch.equal(free, forced)


def test_training_writes_a_loadable_run_directory(tiny_run):
    out, result = tiny_run
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "model.safetensors", "metrics.json"}
    assert (out / "config.yaml").read_text().splitlines()[0] == "# llm-mas train-model --seed 3"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]["count"]) == {str(n) for n in COUNTS}
    assert metrics["held_out"] == [4, 9, 14, 17] and metrics["n_per_count"] == 3
    assert metrics["steps_run"] == 6 and [h["step"] for h in metrics["history"]] == [3, 6]
    loaded = load_run(out)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([[1, 3, 4, 7, 6, 2]])
    torch.testing.assert_close(loaded(ids), result.model(ids))


def test_training_is_seeded(tiny_run):
    _, first = tiny_run
    again = train_task_model(make_config(task="multiobject", arch="gru", seed=3, **TINY), None, progress=False,
                             log=lambda m: None)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_training_stops_when_the_evaluation_stops_improving():
    cfg = make_config(task="multiobject", arch="gru", seed=0, **{**TINY, "steps": 40, "eval_every": 1,
                                                                  "patience_evals": 1})
    result = train_task_model(cfg, None, progress=False, log=lambda m: None)
    assert result.metrics["stopped_because"] == "no improvement" and result.metrics["steps_run"] < 40


def test_ctrl_c_keeps_the_best_weights_and_writes_metrics(tmp_path):
    calls = []

    def interrupt(message):  # the first progress line arrives as if the user pressed Ctrl-C
        calls.append(message)
        if len(calls) == 1:
            raise KeyboardInterrupt

    cfg = make_config(task="multiobject", arch="gru", seed=0, **{**TINY, "steps": 40, "eval_every": 2})
    result = train_task_model(cfg, tmp_path, progress=False, log=interrupt)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stopped_because"] == "interrupted" and metrics["steps_run"] == 2 == metrics["best_step"]
    assert result.metrics["accuracy"]["n"] == 3 * len(COUNTS)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_other_architectures_train_a_few_steps(arch):
    cfg = make_config(task="sameobject", arch=arch, seed=0, **{**TINY, "steps": 3, "eval_every": 3})
    result = train_task_model(cfg, None, progress=False, log=lambda m: None)
    assert result.metrics["steps_run"] == 3 and 0 <= result.metrics["accuracy"]["overall"] <= 1


def test_registry_names_and_errors(tiny_run, tmp_path, monkeypatch):
    out, _ = tiny_run
    root = tmp_path / "models"
    root.mkdir()
    (root / "multiobject-gru-s3").symlink_to(out, target_is_directory=True)
    monkeypatch.setenv("LLM_MAS_MODELS_DIR", str(root))
    manifest = registry.update_manifest()
    entry = manifest["models"]["multiobject-gru-s3"]
    assert entry["command"] == "llm-mas train-model --seed 3" and entry["eval_seed"] == 12345
    assert registry.shipped_names() == ["multiobject-gru-s3"]
    with pytest.warns(UserWarning, match="below the 0.99 accuracy bar"):  # 6 training steps
        model = registry.load_task_model("multiobject-gru-s3")
    assert model.arch == "gru" and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="multiobject-gru-s3.*directory"):
        registry.load_task_model("multiobject-gru-s9")
    import llm_mas

    assert llm_mas.load_task_model(str(out)).task_name == "multiobject"


def test_cli_train_eval_and_list(tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "cli-run"
    result = runner.invoke(app, ["train-model", "--task", "sameobject", "--arch", "gru", "--seed", "1",
                                 "--out", str(out), "--steps", "4", "--quiet", "--set", "eval_every=2",
                                 "--set", "eval_per_count=2", "--set", "final_per_count=2"])
    assert result.exit_code == 0, result.output
    first = (out / "config.yaml").read_text().splitlines()[0]
    assert first.startswith("# llm-mas train-model --task sameobject --arch gru --seed 1 --out ")
    assert "--set eval_every=2" in first
    result = runner.invoke(app, ["eval-model", str(out), "--n-per-count", "2"])
    assert result.exit_code == 0, result.output
    assert "held out" in result.output and "recorded" in result.output
    monkeypatch.setenv("LLM_MAS_MODELS_DIR", str(tmp_path))
    registry.update_manifest()
    result = runner.invoke(app, ["list-models"])
    assert result.exit_code == 0 and "cli-run" in result.output


def test_cli_reports_a_bad_choice_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train-model", "--arch", "rnn", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown arch 'rnn'" in result.output and "transformer" in result.output


@pytest.mark.parametrize("name", registry.shipped_names())
def test_shipped_checkpoints_load_and_are_as_accurate_as_recorded(name):
    entry = registry.read_manifest()["models"][name]
    assert entry["command"].startswith("llm-mas train-model ") and f"--seed {entry['seed']}" in entry["command"]
    if entry["passes_bar"]:
        model = registry.load_task_model(name)
    else:
        with pytest.warns(UserWarning, match="below the 0.99 accuracy bar"):
            model = registry.load_task_model(name)
    assert model.arch == entry["arch"] and model.task_name == entry["task"]
    result = evaluate(model, make_eval_set(get_task(model.task_name), 5, np.random.default_rng(0)))
    if entry["passes_bar"]:
        assert entry["min_accuracy"] >= 0.99 and result.min_accuracy >= 0.8  # 5 sequences per N here


def test_derived_initial_seed_separates_architectures_and_legacy_seed_reproduces_shared_init():
    """New models draw their initial weights from (task, arch, seed): a GRU and a Transformer of one seed no
    longer start from the same embedding matrix; init_seed=seed (the first shipped models) still does."""
    from llm_mas.models.task_models import build_task_model
    from llm_mas.models.training import TrainConfig, initial_weight_seed

    def embedding(arch, init_seed, seed=3, task="multiobject"):
        cfg = TrainConfig(task=task, arch=arch, seed=seed, init_seed=init_seed)
        return build_task_model(arch, task, 8, seed=initial_weight_seed(cfg)).embed.weight.detach()

    assert torch.equal(embedding("gru", "seed"), embedding("transformer", "seed"))      # the old coupling
    assert not torch.allclose(embedding("gru", "derived"), embedding("transformer", "derived"))
    assert not torch.allclose(embedding("gru", "derived"), embedding("lstm", "derived"))
    assert torch.equal(embedding("gru", "derived"), embedding("gru", "derived"))        # deterministic
    assert not torch.allclose(embedding("gru", "derived", seed=3), embedding("gru", "derived", seed=4))
    assert initial_weight_seed(TrainConfig(seed=7, init_seed="seed")) == 7
    assert initial_weight_seed(TrainConfig(task="multiobject", arch="gru", seed=7)) != initial_weight_seed(
        TrainConfig(task="sameobject", arch="gru", seed=7))


def test_shipped_models_record_how_their_weights_were_seeded():
    from llm_mas.models.registry import models_dir, shipped_names
    from llm_mas.models.training import read_run_config

    for name in shipped_names():
        assert read_run_config(models_dir() / name)["train"]["init_seed"] in ("seed", "derived"), name


def test_training_leaves_the_callers_random_streams_and_threads_alone():
    """train_task_model seeds and sets threads for itself only (no lasting change of global state)."""
    import random

    threads = torch.get_num_threads()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    train_task_model(make_config(task="multiobject", arch="gru", seed=3, threads=threads + 1, **TINY), None,
                     progress=False, log=lambda m: None)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.get_num_threads() == threads
