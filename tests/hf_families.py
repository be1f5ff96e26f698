"""The Hugging Face causal-LM families the backends are tested on: tiny random models built offline.

Each entry names a transformers config class and model class and the few config values that make the model
tiny (2 decoder blocks, width 32, 4 heads, vocabulary 512); every other value is the family's default, so the
model keeps its family's layout (parallel attention/MLP, ALiBi, rotary, sliding windows, MoE routing, ...).
Nothing is downloaded: the weights are the config's random initialisation under a fixed seed.

    from hf_families import FAMILIES, build_family
    model = build_family("gptj")      # GPTJForCausalLM, eval mode, frozen; built once per process
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

VOCAB = 512
WIDTH = 32
N_LAYERS = 2
# Weight init std (the families' default is 0.02). At 0.02 a tiny model's attention is nearly uniform, so a
# converter that got the positions wrong (rotary layout, ALiBi, masks) would still agree with HF to ~1e-3;
# at 0.2 attention is peaked and such an error shows at the scale of the logits.
INIT_STD = 0.2

# Token ids inside the small vocabulary (the families' defaults, e.g. GPT-2's 50256, lie outside it).
_TOKENS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# The usual layout of a modern decoder (Llama-like config keys).
_DECODER = {"hidden_size": WIDTH, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64}
_GQA = {**_DECODER, "num_key_value_heads": 2, "head_dim": 8}
_MOE = {"num_experts_per_tok": 2}

# family -> (config class, model class, tiny config values)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": WIDTH, "n_layer": N_LAYERS, "n_head": 4,
                                                "n_positions": 64}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _GQA),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _GQA),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_GQA, "sliding_window": 4}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_GQA, "sliding_window": 4}),
    "phi": ("PhiConfig", "PhiForCausalLM", _DECODER),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"hidden_size": WIDTH, "num_hidden_layers": N_LAYERS,
                                            "num_attention_heads": 4, "ffn_dim": 64, "max_position_embeddings": 64,
                                            "word_embed_proj_dim": WIDTH}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _DECODER),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _DECODER),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {**_DECODER, "sliding_window": 4}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"n_embd": WIDTH, "n_layer": N_LAYERS, "n_head": 4, "rotary_dim": 4,
                                              "n_positions": 64}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": WIDTH, "n_layer": N_LAYERS, "n_head": 4}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"hidden_size": WIDTH, "num_hidden_layers": N_LAYERS,
                                                     "num_attention_heads": 4}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _GQA),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_GQA, **_MOE, "num_local_experts": 4}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", {"hidden_size": WIDTH, "num_layers": N_LAYERS, "num_heads": 4,
                                                      "attention_types": [[["global", "local"], 1]],
                                                      "window_size": 4, "max_position_embeddings": 64}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {"n_embd": WIDTH, "n_layer": N_LAYERS, "n_head": 4,
                                                        "rotary_dim": 4, "n_positions": 64, "n_ctx": 64}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"n_embd": WIDTH, "n_layer": N_LAYERS, "n_head": 4,
                                                                  "n_positions": 64}),
    "mpt": ("MptConfig", "MptForCausalLM", {"d_model": WIDTH, "n_layers": N_LAYERS, "n_heads": 4, "max_seq_len": 64}),
    "cohere": ("CohereConfig", "CohereForCausalLM", _GQA),
    "glm": ("GlmConfig", "GlmForCausalLM", _GQA),
    "helium": ("HeliumConfig", "HeliumForCausalLM", _GQA),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", _GQA),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**_GQA, **_MOE, "num_experts": 4,
                                                            "moe_intermediate_size": 32,
                                                            "shared_expert_intermediate_size": 32}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_GQA, **_MOE, "num_experts": 4,
                                                            "moe_intermediate_size": 32}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_GQA, **_MOE, "num_experts": 4}),
}

_BUILT: dict[str, Any] = {}
_TOKENIZER: list[Any] = []


def tiny_tokenizer():
    """The tiny Qwen2's byte-level BPE tokenizer (512 ids), loaded from its directory: TransformerLens wants a
    tokenizer that knows its own path. The tests feed token ids; the tokenizer only has to exist."""
    if not _TOKENIZER:
        from llm_fixtures import tiny_qwen2_dir
        from transformers import AutoTokenizer

        _TOKENIZER.append(AutoTokenizer.from_pretrained(tiny_qwen2_dir()))
    return _TOKENIZER[0]


def build_family(name: str, seed: int = 0):
    """The tiny random model of family ``name`` (eval mode, frozen), built once per process."""
    key = f"{name}:{seed}"
    if key not in _BUILT:
        import torch
        import transformers

        config_cls, model_cls, values = FAMILIES[name]
        config = getattr(transformers, config_cls)(**_TOKENS, **values)
        for key in ("initializer_range", "init_std"):  # OPT calls it init_std
            if hasattr(config, key):
                setattr(config, key, INIT_STD)
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            model = getattr(transformers, model_cls)(config).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _BUILT[key] = model
    return _BUILT[key]
