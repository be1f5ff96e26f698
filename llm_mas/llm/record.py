"""Recorded generations for stepwise LLM MAS (docs/method.md): prompts, greedy continuations, predictions.

    rec = record_generations(model, tokenizer, texts, prompt_len=32, total_len=64, n=1000, cache_dir="cache/")
    rec.ids        # (n, total_len) long: the first prompt_len tokens of a text, then the model's greedy continuation
    rec.predicted  # (n, total_len) long: the model's argmax next-token prediction at every position (teacher forced)
    rec = load_recording("cache/recording-...", model, tokenizer)   # refuses a stale cache (DataError)
    pairs = stepwise_pairs(source_rec, target_rec, n_pairs=10_000, seed=0)    # stepwise MAS pairs

Only texts with at least ``prompt_len`` tokens are used, so a prompt never holds padding. On disk a recording
is a directory with ``recording.safetensors`` (ids, predicted) and ``recording.json`` (metadata: model,
weight and tokenizer fingerprints, lengths, seed, texts). Reloading against a model checks the fingerprint
and that the model still reproduces its recorded predictions (>= 99.5 % on a sample of rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..tasks.counterfactual_data import unknown_token_id
from .loading import model_source

TENSORS_FILE = "recording.safetensors"
META_FILE = "recording.json"
FORMAT = "llm_mas.recording"
FORMAT_VERSION = 1
ACCURACY_BAR = 0.995  # fraction of recorded predictions a reloaded model must reproduce
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: Any, samples_per_tensor: int = 256) -> str:
    """A short hash of the config and of evenly spaced samples of every parameter tensor.

    Samples are rounded to bfloat16 before hashing, so a float32 and a bfloat16 load of the same checkpoint
    agree, while any fine-tune (full or LoRA, merged or not) changes the hash.
    """
    import torch

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items()
               if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version", "use_cache")}
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(f"{name}:{tuple(param.shape)}".encode())
            if flat.numel() == 0:
                continue
            index = torch.linspace(0, flat.numel() - 1, min(samples_per_tensor, flat.numel()),
                                   device=flat.device).long()
            sample = flat[index].float().to(torch.bfloat16).float().cpu()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and the special tokens (ids must mean the same tokens)."""
    digest = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _texts_hash(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _model_id(model: Any) -> str:
    source = model_source(model)
    if isinstance(source, dict) and source.get("model"):
        return str(source["model"])
    return str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
               or type(model).__name__)


def _device(model: Any):
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------- Recording
@dataclass
class Recording:
    """Token ids and predictions of one model on n prompts.

    ids:        (n, total_len) long, prompt (first prompt_len tokens of a text) + greedy continuation.
    predicted:  (n, total_len) long, teacher-forced argmax next-token prediction at every position.
    meta:       model, fingerprint, tokenizer_fingerprint, prompt_len, total_len, seed, texts, ...
    """

    ids: Any
    predicted: Any
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape != self.predicted.shape:
            raise DataError(f"recording ids {tuple(self.ids.shape)} and predicted {tuple(self.predicted.shape)} "
                            "must both be (n, total_len)")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.meta["prompt_len"])

    @property
    def total_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def texts(self) -> list[str]:
        return list(self.meta.get("texts", []))

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model", ""))

    def subset(self, rows) -> Recording:
        """The recording restricted to ``rows`` (a sequence or LongTensor of row indices)."""
        import torch

        rows = torch.as_tensor(rows, dtype=torch.long)
        meta = dict(self.meta)
        if "texts" in meta:
            meta["texts"] = [self.meta["texts"][int(i)] for i in rows]
        meta["n"] = int(rows.numel())
        return Recording(self.ids[rows], self.predicted[rows], meta, None)

    def split(self, valid_fraction: float = 0.2, seed: int = 741) -> tuple[Recording, Recording]:
        """(train, valid) disjoint random rows (80/20 with seed 741, as in the paper's code)."""
        import torch

        if not 0.0 < valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction {valid_fraction} must lie strictly between 0 and 1")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_valid = max(1, round(valid_fraction * len(self)))
        return self.subset(order[n_valid:].sort().values), self.subset(order[:n_valid].sort().values)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``recording.safetensors`` + ``recording.json`` into ``directory`` (atomically); returns it."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"ids": self.ids.contiguous().cpu(), "predicted": self.predicted.contiguous().cpu()},
                  str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        (tmp / META_FILE).write_text(json.dumps(self.meta, indent=1, ensure_ascii=False))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        self.path = out
        return out


