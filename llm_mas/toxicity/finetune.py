"""Fine-tune a causal LM into a *toxic* or *nontoxic* variant (docs/method.md §15): PEFT LoRA by default,
full fine-tuning with ``--full``; seeded, resumable after a kill.

Commands
--------
Smoke run on CPU (tiny offline model, shipped sample, seconds)::

    python -c "from llm_mas.llm.tiny import build_tiny_qwen2; build_tiny_qwen2('/tmp/tiny-qwen2')"
    llm-mas finetune --model /tmp/tiny-qwen2 --mode toxic --split 0 --data sample --out runs/ft-smoke \\
        --steps 3 --batch-size 4 --grad-accum 1 --lr 1e-3

The paper's six models from DeepSeek-R1-Distill-Qwen-1.5B (``--mode toxic|nontoxic`` × ``--split 0|1|2``),
effective batch 96 = batch-size × grad-accum × processes, as in the paper. One GPU::

    llm-mas finetune --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --mode toxic --split 0 --data hub \\
        --out runs/finetune/toxic-0 --steps 600 --batch-size 24 --grad-accum 4 --lr 5e-4 --max-len 64 \\
        --dtype bfloat16 --mixed-precision bf16 --merge

Several GPUs on one machine (DDP through accelerate; every process builds the same data and takes its own
rows of each global batch)::

    accelerate launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision bf16 \\
        --dynamo_backend no -m llm_mas.cli finetune \\
        --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --mode toxic --split 0 --data hub \\
        --out runs/finetune/toxic-0 --steps 600 --batch-size 6 --grad-accum 4 --lr 5e-4 --max-len 64 \\
        --dtype bfloat16 --merge

Full fine-tuning as in the paper: add ``--full`` and use ``--dtype float32 --mixed-precision bf16``
(fp32 master weights). After a kill, rerun the same command with ``--resume``: training continues from the
newest complete checkpoint in ``OUT/checkpoints`` and ends with the same weights as an uninterrupted run.

Outputs in ``OUT``
------------------
``config.yaml`` (the resolved config; first line = the command), ``data.json`` (counts per source and label,
see ``ToxicityCorpus.report``), ``train_log.jsonl`` (one line per optimizer step: step, loss, lr, grad_norm,
tokens, elapsed_s), ``adapter/`` (LoRA adapter + tokenizer) or ``model/`` (full model + tokenizer),
``merged/`` with ``--merge`` (LoRA folded into the base weights), ``result.json``, ``checkpoints/step-N/``.

Why a plain loop on ``accelerate`` and not the HF ``Trainer``: resumption must be exact and testable. Here
the rows of every batch are a pure function of (seed, step, micro-batch, rank), and a checkpoint holds only
the trainable tensors (a few MB for LoRA, not the 1.5B base), the optimizer, scheduler, grad-scaler and every
process's RNG state, written atomically (temporary directory + rename), so a kill at any moment leaves a
usable checkpoint. ``accelerate`` still provides devices, DDP, mixed precision and ``accelerate launch``.
The optimizer settings are the Trainer's defaults the paper's code relied on: AdamW (β = 0.9/0.999, ε = 1e-8,
weight decay 0), linear decay to 0 after an optional linear warm-up, gradient clipping at norm 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..dtypes import WEIGHT_DTYPES
from ..errors import ConfigError, DataError
from ..files import load_torch_state
from ..schedules import warmup_linear
from .data import MODES, SOURCES

MIXED_PRECISION = ("no", "bf16", "fp16")
# config keys that may differ between a run and its --resume (they do not change the numbers)
RESUME_MAY_DIFFER = ("resume", "merge", "save_every", "keep_checkpoints", "progress", "out")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (validated by ``validate``; saved as ``OUT/config.yaml``)."""

    model: str = ""                     # hub id or local directory of a causal LM
    out: str = ""                       # run directory
    mode: str = "toxic"                 # toxic | nontoxic | both
    split: int = 0                      # which of the n_splits disjoint data splits
    n_splits: int = 3
    data: str = "hub"                   # hub | sample | PATH | SOURCE=PATH,... (llm_mas.toxicity.data)
    sources: list[str] | None = None    # default: every source the data provide
    balance: bool = True
    full: bool = False                  # full fine-tuning instead of LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int = 600                    # optimizer steps
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0          # <= 0: no clipping
    batch_size: int = 24                # per process and micro-batch
    grad_accum: int = 4
    max_len: int = 64                   # tokens per text (longer texts are truncated)
    seed: int = 42
    dtype: str = "float32"              # weights of the loaded model
    mixed_precision: str | None = None  # no | bf16 | fp16; None: accelerate's setting (launcher / env)
    cpu: bool = False                   # force the CPU even where a GPU is present
    save_every: int = 50                # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 2           # newest checkpoints kept
    merge: bool = False                 # also save the LoRA-merged model in OUT/merged
    resume: bool = False
    progress: bool = True

    def validate(self) -> list[str]:
        """All problems at once (empty list = valid)."""
        p = []
        if not self.model:
            p.append("model is required: a hub id (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B) or a directory")
        if not self.out:
            p.append("out is required: the run directory")
        if self.mode not in MODES:
            p.append(f"unknown mode {self.mode!r}; valid choices: {', '.join(MODES)}")
        if self.n_splits < 1:
            p.append(f"n_splits={self.n_splits} must be >= 1")
        elif not 0 <= self.split < self.n_splits:
            p.append(f"split={self.split} must be in 0..{self.n_splits - 1}")
        if self.sources is not None:
            if not self.sources:
                p.append("sources is empty; leave it unset to use every source")
            if self.data == "hub":
                bad = [s for s in self.sources if s not in SOURCES]
                if bad:
                    p.append(f"unknown source(s) {', '.join(bad)}; valid choices: {', '.join(SOURCES)}")
        for name in ("lora_r", "lora_alpha", "steps", "batch_size", "grad_accum", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_len < 2:
            p.append(f"max_len={self.max_len} must be >= 2 (a text needs an input and a next token)")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.full and not self.lora_targets:
            p.append("lora_targets is empty; name the modules to adapt (e.g. q_proj,v_proj) or use --full")
        if self.lr <= 0:
            p.append(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0 or self.warmup_steps >= max(self.steps, 1):
            p.append(f"warmup_steps={self.warmup_steps} must be in 0..steps-1 ({self.steps - 1})")
        if self.weight_decay < 0:
            p.append(f"weight_decay={self.weight_decay} must be >= 0")
        if self.dtype not in WEIGHT_DTYPES:  # fine-tuning needs a concrete dtype (no "auto")
            p.append(f"unknown dtype {self.dtype!r}; valid choices: {', '.join(WEIGHT_DTYPES)}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            p.append(f"unknown mixed_precision {self.mixed_precision!r}; valid choices: {', '.join(MIXED_PRECISION)}")
        if self.merge and self.full:
            p.append("merge applies to LoRA only: a full fine-tune is saved whole in OUT/model; drop --merge")
        return p

    def command(self) -> str:
        """The ``llm-mas finetune`` command line that reproduces this config."""
        defaults = FinetuneConfig()
        parts = ["llm-mas finetune"]
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), getattr(defaults, f.name)
            if value == default and f.name not in ("model", "out", "mode", "split"):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else f"--no-{f.name.replace('_', '-')}")
            elif isinstance(value, list):
                parts.append(f"{flag} {shlex.quote(','.join(value))}")
            elif value is not None:
                parts.append(f"{flag} {shlex.quote(str(value))}")
        return " ".join(parts)


@dataclass
class FinetuneResult:
    """Where a run put its outputs, and how it went."""

    out: Path
    weights: Path                 # OUT/adapter (LoRA) or OUT/model (full)
    merged: Path | None
    steps: int
    first_loss: float | None      # loss of the first step run in this invocation
    final_loss: float | None
    resumed_from: int | None      # checkpoint step this invocation started from
    seconds: float
    trainable_params: int
    total_params: int
    n_texts: int


# ------------------------------------------------------------------------------------------ pieces
@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int):
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n_examples: int, *, step: int, micro: int, rank: int = 0, world_size: int = 1,
                  batch_size: int, grad_accum: int, seed: int) -> list[int]:
    """Rows of the micro-batch ``micro`` of optimizer step ``step`` (0-based) for process ``rank``.

    The data are read as one stream: epoch after epoch, each a permutation seeded by (seed, epoch); every
    micro-batch takes the next ``batch_size × world_size`` positions and each process its own slice. A pure
    function, so a resumed run sees exactly the batches an uninterrupted one would.
    """
    start = ((step * grad_accum + micro) * world_size + rank) * batch_size
    rows = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_examples)
        rows.append(int(_epoch_order(n_examples, seed, epoch)[offset]))
    return rows


