"""A tiny Qwen2-architecture causal LM and its tokenizer, built offline from a seed.

Tests, demos and benchmarks use it in place of a hub model (no download ever happens)::

    from llm_mas.llm.tiny import build_tiny_qwen2
    path = build_tiny_qwen2("/tmp/tiny-qwen2", seed=0)       # config.json, model.safetensors, tokenizer.json ...
    model, tokenizer = llm_mas.llm.load_causal_lm(path)

The tokenizer is a byte-level BPE trained on a small built-in corpus with Qwen2's own pre-tokenizer
(``AutoTokenizer`` loads a ``Qwen2Tokenizer`` for ``model_type=qwen2``, which replaces the pre-tokenizer by
Qwen2's regex split; training with that same split keeps the ids identical). Everything is deterministic:
the same seed gives the same weights and the same tokenizer files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# Qwen2's pre-tokenizer regex (what Qwen2Tokenizer installs on load).
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_SUBJECTS = ["the cat", "a small dog", "my neighbour", "the old teacher", "a young girl", "the farmer",
             "our captain", "the baker", "a tired student", "the doctor", "her brother", "the robot"]
_VERBS = ["sees", "finds", "likes", "carries", "paints", "visits", "builds", "follows", "counts", "forgets",
          "cleans", "opens"]
_OBJECTS = ["a red ball", "the green door", "three apples", "an empty box", "the long river", "a quiet house",
            "two blue birds", "the broken clock", "a warm coat", "seven stones", "the tall tree", "a letter"]
_PLACES = ["in the garden", "near the station", "at the market", "by the sea", "on the hill", "in the kitchen",
           "under the bridge", "at school"]
_TIMES = ["every morning", "after lunch", "at night", "on sunday", "before dinner", "in winter", "today",
          "once a week"]
_LINKS = ["Then", "Later", "After that", "Meanwhile", "So", "But", "And then", "Soon"]


def tiny_corpus(n_texts: int = 200, *, seed: int = 0, sentences_per_text: tuple[int, int] = (4, 7)) -> list[str]:
    """``n_texts`` short English paragraphs made from templates (deterministic for a seed).

    Each paragraph has 4-6 sentences, i.e. well over 32 tokens with the tiny BPE tokenizer, so the texts can
    seed recorded generations (``llm_mas.llm.record``).
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(n_texts):
        sentences = []
        for j in range(rng.randrange(*sentences_per_text)):
            sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                        f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}")
            if j > 0 and rng.random() < 0.5:
                sentence = f"{rng.choice(_LINKS)} {sentence}"
            if rng.random() < 0.2:
                sentence += f", and it costs {rng.randrange(1, 100)} coins"
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!", "?"]))
        texts.append(" ".join(sentences))
    return texts


def train_tiny_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (left padding, eos = bos = ``<|endoftext|>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # padding_side must go to the constructor: setting it afterwards is not saved.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=None, padding_side="left")


def tiny_qwen2_config(*, vocab_size: int = 512, hidden_size: int = 64, n_layers: int = 2, n_heads: int = 4,
                      n_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 256,
                      **extra: Any):
    """A ``Qwen2Config`` of the given size (untied embeddings, fp32, rope theta 10 000)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, **extra)


def mid_size_qwen2_config(*, vocab_size: int = 512, **overrides: Any):
    """A benchmark-size ``Qwen2Config``: d = 512, 8 layers, 8 heads (4 kv heads), FF 1408 (~24 M params)."""
    sizes = dict(hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=1408,
                 max_position_embeddings=512)
    sizes.update(overrides)
    return tiny_qwen2_config(vocab_size=vocab_size, **sizes)


def build_tiny_qwen2(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 512, hidden_size: int = 64,
                     n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, intermediate_size: int = 128,
                     corpus: list[str] | None = None, config: Any | None = None) -> Path:
    """Build and save a random-weight ``Qwen2ForCausalLM`` plus a BPE tokenizer into ``out_dir``.

    seed:    initialises the weights (the global torch RNG is left untouched).
    corpus:  texts the tokenizer is trained on (default: ``tiny_corpus(400)``).
    config:  a ``Qwen2Config`` that replaces the size arguments (e.g. ``mid_size_qwen2_config()``);
             its special-token ids are set from the tokenizer.
    Returns the directory, loadable with ``load_causal_lm`` or ``AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = tiny_qwen2_config(vocab_size=vocab_size, hidden_size=hidden_size, n_layers=n_layers,
                                   n_heads=n_heads, n_kv_heads=n_kv_heads, intermediate_size=intermediate_size)
    tokenizer = train_tiny_tokenizer(corpus if corpus is not None else tiny_corpus(400, seed=12345),
                                     vocab_size=config.vocab_size)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.eval()
    _save_quietly(model, out)
    tokenizer.save_pretrained(out)
    return out


def _save_quietly(model, out: Path) -> None:
    """``save_pretrained`` without transformers' one-shard progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
