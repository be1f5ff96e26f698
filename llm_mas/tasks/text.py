"""Task sequences as text for any Hugging Face tokenizer, with positions resolved per tokenizer.

    from llm_mas.tasks import get_task
    from llm_mas.tasks.text import render_texts, resolve_positions, counterfactual_rows
    task = get_task("multiobject")
    batch = task.from_strings(["B D0 D2 T R R E"])
    rendered = render_texts(task, batch)            # "<bos> D0 D2 T R R <eos>", one word per task token
    encoded = resolve_positions(tokenizer, rendered)
    encoded.positions[0, 2]                         # tokenizer index holding task position 2 ("D2")

Every task token becomes one space-separated word (`task_words`: the token's own string, except PAD, BOS
and EOS, which become ``<pad>``, ``<bos>`` and ``<eos>``). A tokenizer may split a word into several
tokens ("17" -> "1", "7"; "<bos>" -> "<", "bos", ">"); the tokenizer position of task position p is the
*last* token of word p by default (where the model has read the whole word, as a task model's latent at p
is its state after reading token p), or the first with ``which="first"``. Positions come from the
tokenizer's character offsets (``return_offsets_mapping``, fast tokenizers), so they are exact for the
tokenizer at hand: two LMs with different tokenizers are aligned at corresponding positions by resolving
the same rendered text with each tokenizer.

`counterfactual_rows` turns a `PairSet` (indywise or stepwise, `llm_mas.tasks.pairs`) into text rows:
base prefix, source text, the intervention word positions and the counterfactual continuation that the
causal model predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_mas.errors import ConfigError, DataError
from llm_mas.tasks.base import PAD, SequenceBatch, Task

SPECIAL_WORDS = {"P": "<pad>", "B": "<bos>", "E": "<eos>"}
POSITION_CHOICES = ("last", "first")


def task_words(task: Task) -> tuple[str, ...]:
    """The word of every task token id (index = id): the token string, or <pad>/<bos>/<eos>."""
    words = tuple(SPECIAL_WORDS.get(t, t) for t in task.vocab.tokens)
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ConfigError(f"{task.name}: token strings {bad} cannot be rendered as single words (empty or with "
                          "whitespace)")
    return words


@dataclass
class RenderedText:
    """Texts of task sequences and the character span of each task position's word.

    texts[r]: words joined by single spaces; spans[r]: (length_r, 2) int64 [start, end) character span of
    the word of task position p (p < length_r, PAD excluded); width: the task batch width L.
    """

    texts: list[str]
    spans: list[np.ndarray]
    width: int

    def __len__(self) -> int:
        return len(self.texts)


def _rows_and_lengths(batch_or_ids) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(batch_or_ids, SequenceBatch):
        ids = batch_or_ids.ids
    else:
        ids = np.asarray(batch_or_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
    if ids.ndim != 2:
        raise DataError(f"task ids must be (n, L), got shape {ids.shape}")
    # right padded: the length is up to the last non-PAD token
    nonpad = ids != PAD
    lengths = np.where(nonpad.any(axis=1), ids.shape[1] - np.argmax(nonpad[:, ::-1], axis=1), 0)
    return ids, lengths.astype(np.int64)


def render_words(task: Task, ids_row, length: int | None = None) -> list[str]:
    """The words of one row's first `length` tokens (default: up to the last non-PAD token)."""
    ids, lengths = _rows_and_lengths(np.asarray(ids_row).reshape(1, -1))
    n = int(lengths[0] if length is None else length)
    words = task_words(task)
    row = ids[0, :n]
    bad = (row < 0) | (row >= len(words))
    if bad.any():
        raise DataError(f"{task.name}: token ids {sorted(set(row[bad].tolist()))} are outside its vocabulary "
                        f"0..{len(words) - 1}")
    return [words[i] for i in row.tolist()]


def render_texts(task: Task, batch_or_ids) -> RenderedText:
    """Every row as text (one word per task token, trailing PAD dropped) with its words' char spans."""
    ids, lengths = _rows_and_lengths(batch_or_ids)
    texts, spans = [], []
    for r in range(len(ids)):
        words = render_words(task, ids[r], int(lengths[r]))
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).astype(np.int64)  # (length_r,)
        ends = starts + np.array([len(w) for w in words], dtype=np.int64)
        texts.append(" ".join(words))
        spans.append(np.stack([starts, ends], axis=1) if words else np.zeros((0, 2), np.int64))
    return RenderedText(texts, spans, ids.shape[1])