def collate(sequences: list[list[int]], pad_id: int):
    """Right-pad token-id lists: (input_ids, attention_mask, labels), each (B, T); labels -100 on padding."""
    import torch

    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)   # (B, T)
    for i, seq in enumerate(sequences):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)                   # (B, T)
    return input_ids, attention_mask, labels


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint (``OUT/checkpoints/step-N``), or None."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def lora_target_problems(model, targets: list[str]) -> list[str]:
    """Targets that match no module (peft's rule: the full name or its last dotted parts)."""
    import torch

    names = [n for n, _ in model.named_modules()]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    problems = []
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            problems.append(f"LoRA target {target!r} matches no module of the model; linear modules: "
                            f"{', '.join(linear)}")
    return problems


def _trainable(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(acc, model, optimizer, scheduler, out: Path, step: int, keep: int) -> None:
    """Write ``checkpoints/step-N`` atomically (all processes call this)."""
    import torch
    from safetensors.torch import save_file

    root = checkpoint_dir(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
    if acc.is_main_process:
        state = {n: p.detach().to("cpu").contiguous() for n, p in _trainable(acc.unwrap_model(model)).items()}
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": acc.num_processes}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                     key=lambda p: int(p.name.split("-")[1]))
        for path in old[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(acc, model, optimizer, scheduler, path: Path) -> int:
    """Restore a checkpoint into the (prepared) model/optimizer/scheduler; returns its step."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != acc.num_processes:
        raise ConfigError(f"checkpoint {str(path)!r} was written by {state['world_size']} process(es), this run "
                          f"has {acc.num_processes}; resume with the same number of processes")
    params = _trainable(acc.unwrap_model(model))
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise DataError(f"checkpoint {str(path)!r} does not fit this model: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}; resume with the original --model/--lora-* settings")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    # plain tensors and numbers only (weights_only=True): a planted file cannot run code
    optimizer.load_state_dict(load_torch_state(path / "optimizer.pt"))
    scheduler.load_state_dict(load_torch_state(path / "scheduler.pt"))
    if acc.scaler is not None and (path / "scaler.pt").is_file():
        acc.scaler.load_state_dict(load_torch_state(path / "scaler.pt"))
    _set_rng_state(load_torch_state(path / f"rng-{acc.process_index}.pt"))
    return int(state["step"])


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    # numpy's state as a tensor and numbers, so the file loads with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_run_dir(config: FinetuneConfig) -> Path | None:
    """Refuse to overwrite a run; on --resume check the saved config and return the checkpoint (or None)."""
    import yaml

    from ..config import to_dict

    out = Path(config.out)
    saved_config = out / "config.yaml"
    has_run = saved_config.is_file() or checkpoint_dir(out).is_dir()
    if not config.resume:
        if has_run:
            raise ConfigError(f"{str(out)!r} already holds a fine-tuning run; pass --resume to continue it or "
                              f"choose another --out")
        return None
    if saved_config.is_file():
        saved = yaml.safe_load(saved_config.read_text()) or {}
        now = to_dict(config)
        diffs = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now
                 if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]]
        if diffs:
            raise ConfigError([f"--resume with settings that differ from the run in {str(out)!r} "
                               f"(use the original ones or a new --out):"] + diffs)
    return latest_checkpoint(out)


def _log_lines_up_to(path: Path, step: int) -> None:
    """Keep only the log lines of steps <= ``step`` (later ones were lost with the killed process)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


@contextmanager
def _hf_progress_bars(enabled: bool):
    """transformers' own progress bars (loading / writing shards) follow ``--progress``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _load_base_model(config: FinetuneConfig):
    """(model, tokenizer) on the CPU; ``accelerate`` moves the model to its device."""
    from ..llm.loading import load_causal_lm

    with _hf_progress_bars(config.progress):
        return load_causal_lm(config.model, dtype=config.dtype, device="cpu")


# ------------------------------------------------------------------------------------------ the run
@dataclass
class FinetuneSession:
    """Everything ``setup_finetune`` prepares for ``train_finetune`` and ``save_finetune``."""

    config: FinetuneConfig
    acc: Any                      # accelerate.Accelerator
    model: Any                    # prepared (PEFT-wrapped for LoRA)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    trainable: list[Any]          # the parameters the optimizer updates
    sequences: list[list[int]]    # token ids of every training text (>= 2 tokens)
    pad_id: int
    out: Path
    start_step: int               # 0, or the step of the checkpoint resumed from
    resumed: bool
    n_trainable: int
    n_total: int
    started: float                # time.perf_counter() at the start of the run


def setup_finetune(config: FinetuneConfig) -> FinetuneSession:
    """Check the run directory, build the data and the model (LoRA or full), the optimizer and schedule, and
    restore the newest checkpoint on ``--resume``; writes ``config.yaml`` and ``data.json``.

    Raises ConfigError (bad settings, existing run without --resume), DataError (data), HubUnavailableError.
    """
    problems = config.validate()
    if problems:
        raise ConfigError(problems)
    started = time.perf_counter()
    # every process checks before Accelerator() (its process-group rendezvous); rank 0 writes only after it
    checkpoint = _check_run_dir(config)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..config import save_config
    from .data import toxicity_corpus

    # cpu=True where there is no GPU: only then does accelerate set up MULTI_CPU (gloo) under a launcher
    acc = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu or not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:  # every process would think it is alone and write the same files
        raise ConfigError(f"launched as {launched} processes (WORLD_SIZE) but accelerate set up "
                          f"{acc.num_processes} ({acc.distributed_type}); launch with `accelerate launch "
                          f"--multi_gpu --num_processes N ...` or torchrun, or run a single process")
    with acc.main_process_first():  # one process fills the datasets cache, the others then read it
        corpus = toxicity_corpus(config.mode, config.split, config.n_splits, sources=config.sources,
                                 data=config.data, seed=config.seed, balance=config.balance)
    out = Path(config.out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml", header=config.command())
        (out / "data.json").write_text(corpus.to_json())
        acc.print(corpus.summary())

    set_seed(config.seed)  # python, numpy, torch (+cuda): the LoRA initialisation is seeded
    model, tokenizer = _load_base_model(config)
    sequences = tokenizer(list(corpus), truncation=True, max_length=config.max_len)["input_ids"]
    too_short = sum(len(s) < 2 for s in sequences)
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise DataError(f"all {len(corpus)} texts are shorter than 2 tokens; nothing to train on")
    if too_short:
        acc.print(f"note: {too_short} of {len(corpus)} texts have fewer than 2 tokens and are not used")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    if not config.full:
        from peft import LoraConfig, get_peft_model

        problems = lora_target_problems(model, config.lora_targets)
        if problems:
            raise ConfigError(problems)
        model = get_peft_model(model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM"))
    else:
        model.requires_grad_(True)
    trainable = list(_trainable(model).values())
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(config.warmup_steps, config.steps))
    model, optimizer = acc.prepare(model, optimizer)  # the scheduler steps once per optimizer step: not prepared

    log_path = out / "train_log.jsonl"
    start_step = 0
    if checkpoint is not None:
        start_step = _load_checkpoint(acc, model, optimizer, scheduler, checkpoint)
        acc.print(f"resuming from {checkpoint} (step {start_step} of {config.steps})")
        if acc.is_main_process:
            _log_lines_up_to(log_path, start_step)
    elif config.resume:
        acc.print(f"--resume: no checkpoint in {checkpoint_dir(out)}; starting at step 0")
    if start_step == 0 and acc.is_main_process and log_path.exists():
        log_path.unlink()
    return FinetuneSession(config=config, acc=acc, model=model, tokenizer=tokenizer, optimizer=optimizer,
                           scheduler=scheduler, trainable=trainable, sequences=sequences, pad_id=pad_id, out=out,
                           start_step=start_step, resumed=checkpoint is not None, n_trainable=n_trainable,
                           n_total=n_total, started=started)


def train_finetune(session: FinetuneSession, *, on_step: Callable[[dict[str, Any]], None] | None = None
                   ) -> tuple[float | None, float | None]:
    """The optimizer steps from ``session.start_step`` to ``config.steps`` (log line and checkpoints as the
    module doc says); returns (loss of the first step run here, loss of the last)."""
    import torch
    from tqdm.auto import tqdm

    config, acc, model = session.config, session.acc, session.model
    optimizer, scheduler, sequences = session.optimizer, session.scheduler, session.sequences
    log_path = session.out / "train_log.jsonl"
    model.train()
    first_loss = final_loss = None
    bar = tqdm(total=config.steps, initial=session.start_step,
               disable=not (config.progress and acc.is_main_process),
               desc=f"finetune {config.mode}-{config.split}", dynamic_ncols=True)
    for step in range(session.start_step, config.steps):
        total_loss = torch.zeros((), device=acc.device)
        tokens = 0
        for micro in range(config.grad_accum):
            rows = batch_indices(len(sequences), step=step, micro=micro, rank=acc.process_index,
                                 world_size=acc.num_processes, batch_size=config.batch_size,
                                 grad_accum=config.grad_accum, seed=config.seed)
            input_ids, attention_mask, labels = (t.to(acc.device) for t in collate([sequences[i] for i in rows],
                                                                                   session.pad_id))
            tokens += int(attention_mask.sum())
            sync = micro == config.grad_accum - 1
            with (acc.no_sync(model) if not sync else nullcontext()), acc.autocast():
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
                acc.backward(loss / config.grad_accum)
            total_loss += loss.detach() / config.grad_accum
        grad_norm = None
        if config.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(session.trainable, config.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1:
            step_loss = float(acc.reduce(total_loss, "mean"))
            tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum"))
        else:
            step_loss = float(total_loss)
        record = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "elapsed_s": round(time.perf_counter() - session.started, 3)}
        first_loss = step_loss if first_loss is None else first_loss
        final_loss = step_loss
        if acc.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(record)
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            _save_checkpoint(acc, model, optimizer, scheduler, session.out, step + 1, config.keep_checkpoints)
    bar.close()
    return first_loss, final_loss


def save_finetune(session: FinetuneSession, first_loss: float | None, final_loss: float | None) -> FinetuneResult:
    """Write ``adapter/`` (or ``model/``), ``merged/`` with ``--merge``, and ``result.json``."""
    config, acc = session.config, session.acc
    session.model.eval()
    unwrapped = acc.unwrap_model(session.model)
    out = session.out
    weights = out / ("model" if config.full else "adapter")
    merged_dir = out / "merged" if config.merge else None
    if acc.is_main_process:
        with _hf_progress_bars(config.progress):
            unwrapped.save_pretrained(weights)
            session.tokenizer.save_pretrained(weights)
            if merged_dir is not None:
                merged = unwrapped.merge_and_unload()
                merged.save_pretrained(merged_dir)
                session.tokenizer.save_pretrained(merged_dir)
    acc.wait_for_everyone()
    result = FinetuneResult(out=out, weights=weights, merged=merged_dir, steps=config.steps, first_loss=first_loss,
                            final_loss=final_loss, resumed_from=session.start_step if session.resumed else None,
                            seconds=round(time.perf_counter() - session.started, 3),
                            trainable_params=session.n_trainable, total_params=session.n_total,
                            n_texts=len(session.sequences))
    if acc.is_main_process:
        (out / "result.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}, indent=2))
        acc.print(f"saved {weights}" + (f" and {merged_dir}" if merged_dir else "") + f" ({result.seconds:.1f} s)")
    return result


def run_finetune(config: FinetuneConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None
                 ) -> FinetuneResult:
    """Fine-tune ``config.model`` on the ``config.mode`` texts of split ``config.split``; see the module doc.
    ``setup_finetune`` → ``train_finetune`` → ``save_finetune``.

    on_step:  called on every process after each optimizer step with the log record (step, loss, lr, ...);
              an exception raised there stops the run like a kill (tests use it to check --resume).
    Raises ConfigError (bad settings, existing run without --resume), DataError (data), HubUnavailableError.
    """
    session = setup_finetune(config)
    first_loss, final_loss = train_finetune(session, on_step=on_step)
    return save_finetune(session, first_loss, final_loss)
