"""Data-parallel LLM MAS: 2 gloo processes through `accelerate launch` match the 1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llm_fixtures import tiny_qwen2_dir

pytestmark = pytest.mark.llm


def _record(model_dir: Path, out: Path) -> Path:
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import tiny_corpus

    model, tokenizer = load_causal_lm(model_dir)
    record_generations(model, tokenizer, tiny_corpus(80, seed=5), prompt_len=12, total_len=32, n=40, batch_size=20,
                       progress=False).save(out)
    return out


def _preset(tmp_path: Path) -> Path:
    """A 2-model preset with uneven shards: micro-batches of 8 and 7 rows, 15 validation pairs per direction."""
    models = [{"name": str(tiny_qwen2_dir(s)), "kind": "hf", "recording": str(_record(tiny_qwen2_dir(s),
                                                                                       tmp_path / f"rec{s}"))}
              for s in (0, 1)]
    preset = {"name": "single", "seed": 3, "models": models, "data": {"n_train": 60, "n_valid": 15, "stepwise": True},
              # min_delta -1: the last validation is always the best, so the saved alignments are the final ones
              "train": {"lr": 3e-2, "batch_size": 15, "grad_accum": 2, "max_steps": 3, "eval_every": 3,
                        "min_delta": -1.0},
              "eval": {"batch_size": 7}, "out_dir": str(tmp_path / "runs"), "progress": False, "device": "cpu"}
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _alignments(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "alignments.safetensors"))


def test_shard_rows_and_gradient_scaling():
    """Shards partition each batch; a shard's loss is world/(batch tokens) x its token sum (checked in-process)."""
    from llm_mas.errors import ConfigError
    from llm_mas.problems import Shard

    rows = torch.arange(7)
    parts = [Shard(r, 3, gather=lambda o: [o]).rows(rows) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(7)) and [len(p) for p in parts] == [3, 2, 2]
    assert Shard().gather("x") == ["x"]
    with pytest.raises(ConfigError, match="rank 2 must lie in 0..1"):
        Shard(2, 2, gather=lambda o: [o])
    with pytest.raises(ConfigError, match="gather"):
        Shard(0, 2)


def test_simulated_shards_reproduce_the_full_batch_gradient(tmp_path):
    """Two simulated processes (shard losses, gradients averaged, evaluation merged) equal one process exactly."""
    from llm_mas.errors import ConfigError
    from llm_mas.problems import Shard
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import load_mas_config

    config = load_mas_config(_preset(tmp_path))
    problem = build_problem(config)
    alignments = build_alignments(config, problem)
    maps = [a.materialize() for a in alignments]
    batch = torch.tensor([3, 17, 5, 40, 22, 9, 58])  # 7 rows: shards of 4 and 3

    def grads(shard):
        problem.shard = shard
        alignments.zero_grad()
        loss, _ = problem.loss([a.materialize() for a in alignments], batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in alignments.parameters()]

    full_loss, full = grads(Shard())
    shard_results = [grads(Shard(r, 2, gather=lambda o: [o])) for r in range(2)]
    averaged = [(a + b) / 2 for a, b in zip(shard_results[0][1], shard_results[1][1])]
    torch.testing.assert_close((shard_results[0][0] + shard_results[1][0]) / 2, full_loss)
    for a, b in zip(averaged, full):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)

    # evaluation: each shard evaluates its rows; the merged records equal the single-process ones
    problem.shard = Shard()
    single = problem.evaluate(maps, with_ci=True)
    locals_ = []

    def capture(obj):
        locals_.append(obj)
        return [obj]

    for r in range(2):
        problem.shard = Shard(r, 2, gather=capture)
        with pytest.raises(ConfigError, match="evaluation covered"):  # alone, a shard has only part of the pairs
            problem.evaluate(maps)
    problem.shard = Shard(0, 2, gather=lambda obj: locals_)
    merged = problem.evaluate(maps, with_ci=True)
    assert merged == single


def test_one_process_entry_resumes_and_matches_run(tmp_path, capsys):
    """`python -m llm_mas.distributed` in one process: stopped after 2 steps and rerun with a 3-step budget,
    it resumes from its checkpoint and ends with the alignments of `run` trained 3 steps straight."""
    from llm_mas.distributed import main
    from llm_mas.run import run
    from llm_mas.run_config import load_mas_config

    preset = _preset(tmp_path)
    run(load_mas_config(preset), log=lambda s: None)
    main([str(preset), "name=resumed", "train.max_steps=2"])
    main([str(preset), "name=resumed"])
    assert "resumed from" in capsys.readouterr().out
    runs = tmp_path / "runs"
    straight, resumed = _alignments(runs / "single"), _alignments(runs / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)
    header = (runs / "resumed" / "config.yaml").read_text().splitlines()[0]
    assert header == f"# python -m llm_mas.distributed {runs / 'resumed' / 'config.yaml'}"
    assert json.loads((runs / "resumed" / "summary.json").read_text())["steps"] == 3


def test_entry_refuses_mixed_precision_and_task_models(tmp_path, monkeypatch, capsys):
    from llm_mas.distributed import main

    preset = _preset(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(SystemExit) as e:
        main([str(preset)])
    assert e.value.code == 2 and "set models.i.dtype" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    task_preset = tmp_path / "task.yaml"
    task_preset.write_text("models: [{name: multiobject-gru-s0}, {name: multiobject-gru-s1}]\n")
    with pytest.raises(SystemExit):
        main([str(task_preset)])
    assert "HF models only" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """`accelerate launch` (2 gloo processes) ends with the 1-process alignments (to 1e-5) and the same IIA."""
    from llm_mas.run import run
    from llm_mas.run_config import load_mas_config

    preset = _preset(tmp_path)
    run(load_mas_config(preset), log=lambda s: None)  # the ordinary one-process path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                           "-m", "llm_mas.distributed", str(preset), "name=dp"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = tmp_path / "runs"
    single, dp = _alignments(runs / "single"), _alignments(runs / "dp")
    assert single.keys() == dp.keys()
    diff = max(float((single[k] - dp[k]).abs().max()) for k in single)
    assert diff <= 1e-5, diff
    moved = max(float((single[k] - _initial(preset)[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the alignments did train
    one = json.loads((runs / "single" / "results.json").read_text())
    two = json.loads((runs / "dp" / "results.json").read_text())
    for a, b in zip(one, two):
        assert (a["source"], a["target"], a["n_pairs"]) == (b["source"], b["target"], b["n_pairs"]) == (
            a["source"], a["target"], 15)
        assert abs(a["token_iia"] - b["token_iia"]) <= 0.01 and abs(a["trial_iia"] - b["trial_iia"]) <= 1 / 15
    summary = json.loads((runs / "dp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert (runs / "dp" / "config.yaml").read_text().startswith("# accelerate launch --multi_gpu --num_processes 2")
    assert "trial IIA (full)" in proc.stdout and proc.stdout.count("wrote ") == 1  # rank 0 reports alone
    print(f"\n2 processes vs 1: max |alignment difference| = {diff:.2e}")


def _initial(preset: Path) -> dict[str, torch.Tensor]:
    from llm_mas.alignments import make_alignment

    config = yaml.safe_load(preset.read_text())
    return {f"model{i}.{k}": v for i in range(2)
            for k, v in make_alignment("orthogonal", 64, k=32, seed=config["seed"] * 101 + i).state_dict().items()}
