"""``llm-mas record``: record a causal LM's greedy generations and predictions for stepwise LLM MAS.

    llm-mas record --model /models/toxic-0 --texts prompts.jsonl --out recordings/toxic-0 --n 1000

Texts come from a ``.txt`` file (one text per line) or a ``.jsonl`` file (objects with a "text" field).
Only the standard library and typer are imported here; the work happens in ``llm_mas.llm.record``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import run_command


def read_texts(path: str | Path) -> list[str]:
    """Texts from a ``.txt`` (one per non-empty line) or ``.jsonl`` (a "text" field per line) file."""
    from ..errors import ConfigError, DataError
    from ..files import jsonl_rows

    file = Path(path)
    if not file.is_file():
        raise DataError(f"texts file {str(file)!r} does not exist; pass a .txt (one text per line) or .jsonl "
                        "(one {\"text\": ...} object per line) file")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return [line.rstrip("\r") for line in file.read_text(encoding="utf-8").split("\n") if line.strip()]
    if suffix == ".jsonl":
        texts = []
        for number, row in jsonl_rows(file):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{file}:{number} needs a string field \"text\"; got {str(row)[:80]!r}")
            texts.append(row["text"])
        return texts
    raise ConfigError(f"texts file {str(file)!r} has suffix {suffix!r}; valid choices: .jsonl, .txt")


def record(
    model: str = typer.Option(..., "--model", help="Hub id or local directory of a causal LM."),
    texts: str = typer.Option(..., "--texts", help="Prompt texts: .txt (one per line) or .jsonl ({\"text\": ...})."),
    out: str = typer.Option(..., "--out", help="Directory for recording.safetensors + recording.json."),
    n: int = typer.Option(1000, "--n", help="Number of sequences to record."),
    prompt_len: int = typer.Option(32, "--prompt-len", help="Prompt tokens taken from each text."),
    total_len: int = typer.Option(64, "--total-len", help="Length after greedy generation."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the text order."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 | auto."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | cuda:N | auto."),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT adapter directory on top of the model."),
    merge_adapter: bool = typer.Option(False, "--merge-adapter/--no-merge-adapter",
                                       help="Fold the adapter into the weights before recording."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress",
                                            help="Progress bar [only on a terminal]."),
    allow_unknown_tokens: bool = typer.Option(
        False, "--allow-unknown-tokens/--no-allow-unknown-tokens",
        help="Record prompts holding words the tokenizer reads as its unknown token [refused]."),
) -> None:
    """Record greedy continuations and teacher-forced predictions of a model (stepwise LLM MAS data)."""

    def body() -> None:
        from ..llm.loading import load_causal_lm
        from ..llm.record import record_generations

        prompts = read_texts(texts)
        lm, tokenizer = load_causal_lm(model, dtype=dtype, device=device, adapter=adapter,
                                       merge_adapter=merge_adapter)
        recording = record_generations(lm, tokenizer, prompts, prompt_len=prompt_len, total_len=total_len, n=n,
                                       batch_size=batch_size, seed=seed, progress=progress,
                                       allow_unknown_tokens=allow_unknown_tokens)
        path = recording.save(out)
        typer.echo(f"recorded {len(recording)} sequences of {recording.total_len} tokens "
                   f"(greedy agreement {recording.meta['greedy_agreement']:.4f}) into {path}")

    run_command(body)


def train_lm(
    task: str = typer.Option("multiobject", "--task",
                             help="multiobject | sameobject | singleobject | modulo | rounding | arithmetic | binding"
                                  " | organisms (the toxicity model organisms' template English, a Llama)."),
    out: str = typer.Option(..., "--out", help="Directory for the HF model, tokenizer and metrics.json."),
    width: int = typer.Option(128, "--width", help="Hidden size."),
    layers: int = typer.Option(2, "--layers", help="Transformer blocks."),
    heads: int = typer.Option(4, "--heads", help="Attention heads (must divide the width)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights and the training data."),
    steps: int = typer.Option(2000, "--steps", help="Most optimizer steps (training stops early when perfect)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate."),
    eval_every: int = typer.Option(100, "--eval-every", help="Steps between quick free-running evaluations."),
    eval_per_n: int = typer.Option(200, "--eval-per-n", help="Sequences per N in the final evaluation."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop training after this many minutes."),
    loss_on: str = typer.Option("task", "--loss-on", help="task (task tokens only) | all (every next token)."),
    arch: str = typer.Option("gpt2", "--arch", help="gpt2 (learned positions) | llama (rotary positions)."),
    curriculum: bool = typer.Option(False, "--curriculum/--no-curriculum",
                                    help="Start at N = lo+1 and add the next N once every N so far is >= 0.95."),
    extra_queries: int = typer.Option(0, "--extra-queries",
                                      help="binding only: questions per drilled row (0: none)."),
    extra_query_fraction: float = typer.Option(0.75, "--extra-query-fraction",
                                               help="binding only: fraction of rows drilled with --extra-queries."),
    threads: int = typer.Option(1, "--threads", help="torch threads for this process."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace a non-empty --out."),
    manifest: bool = typer.Option(False, "--manifest/--no-manifest",
                                  help="Rewrite manifest.json in the parent of --out afterwards."),
) -> None:
    """Train a small GPT-2 LM on a built-in task rendered as text; write an HF directory + metrics.json."""

    def body() -> None:
        import torch

        from ..llm.train_lm import train_lm as train
        from ..llm.train_lm import write_manifest

        torch.set_num_threads(threads)
        if task == "organisms":  # a text distribution, not a task: held-out loss / accuracy instead of a bar
            from ..llm.organisms import train_base_lm

            train_base_lm(out, width=width, layers=layers, heads=heads, seed=seed, steps=steps,
                          batch_size=batch_size, lr=lr, overwrite=overwrite, log=typer.echo)
            if manifest:
                typer.echo(f"manifest: {write_manifest(Path(out).parent)}")
            return
        metrics = train(task, out, width=width, layers=layers, heads=heads, seed=seed, steps=steps,
                        batch_size=batch_size, lr=lr, eval_every=eval_every, eval_per_n=eval_per_n,
                        max_minutes=max_minutes, loss_on=loss_on, arch=arch, curriculum=curriculum,
                        extra_queries=extra_queries, extra_query_fraction=extra_query_fraction, overwrite=overwrite,
                        log=typer.echo)
        if manifest:
            typer.echo(f"manifest: {write_manifest(Path(out).parent)}")
        if not metrics["passes_bar"]:
            typer.echo(f"warning: min free-running accuracy {metrics['min_accuracy']:.4f} is below the "
                       f"{metrics['bar']} bar; train longer (--steps) or wider (--width)")

    run_command(body)
