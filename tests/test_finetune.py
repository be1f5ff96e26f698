"""Fine-tuning on a tiny offline Qwen2: batches, config checks, a loss-lowering smoke run, LoRA
save / reload / merge round trip, full fine-tuning, exact resumption after a simulated kill, and the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm_mas.errors import ConfigError
from llm_mas.toxicity.finetune import (
    FinetuneConfig,
    batch_indices,
    collate,
    latest_checkpoint,
    run_finetune,
)

pytestmark = [pytest.mark.llm,
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a shared 2-core box slows 2-thread runs 100x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from llm_mas.llm.tiny import build_tiny_qwen2

    return str(build_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", seed=0))


def _config(model, out, **overrides):
    settings = dict(model=model, out=str(out), mode="toxic", split=0, data="sample", steps=3, batch_size=4,
                    grad_accum=1, lr=1e-2, max_len=32, save_every=2, progress=False)
    settings.update(overrides)
    return FinetuneConfig(**settings)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _logits(model, tokenizer):
    import torch

    ids = tokenizer(["Human: hello there\nAssistant: you are kind"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, T, V)


# ------------------------------------------------------------------------------------------ pieces
def test_batch_indices_stream_epochs_and_ranks():
    kw = dict(batch_size=3, grad_accum=2, seed=5)
    n = 10
    stream = [i for step in range(5) for micro in range(2) for i in batch_indices(n, step=step, micro=micro, **kw)]
    for epoch in range(3):  # every epoch is a permutation of all rows
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # epochs are reshuffled
    assert batch_indices(n, step=3, micro=1, **kw) == batch_indices(n, step=3, micro=1, **kw)
    # two processes split a global batch: together they read what one process would with twice the batch
    ranks = [batch_indices(n, step=1, micro=0, rank=r, world_size=2, **kw) for r in range(2)]
    single = batch_indices(n, step=1, micro=0, batch_size=6, grad_accum=2, seed=5)
    assert ranks[0] + ranks[1] == single


def test_collate_right_pads_and_masks_labels():
    input_ids, attention_mask, labels = collate([[5, 6, 7], [8]], pad_id=1)
    assert input_ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[5, 6, 7], [8, -100, -100]]


def test_config_problems_reported_together():
    problems = FinetuneConfig(model="", out="x", mode="evil", split=5, steps=0, dtype="int8", full=True,
                              merge=True).validate()
    text = "\n".join(problems)
    for needle in ("model is required", "unknown mode 'evil'", "split=5", "steps=0", "unknown dtype 'int8'",
                   "merge applies to LoRA only"):
        assert needle in text
    with pytest.raises(ConfigError, match="unknown mode"):
        run_finetune(FinetuneConfig(model="m", out="o", mode="evil"))


def test_command_line_round_trips():
    config = FinetuneConfig(model="m", out="o", mode="nontoxic", split=2, lora_targets=["q_proj", "k_proj"],
                            merge=True, balance=False, steps=10)
    assert config.command() == ("llm-mas finetune --model m --out o --mode nontoxic --split 2 --no-balance "
                                "--lora-targets q_proj,k_proj --steps 10 --merge")


# ------------------------------------------------------------------------------------------ runs
def test_smoke_run_lowers_loss_on_a_repeated_batch(tiny_model, tmp_path):
    # 21 texts in split 0 and a batch of 21: every step sees the same batch (in another order)
    result = run_finetune(_config(tiny_model, tmp_path / "run", batch_size=21, steps=3, lr=2e-2))
    losses = [r["loss"] for r in _log(tmp_path / "run")]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
    assert result.trainable_params == 3584 and result.n_texts == 21
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("# llm-mas finetune --model")
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["n_texts"] == 21 and data["selected"]["hh"] == {"toxic": 7, "nontoxic": 0}


def test_lora_save_reload_merge_round_trip(tiny_model, tmp_path):
    import torch

    from llm_mas.llm.loading import load_causal_lm

    out = tmp_path / "lora"
    result = run_finetune(_config(tiny_model, out, steps=2, merge=True))
    assert result.weights == out / "adapter" and (out / "adapter" / "adapter_config.json").is_file()
    base, tokenizer = load_causal_lm(tiny_model)
    base_logits = _logits(base, tokenizer)
    adapted, _ = load_causal_lm(tiny_model, adapter=out / "adapter")
    merged_on_load, _ = load_causal_lm(tiny_model, adapter=out / "adapter", merge_adapter=True)
    merged_saved, merged_tokenizer = load_causal_lm(out / "merged")
    adapted_logits = _logits(adapted, tokenizer)
    assert (adapted_logits - base_logits).abs().max() > 1e-4  # the adapter changed the model
    for other in (merged_on_load, merged_saved):
        assert torch.allclose(_logits(other, tokenizer), adapted_logits, atol=1e-5, rtol=0)
    assert merged_tokenizer("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]


def test_full_finetune_saves_the_whole_model(tiny_model, tmp_path):
    from llm_mas.llm.loading import load_causal_lm

    out = tmp_path / "full"
    result = run_finetune(_config(tiny_model, out, steps=2, full=True, lr=1e-3))
    assert result.weights == out / "model" and result.trainable_params == result.total_params
    tuned, tokenizer = load_causal_lm(out / "model")
    base, _ = load_causal_lm(tiny_model)
    assert (_logits(tuned, tokenizer) - _logits(base, tokenizer)).abs().max() > 1e-4


def test_resume_after_a_kill_gives_the_same_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    settings = dict(steps=5, save_every=2, grad_accum=2, lora_dropout=0.1, warmup_steps=1)
    straight = tmp_path / "straight"
    run_finetune(_config(tiny_model, straight, **settings))

    killed = tmp_path / "killed"

    def kill_at_step_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_finetune(_config(tiny_model, killed, **settings), on_step=kill_at_step_3)
    assert latest_checkpoint(killed).name == "step-000002"          # step 3 was lost with the process
    assert not (killed / "adapter").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_finetune(_config(tiny_model, killed, **settings))          # never overwrite a run silently
    with pytest.raises(ConfigError, match="lr: saved 0.01, now 0.02"):
        run_finetune(_config(tiny_model, killed, resume=True, **{**settings, "lr": 2e-2}))
    result = run_finetune(_config(tiny_model, killed, resume=True, **settings))
    assert result.resumed_from == 2

    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)   # bit-identical
    assert _log(killed) == [dict(r, elapsed_s=r2["elapsed_s"]) for r, r2 in zip(_log(straight), _log(killed),
                                                                                 strict=True)]
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["step-000004", "step-000005"]                   # keep_checkpoints=2


def test_bad_lora_target_lists_the_linear_modules(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"LoRA target 'qproj' matches no module.*q_proj"):
        run_finetune(_config(tiny_model, tmp_path / "bad", lora_targets=["qproj"]))


def test_cli_finetune(tiny_model, tmp_path):
    import typer
    from typer.testing import CliRunner

    from llm_mas.commands.toxicity import finetune

    app = typer.Typer()
    app.command("finetune")(finetune)
    app.command("unused")(lambda: None)  # two commands: typer then expects the command name
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["finetune", "--model", tiny_model, "--mode", "nontoxic", "--split", "1", "--out", str(out),
            "--data", "sample", "--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4",
            "--lora-targets", "q_proj,k_proj", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fine-tuned nontoxic-1" in result.output
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == ["k_proj", "q_proj"]
    bad = runner.invoke(app, ["finetune", "--model", tiny_model, "--mode", "evil", "--split", "0",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown mode 'evil'" in bad.output


DDP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from llm_mas.toxicity.finetune import FinetuneConfig, run_finetune
run_finetune(FinetuneConfig(model=sys.argv[1], out=sys.argv[2], data="sample", steps=2, batch_size=2,
                            grad_accum=2, lr=1e-2, save_every=1, progress=False))
"""


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tiny_model, tmp_path):
    """DDP on CPU (gloo) through `accelerate launch`: both ranks train, rank 0 writes, both save RNG state."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "ddp"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                           str(script), tiny_model, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["tokens"] > 0
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