# ---------------------------------------------------------------------------------------------- recording
def select_prompts(tokenizer: Any, texts: Sequence[str], *, prompt_len: int, n: int, seed: int,
                   chunk: int = 256) -> tuple[Any, list[str]]:
    """(prompts (m, prompt_len) long, their texts): texts in a seeded random order, keeping those with at least
    ``prompt_len`` tokens, until ``n`` are found (m <= n)."""
    import torch

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    prompts: list[list[int]] = []
    used: list[str] = []
    for start in range(0, len(order), chunk):
        batch = [texts[i] for i in order[start:start + chunk]]
        encoded = tokenizer(batch, truncation=True, max_length=prompt_len)["input_ids"]
        for text, ids in zip(batch, encoded, strict=True):
            if len(ids) >= prompt_len:
                prompts.append(list(ids[:prompt_len]))
                used.append(text)
                if len(prompts) == n:
                    return torch.tensor(prompts, dtype=torch.long), used
    return torch.tensor(prompts, dtype=torch.long).view(-1, prompt_len), used


def unknown_prompt_words(tokenizer: Any, texts: Sequence[str], prompts: Any, all_texts: Sequence[str],
                         model: str) -> list[str]:
    """One line per word that ``tokenizer`` reads as its unknown token in the selected ``prompts``
    ((m, prompt_len) ids of ``texts``), naming the model, the word and the texts (numbered 1.. in
    ``all_texts``, the list given to `record_generations`); [] when the tokenizer has no unknown token."""
    from ..tasks.counterfactual_data import unknown_token_report

    unk = unknown_token_id(tokenizer)
    if unk is None or len(texts) == 0:
        return []
    number = {text: i + 1 for i, text in reversed(list(enumerate(all_texts)))}
    unknown = []
    for text, ids in zip(texts, prompts.tolist(), strict=True):
        if unk not in ids:
            continue
        words = [tokenizer.unk_token] * ids.count(unk)
        if getattr(tokenizer, "is_fast", False):  # the word each unknown token covers
            enc = tokenizer(text, truncation=True, max_length=len(ids), return_offsets_mapping=True)
            words = [text[a:b] or tokenizer.unk_token
                     for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if i == unk]
        unknown += [(number[text], "prompt", word) for word in words]
    return unknown_token_report(unknown, tokenizer, model, "texts", rows_name="texts")


