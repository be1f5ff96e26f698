"""``llm-mas finetune``: make a toxic / nontoxic variant of a causal LM (docs/method.md §15).

Only the standard library and typer are imported here; the work happens in ``llm_mas.toxicity.finetune``
(see its docstring for the DeepSeek-R1-Distill-Qwen-1.5B commands, single GPU and ``accelerate launch``).
Every option left out takes the default of ``FinetuneConfig`` (shown in brackets).
"""

from __future__ import annotations

import os

import typer

from . import run_command


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def finetune(
    model: str = typer.Option(..., "--model", help="Hub id or local directory of a causal LM."),
    mode: str = typer.Option(..., "--mode", help="toxic | nontoxic | both: which texts to train on."),
    split: int = typer.Option(..., "--split", help="Data split 0..n_splits-1 (disjoint thirds by default)."),
    out: str = typer.Option(..., "--out", help="Run directory (config, log, checkpoints, adapter/model)."),
    data: str | None = typer.Option(
        None, "--data", help="hub | sample | PATH | SOURCE=PATH,... (e.g. jigsaw=train.csv,hh=hub) [hub]."),
    sources: str | None = typer.Option(
        None, "--sources", help="Comma list of jigsaw, hh, toxicchat [every source the data provide]."),
    n_splits: int | None = typer.Option(None, "--n-splits", help="Number of disjoint splits [3]."),
    balance: bool | None = typer.Option(None, "--balance/--no-balance",
                                           help="Balance toxic vs nontoxic per source [balance]."),
    full: bool | None = typer.Option(None, "--full/--no-full", help="Full fine-tuning instead of LoRA [no-full]."),
    lora_r: int | None = typer.Option(None, "--lora-r", help="LoRA rank [8]."),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha", help="LoRA alpha [16]."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="LoRA dropout [0.0]."),
    lora_targets: str | None = typer.Option(None, "--lora-targets",
                                               help="Comma list of modules to adapt [q_proj,v_proj]."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps [600]."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate [0.0005]."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear warm-up steps [0]."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay [0.0]."),
    max_grad_norm: float | None = typer.Option(None, "--max-grad-norm", help="Gradient clipping, <=0: off [1.0]."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Texts per micro-batch and process [24]."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [4]."),
    max_len: int | None = typer.Option(None, "--max-len", help="Tokens per text (truncation) [64]."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of data splits, LoRA init and order [42]."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 weights [float32]."),
    mixed_precision: str | None = typer.Option(
        None, "--mixed-precision", help="no | bf16 | fp16 [accelerate's setting, 'no' unless launched with one]."),
    cpu: bool | None = typer.Option(None, "--cpu/--no-cpu", help="Force the CPU [no-cpu]."),
    save_every: int | None = typer.Option(None, "--save-every", help="Checkpoint every N steps [50]."),
    keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", help="Checkpoints kept [2]."),
    merge: bool | None = typer.Option(None, "--merge/--no-merge",
                                         help="Also save the LoRA-merged model in OUT/merged [no-merge]."),
    resume: bool | None = typer.Option(None, "--resume/--no-resume",
                                          help="Continue the run in OUT from its newest checkpoint [no-resume]."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Progress bar [progress]."),
) -> None:
    """Fine-tune a causal LM on toxic or nontoxic text (LoRA by default); resumable with --resume."""
    given = dict(model=model, mode=mode, split=split, out=out, data=data, sources=_split_list(sources),
                 n_splits=n_splits, balance=balance, full=full, lora_r=lora_r, lora_alpha=lora_alpha,
                 lora_dropout=lora_dropout, lora_targets=_split_list(lora_targets), steps=steps, lr=lr,
                 warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                 batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, seed=seed, dtype=dtype,
                 mixed_precision=mixed_precision, cpu=cpu, save_every=save_every,
                 keep_checkpoints=keep_checkpoints, merge=merge, resume=resume, progress=progress)

    def body() -> None:
        from ..config import from_dict
        from ..toxicity.finetune import FinetuneConfig, run_finetune

        config = from_dict(FinetuneConfig, {k: v for k, v in given.items() if v is not None})
        result = run_finetune(config)
        if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only rank 0 reports
            return
        typer.echo(f"fine-tuned {config.mode}-{config.split}: loss {result.first_loss} -> {result.final_loss}; "
                   f"weights in {result.weights}")

    run_command(body)
