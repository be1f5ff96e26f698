"""Counterfactual datasets in each model's own token space: user JSONL/CSV rows or a built-in task's pairs.

    rows = load_dataset("cf.jsonl")                         # DataError naming the row for a bad one
    encoded = encode_text_rows(rows, tokenizer)            # base + continuation / source, positions resolved
    encoded = encode_task_pairs(task, pairs, source_base, tokenizer)   # a PairSet rendered as text
    encoded = encode_task_pairs(task, pairs, source_base, None)        # the same pairs as task ids

A dataset row (JSONL: one object a line; CSV: a header and one row a line) has

    base             the text the intervened (target) model reads
    source           the text the source model reads
    continuation     what the target must produce after ``base`` once intervened (non-empty)
    base_position    where to intervene in the base (default ``last``)
    source_position  which source latent goes there (default ``last``)

A position marker is ``last`` (the last token of the text), a token index (a JSON integer, or a CSV cell
that is an integer; negative counts from the end; indexes the base's own tokens, not the continuation's),
or a substring: the last token of its first occurrence (``text:`` forces a substring, e.g. ``text:3``).
Markers are resolved per tokenizer, so two models with different tokenizers are intervened at
corresponding places. The target reads ``base`` and ``continuation`` joined by one space (none when either
side already has whitespace there); it is teacher forced on the continuation, whose tokens are all scored.

A built-in task's `PairSet` (``llm_mas.tasks.pairs.make_pairs``, indywise or stepwise) is rendered with
`llm_mas.tasks.text.render_texts` (one word per task token) and resolved per tokenizer (the last token of
each word); for a task model (``tokenizer=None``) its token space is the task ids. Every intervened task
position p of the base takes the source latent at the source's task position p (stepwise) or
``source_pos`` (indywise).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm_mas.errors import ConfigError, DataError
from llm_mas.files import jsonl_rows
from llm_mas.tasks.base import PAD, SequenceBatch, Task
from llm_mas.tasks.text import SPECIAL_WORDS, render_texts, resolve_positions

FIELDS = ("base", "source", "continuation", "base_position", "source_position")
REQUIRED = ("base", "source", "continuation")
DATASET_SUFFIXES = (".jsonl", ".csv")
TEXT_PREFIX = "text:"
IGNORE_INDEX = -100   # label of unscored positions (the value llm_mas.llm.record and torch cross-entropy use)


@dataclass
class TextRow:
    """One counterfactual row of a user dataset (``row``: its 1-based data row number in the file)."""

    row: int
    base: str
    source: str
    continuation: str
    base_position: int | str = "last"
    source_position: int | str = "last"


@dataclass
class EncodedPairs:
    """Counterfactual pairs in one model's token space (numpy; n pairs, P intervened slots at most).

    target_ids / target_mask (n, T): what the target reads (base + continuation), right padded, 1 = real;
    labels (n, T): the next token where it is scored, IGNORE_INDEX elsewhere;
    target_pos (n, P): the target positions intervened (-1: no slot), ascending per row;
    source_ids / source_mask (n, S): the source texts; source_pos (n, P): the source position whose latent
    goes into slot j (-1 where target_pos is -1).
    """

    target_ids: np.ndarray
    target_mask: np.ndarray
    labels: np.ndarray
    target_pos: np.ndarray
    source_ids: np.ndarray
    source_mask: np.ndarray
    source_pos: np.ndarray
    # (row, field, word) of every token this tokenizer read as its unknown token: row = the file's row number
    # (dataset) or the pair index (task pairs); field = base | continuation | source (dataset) or target |
    # source (task pairs); word = the text the token covers
    unknown: list[tuple[int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.target_ids)


# ------------------------------------------------------------------------------------------- loading
def _marker(value: Any, where: str, csv_cell: bool) -> int | str:
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: position marker {value!r} must be 'last', a token index or a substring")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: position marker {value!r} must be 'last', a token index or a non-empty substring")
    if csv_cell:
        try:
            return int(value.strip())
        except ValueError:
            pass
    if value.startswith(TEXT_PREFIX):
        if not value[len(TEXT_PREFIX):]:
            raise DataError(f"{where}: position marker {value!r} names an empty substring")
        return value
    return value


def _check_marker_text(marker: int | str, text: str, where: str) -> None:
    if isinstance(marker, str) and marker != "last":
        needle = marker[len(TEXT_PREFIX):] if marker.startswith(TEXT_PREFIX) else marker
        if needle not in text:
            raise DataError(f"{where}: marker {marker!r} does not occur in {text!r}")


def _row(values: dict, number: int, path: Path, csv_cell: bool) -> TextRow:
    where = f"{path}: row {number}"
    if not isinstance(values, dict):
        raise DataError(f"{where}: expected an object with keys {', '.join(FIELDS)}, got {values!r}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if k not in values or values[k] is None]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)} (every row needs {', '.join(REQUIRED)})")
    for k in REQUIRED:
        if not isinstance(values[k], str):
            raise DataError(f"{where}: {k} must be text, got {values[k]!r}")
    if not values["continuation"].strip():
        raise DataError(f"{where}: empty continuation {values['continuation']!r}: give the tokens the target "
                        "must produce after the base")
    for k in ("base", "source"):
        if not values[k].strip():
            raise DataError(f"{where}: empty {k} {values[k]!r}")
    markers = {}
    for k in ("base_position", "source_position"):
        raw = values.get(k)
        markers[k] = "last" if raw is None or raw == "" else _marker(raw, f"{where}: {k}", csv_cell)
    _check_marker_text(markers["base_position"], values["base"], f"{where}: base_position")
    _check_marker_text(markers["source_position"], values["source"], f"{where}: source_position")
    return TextRow(number, values["base"], values["source"], values["continuation"], **markers)


def load_dataset(path: str | Path) -> list[TextRow]:
    """The rows of a JSONL or CSV counterfactual dataset (module docstring); DataError naming a bad row."""
    path = Path(path)
    if path.suffix.lower() not in DATASET_SUFFIXES:
        raise ConfigError(f"dataset {str(path)!r} must be a {' or '.join(DATASET_SUFFIXES)} file")
    if not path.is_file():
        raise ConfigError(f"dataset {str(path)!r} does not exist")
    rows = []
    if path.suffix.lower() == ".jsonl":
        for number, values in jsonl_rows(path):
            rows.append(_row(values, number, path, csv_cell=False))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty CSV file (expected a header with {', '.join(REQUIRED)})")
            for number, values in enumerate(reader, start=1):
                if None in values:
                    raise DataError(f"{path}: row {number}: more cells than header columns: {values[None]!r}")
                rows.append(_row(dict(values), number, path, csv_cell=True))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def split_rows(rows: list[TextRow], n_train: int, n_valid: int, seed: int) -> dict[str, list[TextRow]]:
    """Shuffle (seeded) and split: valid = the first min(n_valid, len // 5, >= 1) rows, train = up to n_train
    of the rest."""
    if len(rows) < 2:
        raise DataError(f"a dataset needs at least 2 rows (train and valid), got {len(rows)}")
    order = np.random.default_rng([seed, 741]).permutation(len(rows))
    n_val = max(1, min(n_valid, len(rows) // 5))
    return {"valid": [rows[i] for i in order[:n_val]], "train": [rows[i] for i in order[n_val:n_val + n_train]]}


# ------------------------------------------------------------------------------------------- encoding
def _pad(rows: list[list[int]], value: int) -> np.ndarray:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _tokens(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; load the "
                          "fast one (AutoTokenizer.from_pretrained(..., use_fast=True))")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def _resolve_marker(marker: int | str, text: str, offsets: np.ndarray, n_tokens: int, where: str) -> int:
    """Token index of a marker among the first `n_tokens` tokens of `text` (offsets: (T, 2) char spans)."""
    if n_tokens == 0:
        raise DataError(f"{where}: the text {text!r} has no tokens")
    if isinstance(marker, int):
        if not -n_tokens <= marker < n_tokens:
            raise DataError(f"{where}: token index {marker} is outside the {n_tokens} tokens of {text!r}")
        return marker % n_tokens
    if marker == "last":
        return n_tokens - 1
    needle = marker[len(TEXT_PREFIX):] if marker.startswith(TEXT_PREFIX) else marker
    start = text.find(needle)
    if start < 0:
        raise DataError(f"{where}: marker {marker!r} does not occur in {text!r}")
    end = start + len(needle)
    ends = offsets[:n_tokens, 1]
    starts = offsets[:n_tokens, 0]
    overlapping = np.flatnonzero((starts < end) & (ends > start) & (ends > starts))
    if len(overlapping) == 0:
        raise DataError(f"{where}: marker {marker!r} covers no token of {text!r}")
    return int(overlapping[-1])


def unknown_token_id(tokenizer) -> int | None:
    """The id of ``tokenizer``'s unknown token, or None when it has none (e.g. a byte-level BPE)."""
    if getattr(tokenizer, "unk_token", None) is None:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if unk is None else int(unk)


def _unknown_spans(ids, offsets: np.ndarray, unk: int | None) -> list[tuple[int, int]]:
    """Character spans (start, end) of the tokens that are the unknown token."""
    if unk is None:
        return []
    return [(int(offsets[j, 0]), int(offsets[j, 1])) for j in np.flatnonzero(np.asarray(ids) == unk)]


def encode_text_rows(rows: list[TextRow], tokenizer) -> EncodedPairs:
    """User rows in this tokenizer's space (module docstring); DataError naming the row for a marker that
    does not resolve or a continuation without tokens. Words read as the unknown token are listed in
    ``EncodedPairs.unknown`` (the caller refuses them: `unknown_token_report`)."""
    target_ids, labels, target_pos, source_ids, source_pos = [], [], [], [], []
    unk = unknown_token_id(tokenizer)
    unknown: list[tuple[int, str, str]] = []
    for row in rows:
        where = f"row {row.row}"
        glue = "" if row.base[-1:].isspace() or row.continuation[:1].isspace() else " "
        text = row.base + glue + row.continuation
        ids, offsets = _tokens(tokenizer, text)
        cont_start = len(row.base) + len(glue)
        real = offsets[:, 1] > offsets[:, 0]
        scored = real & (offsets[:, 1] > cont_start)
        if not scored.any():
            raise DataError(f"{where}: the continuation {row.continuation!r} has no tokens")
        first = int(np.argmax(scored))
        if offsets[first, 0] < len(row.base.rstrip()):
            raise DataError(f"{where}: token {first} spans the end of the base and the continuation "
                            f"{row.continuation!r}; this tokenizer merges them")
        if first == 0:
            raise DataError(f"{where}: the base {row.base!r} has no tokens")
        label = [IGNORE_INDEX] * len(ids)
        for j in np.flatnonzero(scored).tolist():
            label[j - 1] = ids[j]
        t = _resolve_marker(row.base_position, text, offsets, first, f"{where}: base_position")
        s_ids, s_offsets = _tokens(tokenizer, row.source)
        s = _resolve_marker(row.source_position, row.source, s_offsets, len(s_ids), f"{where}: source_position")
        for start, end in _unknown_spans(ids, offsets, unk):
            unknown.append((row.row, "continuation" if start >= cont_start else "base", text[start:end]))
        unknown += [(row.row, "source", row.source[a:b]) for a, b in _unknown_spans(s_ids, s_offsets, unk)]
        target_ids.append(ids)
        labels.append(label)
        target_pos.append([t])
        source_ids.append(s_ids)
        source_pos.append([s])
    encoded = _assemble(target_ids, labels, target_pos, source_ids, source_pos)
    encoded.unknown = unknown
    return encoded


def _assemble(target_ids, labels, target_pos, source_ids, source_pos) -> EncodedPairs:
    t_ids = _pad(target_ids, PAD)
    s_ids = _pad(source_ids, PAD)
    return EncodedPairs(t_ids, _pad([[1] * len(r) for r in target_ids], 0), _pad(labels, IGNORE_INDEX),
                        _pad(target_pos, -1), s_ids, _pad([[1] * len(r) for r in source_ids], 0),
                        _pad(source_pos, -1))


def _slots(pairs) -> tuple[list[list[int]], list[list[int]]]:
    """Task positions intervened per pair: (target positions, source positions)."""
    if pairs.stepwise:
        steps = [list(range(int(p) + 1)) for p in pairs.target_pos]
        return steps, steps
    return [[int(p)] for p in pairs.target_pos], [[int(p)] for p in pairs.source_pos]


def _right_aligned(tok) -> tuple[np.ndarray, np.ndarray]:
    """Shift left-padded rows of a `TokenizedText` to the left: (row offset (n,), real lengths (n,))."""
    lengths = tok.attention_mask.sum(1)
    first = np.argmax(tok.attention_mask == 1, axis=1)
    return first, lengths


def encode_task_pairs(task: Task, pairs, source_base: SequenceBatch, tokenizer=None) -> EncodedPairs:
    """A built-in task's pairs in a model's token space: the rendered text through ``tokenizer`` (an HF
    model), or the task ids (``tokenizer=None``, a task model)."""
    t_slots, s_slots = _slots(pairs)
    scored = pairs.scored_mask()                                     # (n, L)
    lengths = pairs.lengths
    source_rows = source_base.ids[pairs.source_index]                # (n, L_s)
    if tokenizer is None:
        target_ids = [pairs.ids[r, :lengths[r]].tolist() for r in range(len(pairs))]
        labels = []
        for r, ids in enumerate(target_ids):
            label = [IGNORE_INDEX] * len(ids)
            for j in np.flatnonzero(scored[r, :len(ids)]).tolist():
                label[j - 1] = ids[j]
            labels.append(label)
        s_len = (source_rows != PAD).sum(1)
        source_ids = [source_rows[r, :s_len[r]].tolist() for r in range(len(pairs))]
        return _assemble(target_ids, labels, t_slots, source_ids, s_slots)
    target_text, source_text = render_texts(task, pairs.ids), render_texts(task, source_rows)
    target_tok = resolve_positions(tokenizer, target_text)
    source_tok = resolve_positions(tokenizer, source_text)
    t_first, t_len = _right_aligned(target_tok)
    s_first, s_len = _right_aligned(source_tok)
    target_ids, labels, target_pos, source_ids, source_pos = [], [], [], [], []
    for r in range(len(pairs)):
        lo, n = int(t_first[r]), int(t_len[r])
        ids = target_tok.input_ids[r, lo:lo + n].tolist()
        words = target_tok.word_of_token[r, lo:lo + n]              # (n,) task position of each token
        label = [IGNORE_INDEX] * n
        for j in range(1, n):
            if words[j] >= 0 and scored[r, words[j]]:
                label[j - 1] = ids[j]
        target_ids.append(ids)
        labels.append(label)
        target_pos.append([int(target_tok.positions[r, p]) - lo for p in t_slots[r]])
        s_lo, s_n = int(s_first[r]), int(s_len[r])
        source_ids.append(source_tok.input_ids[r, s_lo:s_lo + s_n].tolist())
        source_pos.append([int(source_tok.positions[r, p]) - s_lo for p in s_slots[r]])
    for r, (tp, sp) in enumerate(zip(target_pos, source_pos)):
        if min(tp + sp) < 0:
            raise DataError(f"pair {r}: an intervened task position has no token in this tokenizer")
    encoded = _assemble(target_ids, labels, target_pos, source_ids, source_pos)
    unk = unknown_token_id(tokenizer)
    if unk is not None:
        for name, text, tok in (("target", target_text, target_tok), ("source", source_text, source_tok)):
            for r, j in zip(*np.nonzero((tok.input_ids == unk) & (tok.attention_mask == 1))):
                p = int(tok.word_of_token[r, j])
                word = text.texts[r][text.spans[r][p, 0]:text.spans[r][p, 1]] if p >= 0 else tokenizer.unk_token
                encoded.unknown.append((int(r), name, word))
    return encoded


# ------------------------------------------------------------------------------------------- unknown tokens
def _row_ranges(rows: list[int]) -> str:
    """Sorted distinct row numbers as ranges: [1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    rows = sorted(set(rows))
    parts, start = [], rows[0]
    for prev, cur in zip(rows, rows[1:] + [None]):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def unknown_token_report(unknown: list[tuple[int, str, str]], tokenizer, model: str, where: str,
                         rows_name: str = "rows") -> list[str]:
    """One line per word ``tokenizer`` reads as its unknown token, naming the model, the word, and the
    fields and rows it occurs in (all of them, as ranges); a hint where the word is a task's special
    token written the task's way (``B`` for ``<bos>``)."""
    by_word: dict[str, dict[str, list[int]]] = {}
    for row, field_name, word in unknown:
        by_word.setdefault(word, {}).setdefault(field_name, []).append(row)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    lines = []
    for word, fields in by_word.items():
        places = "; ".join(f"{name} of {rows_name} {_row_ranges(rows)}" for name, rows in fields.items())
        hint = f" (did you mean {SPECIAL_WORDS[word]!r}?)" if SPECIAL_WORDS.get(word) in vocab else ""
        lines.append(f"{where}: {model} reads the word {word!r}{hint} as its unknown token "
                     f"{tokenizer.unk_token!r}, in {places}")
    return lines
