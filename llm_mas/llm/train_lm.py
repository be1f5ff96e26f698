"""Train a small Hugging Face causal LM on a built-in task rendered as text (offline, CPU, minutes).

    from llm_mas.llm.train_lm import train_lm
    metrics = train_lm("multiobject", "runs/lms/multiobject-w128-s0", width=128, layers=2, seed=0)
    model, tokenizer = llm_mas.llm.load_causal_lm("runs/lms/multiobject-w128-s0")

The model is a GPT-2 (learned absolute positions, the default) or a Llama architecture (rotary positions)
built from a config (a few hundred thousand parameters at width 96-128 and 2 layers) with a word-level tokenizer over the task's words
(`llm_mas.tasks.text.task_words`): every task token is one word and one LM token, and the LM token id
equals the task token id (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then the task's tokens, then ``<unk>``).
So ``tokenizer(render_texts(task, batch).texts)`` gives back exactly the task ids. Padding is on the right
(positions count from the first token, so right padding keeps every real token at its position).

Training: fresh task sequences every step (numpy RNG from `seed`), next-token cross-entropy on the task
tokens (the tokens a task model must produce; ``loss_on="all"``: every token), AdamW with warm-up and
cosine decay. Every `eval_every` steps a small free-running evaluation runs; training stops early once it
is perfect on every N three times in a row. The final evaluation (`free_running_accuracy`) generates the task
tokens greedily (given tokens are fed from the data, as in a task model's trial accuracy) on
`eval_per_n` fresh sequences per N, and is written with the run's facts to ``metrics.json``.

The whole run is a function of its arguments (seeded init and data); it uses whatever torch thread count
the caller set (the command sets 1). Qwen2 is not offered: ``AutoTokenizer`` replaces a Qwen2 model's
tokenizer by ``Qwen2Tokenizer``, which rebuilds a byte-level BPE pipeline and breaks a word-level vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llm_mas.errors import ConfigError
from llm_mas.schedules import warmup_cosine

ACCURACY_BAR = 0.99
CURRICULUM_BAR = 0.95  # quick-evaluation accuracy on every N trained so far that adds the next N
PERFECT_EVALS_TO_STOP = 3  # quick evaluations in a row without a single error end training early
UNK_WORD = "<unk>"
METRICS_FILE = "metrics.json"
ARCHS = ("gpt2", "llama")
LOSS_CHOICES = ("task", "all")


def _get_task(task):
    if isinstance(task, str):
        from llm_mas.tasks.binding import get_text_task

        return get_text_task(task)
    return task


def build_word_tokenizer(task, *, padding_side: str = "right"):
    """A word-level ``PreTrainedTokenizerFast`` whose ids equal the task's token ids (plus ``<unk>`` last)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llm_mas.tasks.text import SPECIAL_WORDS, task_words

    words = list(task_words(task)) + [UNK_WORD]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK_WORD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([SPECIAL_WORDS["P"], SPECIAL_WORDS["B"], SPECIAL_WORDS["E"], UNK_WORD])
    # padding_side must go to the constructor: setting it afterwards is not saved.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_WORDS["B"], eos_token=SPECIAL_WORDS["E"],
                                   pad_token=SPECIAL_WORDS["P"], unk_token=UNK_WORD, padding_side=padding_side)