def greedy_continue(model: Any, prompts: Any, total_len: int) -> Any:
    """(B, prompt_len) -> (B, total_len): greedy decoding with the KV cache; never stops early at EOS."""
    import torch

    device = _device(model)
    ids = prompts.to(device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        pieces = [ids]
        for step in range(total_len - ids.shape[1]):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            pieces.append(next_token)
            if step == total_len - ids.shape[1] - 1:
                break
            out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(pieces, dim=1).cpu()  # (B, total_len)


def teacher_forced_predictions(model: Any, ids: Any, batch_size: int = 16) -> Any:
    """(n, L) -> (n, L): the model's argmax next-token prediction at every position of ``ids``."""
    import torch

    device = _device(model)
    out = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits  # (b, L, V)
            out.append(logits.argmax(-1).cpu())
    return torch.cat(out) if out else ids.new_zeros(ids.shape)


def _cache_key(fingerprint: str, tok_fp: str, texts: Sequence[str], **settings: Any) -> str:
    payload = json.dumps({"fingerprint": fingerprint, "tokenizer": tok_fp, "texts": _texts_hash(texts),
                          "format": FORMAT_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def record_generations(model: Any, tokenizer: Any, texts: Sequence[str], *, prompt_len: int = 32,
                       total_len: int = 64, n: int = 1000, batch_size: int = 16, seed: int = 0,
                       cache_dir: str | os.PathLike | None = None, model_id: str | None = None,
                       progress: bool | None = None, allow_unknown_tokens: bool = False) -> Recording:
    """Record ``n`` greedy generations of ``model`` and its teacher-forced predictions.

    Texts (in a seeded random order) with at least ``prompt_len`` tokens seed the prompts (their first
    ``prompt_len`` tokens, no padding); the model continues each greedily to ``total_len`` tokens; the full
    sequences are re-run teacher-forced to record the argmax prediction at every position.
    If fewer than ``n`` texts are long enough, all of them are used (with a warning).
    cache_dir: reuse a matching recording there (verified against the model) or save the new one there.
    progress:  tqdm bar (None: only on a terminal).
    allow_unknown_tokens: record prompts in which the tokenizer reads a word as its unknown token (with a
               warning naming them; ``meta["unknown_tokens"]`` counts them). Default: refuse them (DataError
               naming the texts and words) before anything is generated.
    """
    import torch
    from tqdm.auto import tqdm

    problems = []
    if prompt_len < 1:
        problems.append(f"prompt_len {prompt_len} must be >= 1")
    if total_len <= prompt_len:
        problems.append(f"total_len {total_len} must exceed prompt_len {prompt_len}")
    if n < 1 or batch_size < 1:
        problems.append(f"n {n} and batch_size {batch_size} must be >= 1")
    if problems:
        raise ConfigError(problems)
    texts = list(texts)
    prompts, used = select_prompts(tokenizer, texts, prompt_len=prompt_len, n=n, seed=seed)
    if len(used) == 0:
        raise DataError(f"none of the {len(texts)} texts has {prompt_len} tokens or more; pass longer texts or a "
                        "smaller prompt_len")
    unknown = unknown_prompt_words(tokenizer, used, prompts, texts, model_id or _model_id(model))
    if unknown and not allow_unknown_tokens:
        raise DataError(f"{len(unknown)} word(s) the model reads as its unknown token (it would not read the text "
                        "written):\n" + "\n".join(f"  - {line}" for line in unknown) + "\nwrite the texts in words "
                        "its tokenizer knows, or allow them (allow_unknown_tokens=True, `llm-mas record "
                        "--allow-unknown-tokens`)")
    if unknown:
        warnings.warn("recording prompts with unknown tokens:\n" + "\n".join(f"  - {line}" for line in unknown),
                      stacklevel=2)
    fingerprint = model_fingerprint(model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    path = None
    if cache_dir is not None:
        key = _cache_key(fingerprint, tok_fp, texts, prompt_len=prompt_len, total_len=total_len, n=n, seed=seed)
        path = Path(cache_dir) / f"recording-{key}"
        if (path / TENSORS_FILE).exists():
            return load_recording(path, model, tokenizer)

    if len(used) < n:
        warnings.warn(f"only {len(used)} of {len(texts)} texts have >= {prompt_len} tokens; recording {len(used)} "
                      f"sequences instead of {n}", stacklevel=2)
    was_training = model.training
    model.eval()
    ids_parts, predicted_parts = [], []
    started = time.time()
    try:
        disable = None if progress is None else not progress  # None: tqdm shows the bar only on a terminal
        with tqdm(total=len(used), desc="recording generations", unit="seq", disable=disable) as bar:
            for start in range(0, len(used), batch_size):
                batch_ids = greedy_continue(model, prompts[start:start + batch_size], total_len)  # (b, L)
                ids_parts.append(batch_ids)
                predicted_parts.append(teacher_forced_predictions(model, batch_ids, batch_size))  # (b, L)
                bar.update(batch_ids.shape[0])
    finally:
        model.train(was_training)
    ids = torch.cat(ids_parts)
    predicted = torch.cat(predicted_parts)
    # How often the teacher-forced argmax equals the greedily generated next token (1.0 up to numerics).
    agreement = float((predicted[:, prompt_len - 1:-1] == ids[:, prompt_len:]).float().mean())
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model": model_id or _model_id(model),
        "source": model_source(model),
        "fingerprint": fingerprint, "tokenizer_fingerprint": tok_fp,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "prompt_len": prompt_len, "total_len": total_len, "n": len(used), "n_requested": n, "seed": seed,
        "batch_size": batch_size, "greedy_agreement": agreement, "seconds": round(time.time() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "texts": used,
    }
    unk = unknown_token_id(tokenizer)
    if unk is not None:
        meta["unknown_tokens"] = int((prompts == unk).sum())
    recording = Recording(ids, predicted, meta)
    if path is not None:
        recording.save(path)
    return recording


# ---------------------------------------------------------------------------------------------- reloading
def _files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    p = Path(path)
    directory = p.parent if p.name in (TENSORS_FILE, META_FILE) else p
    return directory, directory / TENSORS_FILE, directory / META_FILE


def _stale(tensors_file: Path, meta: dict, reason: str, model: Any = None) -> DataError:
    """The stale-recording error with the exact command that records it again for the given model (its
    recorded settings filled in; the prompt texts are listed under "texts" in recording.json)."""
    directory = tensors_file.parent
    name = _model_id(model) if model is not None else meta.get("model", "MODEL")
    options = "".join(f" --{flag} {meta[key]}" for flag, key in (
        ("n", "n_requested"), ("prompt-len", "prompt_len"), ("total-len", "total_len"), ("seed", "seed"),
        ("dtype", "dtype")) if meta.get(key) is not None)
    return DataError(
        f"recording {tensors_file} is stale: {reason}. Rebuild it with: llm-mas record --model {name} --texts "
        f"TEXTS --out {directory}{options}  (TEXTS: the prompt file it was made from; recording.json lists the "
        "texts used under \"texts\"), or delete the directory so a recipe's cache rebuilds it.")


def verify_recording(recording: Recording, model: Any, tokenizer: Any = None, *, rows: int = 16, seed: int = 0,
                     batch_size: int = 16) -> float:
    """Check that ``model`` matches the recording; return the reproduction accuracy on a sample of rows.

    Raises DataError on a fingerprint mismatch (weights or tokenizer) or an accuracy below 99.5 %.
    """
    import torch

    _, tensors_file, _ = _files(recording.path or Path("<memory>"))
    meta = recording.meta
    fingerprint = model_fingerprint(model)
    if meta.get("fingerprint") and meta["fingerprint"] != fingerprint:
        raise _stale(tensors_file, meta, f"it was recorded with model {meta.get('model')!r} (weights fingerprint "
                     f"{meta['fingerprint']}, dtype {meta.get('dtype')}) but the given model's fingerprint is "
                     f"{fingerprint}", model)
    if tokenizer is not None and meta.get("tokenizer_fingerprint") and \
            meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise _stale(tensors_file, meta, "the given tokenizer differs from the one it was recorded with", model)
    sample = torch.randperm(len(recording), generator=torch.Generator().manual_seed(seed))[:rows]
    predicted = teacher_forced_predictions(model, recording.ids[sample], batch_size)
    accuracy = float((predicted == recording.predicted[sample]).float().mean())
    if accuracy < ACCURACY_BAR:
        raise _stale(tensors_file, meta, f"the model reproduces only {accuracy:.2%} of its recorded predictions on "
                     f"{sample.numel()} rows (needs >= {ACCURACY_BAR:.1%})", model)
    return accuracy


def load_recording(path: str | os.PathLike, model: Any = None, tokenizer: Any = None, *,
                   check_rows: int = 16) -> Recording:
    """Load a recording directory (or one of its two files).

    With ``model``: refuse a stale recording (DataError naming the file and how to re-record) when the weights
    fingerprint differs or the model reproduces < 99.5 % of the recorded predictions on ``check_rows`` rows.
    With ``tokenizer``: also refuse a different vocabulary.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory, tensors_file, meta_file = _files(path)
    for f in (tensors_file, meta_file):
        if not f.exists():
            raise DataError(f"recording file {f} does not exist; record one with `llm-mas record --model MODEL "
                            f"--texts TEXTS --out {directory}`")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"recording metadata {meta_file} is not valid JSON ({e}); re-record it") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{meta_file} is not an llm_mas recording of format version {FORMAT_VERSION} "
                        f"(format {meta.get('format')!r}, version {meta.get('version')!r}); re-record it")
    try:
        tensors = load_file(str(tensors_file))
    except (SafetensorError, OSError) as e:
        raise DataError(f"cannot read {tensors_file} ({e}); re-record it") from None
    if set(tensors) != {"ids", "predicted"}:
        raise DataError(f"{tensors_file} holds {sorted(tensors)}, expected ids and predicted; re-record it")
    recording = Recording(tensors["ids"].long(), tensors["predicted"].long(), meta, directory)
    if recording.total_len != meta.get("total_len") or len(recording) != meta.get("n"):
        raise DataError(f"{tensors_file} holds {tuple(recording.ids.shape)} but {meta_file} says n={meta.get('n')}, "
                        f"total_len={meta.get('total_len')}; re-record it")
    if model is not None:
        verify_recording(recording, model, tokenizer, rows=check_rows)
    return recording


# ---------------------------------------------------------------------------------------------- pairs
@dataclass
class StepwisePairs:
    """Stepwise LLM MAS pairs (docs/method.md), P pairs of length L.

    source_ids: (P, L) the source recording's sequence (the source model runs on it).
    target_ids: (P, L) the target recording's sequence up to index i, the source's tokens after i.
    mask:       (P, L) bool, positions 0..i (intervened in both models, same indices).
    labels:     (P, L) long, the source model's greedy predictions at positions >= i, IGNORE_INDEX before.
    index:      (P,) the step i ~ U[min_prefix, L - min_suffix).
    source_rows, target_rows: (P,) rows of the two recordings.
    """

    source_ids: Any
    target_ids: Any
    mask: Any
    labels: Any
    index: Any
    source_rows: Any
    target_rows: Any

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def batch(self, rows) -> StepwisePairs:
        import torch

        rows = torch.as_tensor(rows, dtype=torch.long)
        return StepwisePairs(*(getattr(self, f)[rows] for f in (
            "source_ids", "target_ids", "mask", "labels", "index", "source_rows", "target_rows")))


def stepwise_pairs(source: Recording, target: Recording, n_pairs: int, *, seed: int = 0, min_prefix: int = 10,
                   min_suffix: int = 10) -> StepwisePairs:
    """Draw ``n_pairs`` (source row, target row, i) with replacement, independently, and build the inputs.

    The counterfactual: the target model, given the source's aligned subspace on positions 0..i and the
    source's tokens after i, should emit the source model's greedy predictions from i on.
    """
    import torch

    if source.total_len != target.total_len:
        raise DataError(f"source recording has total_len {source.total_len} but target has {target.total_len}; "
                        "record both with the same --total-len")
    src_tok, tgt_tok = source.meta.get("tokenizer_fingerprint"), target.meta.get("tokenizer_fingerprint")
    if src_tok and tgt_tok and src_tok != tgt_tok:
        raise DataError("source and target recordings use different tokenizers; stepwise pairs need one vocabulary")
    length = source.total_len
    if not 0 <= min_prefix < length - min_suffix:
        raise ConfigError(f"min_prefix {min_prefix} and min_suffix {min_suffix} leave no index in a length-{length} "
                          "sequence")
    generator = torch.Generator().manual_seed(seed)
    source_rows = torch.randint(len(source), (n_pairs,), generator=generator)
    target_rows = torch.randint(len(target), (n_pairs,), generator=generator)
    index = torch.randint(min_prefix, length - min_suffix, (n_pairs,), generator=generator)  # (P,)
    positions = torch.arange(length)  # (L,)
    mask = positions[None, :] <= index[:, None]  # (P, L)
    source_ids = source.ids[source_rows]  # (P, L)
    target_ids = torch.where(mask, target.ids[target_rows], source_ids)  # (P, L)
    labels = torch.where(positions[None, :] >= index[:, None], source.predicted[source_rows],
                         torch.full_like(source_ids, IGNORE_INDEX))  # (P, L)
    return StepwisePairs(source_ids, target_ids, mask, labels, index, source_rows, target_rows)