@dataclass
class TokenizedText:
    """A tokenizer's view of rendered task texts.

    input_ids / attention_mask: (n, T) int64 as the tokenizer padded them (its padding side);
    positions: (n, L) int64, the tokenizer index of task position p (-1 beyond the row's length);
    word_of_token: (n, T) int64, the task position whose word each token belongs to (-1: padding/special).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    word_of_token: np.ndarray

    def torch_inputs(self, device=None) -> dict:
        """{"input_ids", "attention_mask"} as torch tensors."""
        import torch

        return {"input_ids": torch.as_tensor(self.input_ids, device=device),
                "attention_mask": torch.as_tensor(self.attention_mask, device=device)}


def resolve_positions(tokenizer, rendered: RenderedText, *, which: str = "last",
                      add_special_tokens: bool = False) -> TokenizedText:
    """Tokenize rendered texts and map every task position to a tokenizer position.

    A token belongs to task position p when its character span overlaps p's word (a leading space that a
    byte-level BPE glues to a word does not count). which: "last" (default) or "first" token of the word.
    add_special_tokens: let the tokenizer add its own BOS etc. (they map to no task position).
    Raises ConfigError for a slow tokenizer (no offsets), DataError naming the row when a word gets no token
    or a token spans two words.
    """
    if which not in POSITION_CHOICES:
        raise ConfigError(f"unknown token choice {which!r}; valid choices: {', '.join(POSITION_CHOICES)}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; load the "
                          "fast one (AutoTokenizer.from_pretrained(..., use_fast=True))")
    if tokenizer.pad_token is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    enc = tokenizer(rendered.texts, padding=True, return_offsets_mapping=True, add_special_tokens=add_special_tokens,
                    return_attention_mask=True)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int64)  # (n, T)
    attention = np.asarray(enc["attention_mask"], dtype=np.int64)  # (n, T)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(len(rendered), -1, 2)  # (n, T, 2)
    n, width_tok = input_ids.shape
    positions = np.full((n, rendered.width), -1, dtype=np.int64)
    word_of_token = np.full((n, width_tok), -1, dtype=np.int64)
    for r in range(n):
        spans = rendered.spans[r]  # (length_r, 2)
        if len(spans) == 0:
            continue
        tok_start, tok_end = offsets[r, :, 0], offsets[r, :, 1]  # (T,)
        real = (attention[r] == 1) & (tok_end > tok_start)
        # overlap of token t with word p: max(starts) < min(ends)  -> (T, length_r)
        overlap = (np.maximum(tok_start[:, None], spans[None, :, 0]) < np.minimum(tok_end[:, None], spans[None, :, 1]))
        overlap &= real[:, None]
        per_token = overlap.sum(axis=1)
        if (per_token > 1).any():
            t = int(np.flatnonzero(per_token > 1)[0])
            raise DataError(f"row {r}: token {t} ({rendered.texts[r][tok_start[t]:tok_end[t]]!r}) spans several "
                            f"words of {rendered.texts[r]!r}; this tokenizer merges across spaces")
        has_token = overlap.any(axis=0)
        if not has_token.all():
            p = int(np.flatnonzero(~has_token)[0])
            raise DataError(f"row {r}: task position {p} (word {rendered.texts[r][spans[p, 0]:spans[p, 1]]!r}) got no "
                            f"token from {type(tokenizer).__name__}")
        word_of_token[r] = np.where(per_token == 1, np.argmax(overlap, axis=1), -1)
        pick = overlap[::-1].argmax(axis=0) if which == "last" else overlap.argmax(axis=0)  # (length_r,)
        positions[r, : len(spans)] = (width_tok - 1 - pick) if which == "last" else pick
    return TokenizedText(input_ids, attention, positions, word_of_token)


def counterfactual_rows(target_task: Task, source_task: Task, source_base: SequenceBatch, pairs) -> list[dict]:
    """Text rows of a `PairSet` (indywise or stepwise): what a text counterfactual dataset stores.

    Each row: "base" = the words the intervened model reads up to the intervention (the counterfactual
    sequence's tokens 0..target_pos: the target's own prefix), "source" = the source sequence,
    "base_position" / "source_position" = word indices of the swap (stepwise: every base word
    0..base_position is intervened, source_position == base_position), "continuation" = the words after
    target_pos that the causal model predicts after the swap, "scored" = 1/0 per continuation word (task
    tokens the model must produce), "stepwise", "variable".
    """
    rows = []
    source_words = [render_words(source_task, source_base.ids[i]) for i in pairs.source_index.tolist()]
    scored = pairs.scored_mask()  # (n, L)
    lengths = pairs.lengths
    for r in range(len(pairs)):
        pos = int(pairs.target_pos[r])
        words = render_words(target_task, pairs.ids[r], int(lengths[r]))
        rows.append({
            "base": " ".join(words[: pos + 1]),
            "source": " ".join(source_words[r]),
            "base_position": pos,
            "source_position": int(pairs.source_pos[r]),
            "continuation": " ".join(words[pos + 1:]),
            "scored": scored[r, pos + 1: int(lengths[r])].astype(int).tolist(),
            "stepwise": bool(pairs.stepwise),
            "variable": pairs.variable,
        })
    return rows