def lm_config(task, *, width: int, layers: int, heads: int, vocab_size: int, arch: str = "gpt2",
              max_len: int | None = None):
    """A dropout-free config sized for the task (positions: max_len, default the task's, rounded up to 16).

    gpt2: learned absolute positions, MLP 4·width. llama: rotary positions (previous-token attention comes
    for free, which the binding task's lookup needs), SwiGLU MLP 2·width, as many KV heads as heads.
    Both keep a word-level tokenizer as is (a qwen2 model would get Qwen2Tokenizer's byte-level BPE instead).
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    if width % heads:
        raise ConfigError(f"width {width} is not divisible by heads {heads}; pick heads dividing the width")
    from llm_mas.tasks.base import BOS, EOS, PAD

    positions = 16 * math.ceil(max(task.max_len, max_len or 0) / 16)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=positions, attention_dropout=0.0, bos_token_id=BOS,
                           eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=PAD, tie_word_embeddings=True)


def _quantity_range(task) -> list[int]:
    from llm_mas.tasks.base import check_quantities

    lo, hi = getattr(task, "quantity_range", (1, 20))
    return check_quantities(None, (), lo, hi, "quantities").tolist()


def free_running_accuracy(model, task, *, per_n: int = 200, seed: int = 12345, batch_size: int = 1000,
                          quantities=None) -> dict[int, float]:
    """{N: fraction of `per_n` fresh sequences whose task tokens the model generates exactly}.

    Greedy, one token at a time with the KV cache: at a task position the model's own prediction is fed
    back, at a given position the data's token is fed (the task model trial accuracy's protocol). The
    inputs are task ids, which are this LM family's token ids.
    """
    import torch

    rng = np.random.default_rng(seed)
    out: dict[int, float] = {}
    device = next(model.parameters()).device
    for n_value in (quantities or _quantity_range(task)):
        batch = task.sample(per_n, rng, quantities=[n_value])
        correct = []
        for start in range(0, per_n, batch_size):
            ids = torch.as_tensor(batch.ids[start:start + batch_size], device=device)  # (b, L)
            task_mask = torch.as_tensor(batch.task_mask[start:start + batch_size], device=device)  # (b, L)
            generated = _generate_task_tokens(model, ids, task_mask)
            correct.append(((generated == ids) | ~task_mask).all(dim=1).cpu())
        out[int(n_value)] = float(torch.cat(correct).float().mean())
    return out


def _generate_task_tokens(model, ids, task_mask):
    """(b, L) ids with every task position replaced by the model's greedy prediction given what came before."""
    import torch

    columns = task_mask.any(dim=0).nonzero().flatten()
    if len(columns) == 0:
        return ids.clone()
    first = int(columns[0])  # every column before it holds given tokens only
    current = ids.clone()
    with torch.no_grad():
        out = model(input_ids=current[:, :first], use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]  # (b, V): prediction for position `first`
        for p in range(first, ids.shape[1]):
            current[:, p] = torch.where(task_mask[:, p], logits.argmax(-1), current[:, p])
            if p + 1 == ids.shape[1] or not bool(task_mask[:, p + 1:].any()):
                break
            out = model(input_ids=current[:, p:p + 1], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return current


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    return lr * warmup_cosine(step, steps, warmup, 0.1)


def train_lm(task_name: str, out_dir: str | Path, *, width: int = 128, layers: int = 2, heads: int = 4,
             seed: int = 0, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100,
             eval_every: int = 100, eval_per_n: int = 200, max_minutes: float | None = None, arch: str = "gpt2",
             loss_on: str = "task", curriculum: bool = False, extra_queries: int = 0,
             extra_query_fraction: float = 0.75, overwrite: bool = False,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train one LM on `task_name` and save it (HF directory + metrics.json) into `out_dir`; returns metrics.

    loss_on: "task" (the task tokens only, default) or "all" (every next token, given ones included: for
    binding, predicting a fresh name or a bound query name trains attention to the names seen so far).
    curriculum: train on N = lo+1 only at first (lo..hi: the task's quantity range; lo+1 is the smallest
    N with a choice to make for binding), and add the next N after each quick evaluation that is >= 0.95
    on every N trained so far; once hi is added, train on the full range lo..hi.
    extra_queries (binding only): a fraction `extra_query_fraction` of each batch's rows ask this many
    questions instead of one (`llm_mas.tasks.binding.with_extra_queries`).
    Binding LMs learned the lookup with ``arch="llama", curriculum=True, extra_queries=8, lr=2e-3`` in
    1 500-3 400 steps for 3 of the 5 seeds tried; without the curriculum and the extra questions none got
    past guessing among the bound values. With the curriculum, early stopping waits until every N is in.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llm_mas.tasks.base import PAD

    log = log or (lambda message: None)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass overwrite=True (--overwrite) or "
                          "another directory")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("width", width), ("layers", layers),
                        ("eval_per_n", eval_per_n), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if loss_on not in LOSS_CHOICES:
        raise ConfigError(f"unknown loss_on {loss_on!r}; valid choices: {', '.join(LOSS_CHOICES)}")
    task = _get_task(task_name)
    if extra_queries:  # 0: one question per row
        from llm_mas.tasks.binding import check_extra_queries, extra_query_length, with_extra_queries

        if task.name != "binding":
            raise ConfigError(f"extra_queries={extra_queries} asks for extra questions, which only the binding task "
                              f"has (task {task.name!r}); leave it at 0")
        check_extra_queries(extra_queries, extra_query_fraction)
    all_quantities = _quantity_range(task)
    lo, hi = all_quantities[0], all_quantities[-1]
    start = min(lo + 1, hi)  # curriculum: the first N trained
    trained_up_to = start if curriculum else hi
    curriculum_steps = {str(start): 0} if curriculum else {}
    tokenizer = build_word_tokenizer(task)
    config = lm_config(task, width=width, layers=layers, heads=heads, vocab_size=len(tokenizer), arch=arch,
                       max_len=extra_query_length(extra_queries) if extra_queries else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = np.random.default_rng(seed)
    log(f"train-lm {task.name}: {arch} width {width}, {layers} layers, {params:,} parameters, seed {seed}")

    started = time.perf_counter()
    perfect_in_a_row, step, loss_value, history = 0, 0, float("nan"), []
    model.train()
    for step in range(1, steps + 1):
        quantities = None if trained_up_to >= hi else list(range(start, trained_up_to + 1))
        batch = task.sample(batch_size, rng, quantities=quantities)
        if extra_queries:
            batch_ids, task_mask = with_extra_queries(batch, extra_queries, extra_query_fraction, rng)
        else:
            batch_ids, task_mask = batch.ids, batch.task_mask
        ids = torch.as_tensor(batch_ids)  # (B, L)
        scored = torch.as_tensor(task_mask) if loss_on == "task" else ids != PAD
        targets = torch.where(scored, ids, torch.full_like(ids, -100))[:, 1:]  # (B, L-1)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step - 1, steps, lr, warmup)
        logits = model(input_ids=ids[:, :-1]).logits  # (B, L-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        out_of_time = max_minutes is not None and time.perf_counter() - started > 60 * max_minutes
        if step % eval_every == 0 or step == steps or out_of_time:
            model.eval()
            quick = free_running_accuracy(model, task, per_n=50, seed=seed + 1000 + step)
            model.train()
            worst = min(quick.values())
            history.append({"step": step, "loss": loss_value, "min_accuracy": worst,
                            "seconds": time.perf_counter() - started})
            log(f"  step {step}: loss {loss_value:.4f}, quick free-running accuracy min over N {worst:.3f} "
                f"({time.perf_counter() - started:.0f}s)")
            if trained_up_to < hi and min(quick[n] for n in range(start, trained_up_to + 1)) >= CURRICULUM_BAR:
                trained_up_to += 1
                curriculum_steps[str(trained_up_to)] = step
                log(f"  curriculum: N up to {trained_up_to}" + (f" (now {lo}..{hi})" if trained_up_to >= hi else ""))
            perfect_in_a_row = perfect_in_a_row + 1 if worst == 1.0 and trained_up_to >= hi else 0
            if perfect_in_a_row >= PERFECT_EVALS_TO_STOP or out_of_time:
                break
    train_seconds = time.perf_counter() - started
    model.eval()
    accuracy = free_running_accuracy(model, task, per_n=eval_per_n, seed=seed + 99991)
    worst = min(accuracy.values())
    metrics = {
        "task": task.name, "arch": arch, "width": width, "layers": layers, "heads": heads, "params": params,
        "seed": seed, "steps": step, "max_steps": steps, "batch_size": batch_size, "lr": lr, "loss_on": loss_on,
        "curriculum": curriculum, "curriculum_steps": curriculum_steps, "extra_queries": extra_queries,
        "extra_query_fraction": extra_query_fraction if extra_queries else 0.0,
        "final_loss": loss_value, "train_seconds": round(train_seconds, 1),
        "accuracy_per_n": {str(k): v for k, v in accuracy.items()}, "min_accuracy": worst,
        "eval_per_n": eval_per_n, "bar": ACCURACY_BAR, "passes_bar": bool(worst >= ACCURACY_BAR),
        "history": history,
    }
    save_trained_lm(model, tokenizer, metrics, out)
    log(f"  saved {out}: min free-running accuracy {worst:.4f} over N ({'passes' if metrics['passes_bar'] else 'FAILS'}"
        f" the {ACCURACY_BAR} bar), {train_seconds:.0f}s")
    return metrics


def save_trained_lm(model, tokenizer, metrics: dict, out: Path) -> None:
    """A trained LM's directory: weights, tokenizer and ``metrics.json`` (what its training measured)."""
    from llm_mas.llm.tiny import _save_quietly

    out.mkdir(parents=True, exist_ok=True)
    _save_quietly(model, out)
    tokenizer.save_pretrained(out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")


MANIFEST_KEYS = ("task", "arch", "width", "layers", "heads", "params", "seed", "steps", "train_seconds",
                 "accuracy_per_n", "min_accuracy", "eval_per_n", "passes_bar")


# text LMs (llm_mas.llm.organisms: a text distribution, no task) are measured by held-out next-token metrics
TEXT_MANIFEST_KEYS = ("task", "arch", "width", "layers", "heads", "params", "seed", "steps", "train_seconds",
                      "heldout_texts", "heldout_loss", "heldout_accuracy", "trait_rates")


def write_manifest(root: str | Path) -> Path:
    """(Re)write ``root/manifest.json`` from every ``root/<name>/metrics.json``: one entry per LM, task LMs
    under ``lms`` (free-running accuracy per N), text LMs under ``text_lms`` (held-out loss and accuracy)."""
    root = Path(root)
    entries: dict[str, list[dict]] = {"lms": [], "text_lms": []}
    for metrics_file in sorted(root.glob(f"*/{METRICS_FILE}")):
        metrics = json.loads(metrics_file.read_text())
        weights = metrics_file.parent / "model.safetensors"
        kind, keys = ("text_lms", TEXT_MANIFEST_KEYS) if "heldout_loss" in metrics else ("lms", MANIFEST_KEYS)
        entries[kind].append({"name": metrics_file.parent.name, **{k: metrics[k] for k in keys},
                              "weights_bytes": weights.stat().st_size if weights.exists() else None})
    path = root / "manifest.json"
    out: dict[str, Any] = {"bar": ACCURACY_BAR, "lms": entries["lms"]}
    if entries["text_lms"]:
        out["text_lms"] = entries["text_lms"]
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path
