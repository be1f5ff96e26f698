"""Loading HF causal LMs offline, the tiny Qwen2 builder, site aliases and PEFT adapters."""

from __future__ import annotations

import time

import pytest
from llm_fixtures import load_tiny, tiny_qwen2_dir

from llm_mas.errors import ConfigError, HubUnavailableError, SiteError

pytestmark = pytest.mark.llm


# ------------------------------------------------------------------------------------------------ tiny builder
def test_tiny_build_is_deterministic_fast_and_seeded(tmp_path):
    from llm_mas.llm.tiny import build_tiny_qwen2

    build_tiny_qwen2(tmp_path / "warm")  # imports out of the timing
    started = time.perf_counter()
    a = build_tiny_qwen2(tmp_path / "a", seed=0)
    elapsed = time.perf_counter() - started
    b = build_tiny_qwen2(tmp_path / "b", seed=0)
    c = build_tiny_qwen2(tmp_path / "c", seed=1)
    assert elapsed < 2.0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tiny_tokenizer_ids_survive_autotokenizer():
    """AutoTokenizer gives a Qwen2Tokenizer (it replaces the pre-tokenizer); the ids must not change."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from llm_mas.llm.tiny import tiny_corpus

    path = tiny_qwen2_dir()
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text in tiny_corpus(5, seed=7) + ["Numbers 12345 and   spaces,\nnew lines!"]:
        assert tokenizer(text)["input_ids"] == raw.encode(text).ids
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_tiny_corpus_texts_are_long_enough_for_prompts():
    from llm_mas.llm.tiny import tiny_corpus

    _, tokenizer = load_tiny()
    texts = tiny_corpus(30, seed=3)
    assert texts == tiny_corpus(30, seed=3) and texts != tiny_corpus(30, seed=4)
    assert min(len(tokenizer(t)["input_ids"]) for t in texts) >= 32


def test_mid_size_config():
    from llm_mas.llm.tiny import mid_size_qwen2_config

    cfg = mid_size_qwen2_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (512, 8, 512)
    assert cfg.hidden_size % cfg.num_attention_heads == 0


# ------------------------------------------------------------------------------------------------ loading
def test_load_causal_lm_frozen_eval_with_aliases():
    import copy

    import torch

    from llm_mas.backends import TorchHookBackend
    from llm_mas.llm.loading import model_source
    from llm_mas.sites import registered_site_aliases, site_aliases

    model, tokenizer = load_tiny()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert site_aliases(model) == {"embeddings": "model.embed_tokens", "layer0": "model.layers.0",
                                   "layer1": "model.layers.1"}
    # Aliases and source live in llm_mas's tables, not as attributes on the user's model.
    assert not hasattr(model, "site_aliases") and not hasattr(model, "llm_mas_source")
    assert not [key for key in vars(model) if "llm_mas" in key or "alias" in key]
    site_aliases(model).clear()  # a copy: the table is unchanged
    assert site_aliases(model)["layer1"] == "model.layers.1"
    clone = copy.deepcopy(model)
    assert registered_site_aliases(clone) is None and model_source(clone) is None
    backend = TorchHookBackend()
    assert str(backend.resolve(model, "embeddings")) == "model.embed_tokens:output@given"
    assert str(backend.resolve(model, "layer1@all")) == "model.layers.1:output@all"
    with pytest.raises(SiteError, match="model.layers.1"):
        backend.resolve(model, "model.layer.1")
    ids = torch.tensor([tokenizer("The cat sees a red ball.")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 512)
    assert model_source(model) == {"model": str(tiny_qwen2_dir()), "adapter": None, "merged": False,
                                   "dtype": "float32"}


def test_load_dtype_and_device_choices():
    import torch

    model, _ = load_tiny(dtype="bfloat16", device="auto" if not torch.cuda.is_available() else "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="'fp32'.*bfloat16.*float16.*float32"):
        load_tiny(dtype="fp32")
    with pytest.raises(ConfigError, match="'gpu'.*cpu, cuda, cuda:N, auto"):
        load_tiny(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_tiny(device="cuda:0")


def test_hub_id_offline_raises_hub_unavailable(monkeypatch):
    from llm_mas.llm.loading import load_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        load_causal_lm("no-such-org/no-such-model")
    message = str(info.value)
    assert "no-such-org/no-such-model" in message and "local directory" in message
    assert "build_tiny_qwen2" in message and "hf download" in message
    assert time.perf_counter() - started < 20  # no retries against an unreachable hub


def test_connection_error_becomes_hub_unavailable(monkeypatch):
    import huggingface_hub.constants
    import transformers

    from llm_mas.llm.loading import load_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    with pytest.raises(HubUnavailableError, match="Qwen/Qwen2-0.5B.*cannot be reached"):
        load_causal_lm("Qwen/Qwen2-0.5B")


def test_bad_paths_are_config_errors(tmp_path):
    from llm_mas.llm.loading import load_causal_lm

    with pytest.raises(ConfigError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(ConfigError, match="is a file"):
        load_causal_lm(tiny_qwen2_dir() / "config.json")
    with pytest.raises(ConfigError, match="merge_adapter=True needs adapter"):
        load_causal_lm(tiny_qwen2_dir(), merge_adapter=True)
    with pytest.raises(ConfigError, match="adapter_config.json"):
        load_causal_lm(tiny_qwen2_dir(), adapter=tmp_path)


def test_peft_adapter_on_top_and_merged(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from llm_mas.backends import TorchHookBackend

    base, tokenizer = load_tiny()
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer("The old teacher paints a letter at school today.")["input_ids"]])
    expected = lora(input_ids=ids).logits

    plain, _ = load_tiny()
    with_adapter, _ = load_tiny(adapter=tmp_path / "adapter")
    merged, _ = load_tiny(adapter=tmp_path / "adapter", merge_adapter=True)
    assert type(with_adapter).__name__ == "PeftModelForCausalLM" and type(merged).__name__ == "Qwen2ForCausalLM"
    assert all(not p.requires_grad for p in with_adapter.parameters()) and not with_adapter.training
    assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(with_adapter(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    # Aliases follow the PEFT wrapper's module paths.
    from llm_mas.sites import site_aliases

    assert site_aliases(with_adapter)["embeddings"] == "base_model.model.model.embed_tokens"
    assert site_aliases(with_adapter)["layer1"] == "base_model.model.model.layers.1"
    TorchHookBackend().resolve(with_adapter, "layer1")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_site_aliases_other_architectures(arch):
    import transformers

    from llm_mas.sites import llm_site_aliases

    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2,
                                                                     vocab_size=50, n_positions=32))
        expected = {"embeddings": "transformer.wte", "layer0": "transformer.h.0", "layer1": "transformer.h.1"}
    elif arch == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50))
        expected = {"embeddings": "gpt_neox.embed_in", "layer0": "gpt_neox.layers.0", "layer1": "gpt_neox.layers.1"}
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50))
        expected = {"embeddings": "model.embed_tokens", "layer0": "model.layers.0", "layer1": "model.layers.1"}
    assert llm_site_aliases(model) == expected
