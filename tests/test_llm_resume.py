"""Stepwise LLM MAS steps that start at the site (``skip_below_site``): the same losses, gradients and records as
the full forward through the backend (the reference), on tiny offline Qwen2 / Llama / GPT-NeoX models; the
per-pair cache of layer-l outputs bounded by ``site_cache_bytes``; the fallbacks, each logged with its reason."""

from __future__ import annotations

import pytest
import torch
from hf_families import FAMILIES as ALL_FAMILIES
from hf_families import build_family
from llm_fixtures import load_tiny, tiny_qwen2_dir

from llm_mas.alignments import make_alignment
from llm_mas.backends import get_backend
from llm_mas.llm.record import Recording
from llm_mas.problems.llm import LLMModelEntry, LLMProblem, collect_latents

pytestmark = pytest.mark.llm

N_SEQ, TOTAL = 30, 28


def _entry(model, backend_name: str, site: str, seed: int) -> LLMModelEntry:
    """An LLM MAS model entry on a recording of random prompts with the model's own greedy predictions."""
    backend = get_backend(backend_name)
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(3, vocab, (N_SEQ, TOTAL), generator=g)
    with torch.no_grad():
        predicted = model(input_ids=ids, use_cache=False).logits.argmax(-1)
    recording = Recording(ids, predicted, meta={"prompt_len": TOTAL})
    train, valid = recording.split(0.2, seed=741)
    resolved = backend.resolve(model, site)
    latents = {name: collect_latents(backend, model, resolved, rec.ids, torch.device("cpu"), 16)
               for name, rec in (("train", train), ("valid", valid))}
    return LLMModelEntry(name=f"m{seed}", model=model, site=resolved, width=int(latents["train"].shape[-1]),
                         tokenizer=None, backend=backend, device=torch.device("cpu"), dtype=torch.float32,
                         recording=recording, splits={"train": train, "valid": valid}, latents=latents)


def _problem(models, **kw) -> LLMProblem:
    return LLMProblem(models, k=8, n_train=24, n_valid=10, seed=3, eval_batch_size=12, **kw)


def _loss_and_grads(problem: LLMProblem, rows: torch.Tensor):
    alignments = [make_alignment("orthogonal", m.width, k=8, seed=i) for i, m in enumerate(problem.models)]
    loss, _ = problem.loss([a.materialize() for a in alignments], rows)
    loss.backward()
    grads = [p.grad.clone() for a in alignments for p in a.parameters() if p.requires_grad]
    records = problem.evaluate([a.materialize() for a in alignments])
    return loss.detach(), grads, records


def _assert_same(resumed, full):
    (l_res, g_res, r_res), (l_full, g_full, r_full) = resumed, full
    torch.testing.assert_close(l_res, l_full, rtol=2e-6, atol=0)
    assert float(l_full) > 0 and all(float(g.abs().max()) > 0 for g in g_full)
    for a, b in zip(g_res, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    assert len(r_res) == len(r_full) == 4
    for a, b in zip(r_res, r_full):
        assert (a.source_index, a.target_index) == (b.source_index, b.target_index)
        assert a.n_tokens == b.n_tokens and a.token_iia == b.token_iia and a.trial_iia == b.trial_iia
        assert a.loss == pytest.approx(b.loss, rel=2e-6)


FAMILIES = {"qwen2": lambda seed: load_tiny(seed)[0].eval().requires_grad_(False),
            "llama": lambda seed: build_family("llama", seed), "gpt_neox": lambda seed: build_family("gpt_neox", seed)}


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_steps_from_the_site_match_the_full_forward(family, backend):
    """Two models, four directions (two per target pass), site = output of decoder layer 0 of 2: the loss, the
    gradient of every alignment parameter and the validation records equal the full forward's, on the first
    step (cache filled) and the second (cache read), and with a cache too small for every pair."""
    models = [_entry(FAMILIES[family](seed), backend, "layer0", seed) for seed in (0, 1)]
    logs: list[str] = []
    resumed = _problem(models, log=logs.append)
    full = _problem(models, skip_below_site=False)
    assert [r.layer for r in resumed.resumes] == [0, 0] and full.resumes == [None, None]
    mib = 2 * (24 + 10) * TOTAL * models[0].width * 4 / 2**20     # every pair of both directions into i, float32
    assert logs == [f"models.{i}: steps start at its site, decoder layer 0 (its output on each pair is cached; "
                    "layers 1.. run per step)" for i in (0, 1)] + [
        f"models.{i}: site outputs of 68 pairs: 68 in memory ({mib:.1f} MiB on cpu), 0 on disk (0.0 MiB), 0 "
        "recomputed at every read" for i in (0, 1)]
    rows = torch.tensor([0, 5, 7, 11, 3, 19])
    reference = _loss_and_grads(full, rows)
    _assert_same(_loss_and_grads(resumed, rows), reference)
    cached = resumed.cached_site_bytes
    width = models[0].width
    assert cached == 4 * 24 * TOTAL * width * 4 + 4 * 10 * TOTAL * width * 4  # every pair, train and valid
    _assert_same(_loss_and_grads(resumed, rows), reference)                  # from the cache alone
    # room for 4 pairs: the first direction read keeps pairs 0..3, the rest are recomputed (layers 0..l) each step
    small = _problem(models, site_cache_bytes=4 * TOTAL * width * 4)
    _assert_same(_loss_and_grads(small, rows), reference)
    assert small.cached_site_bytes == 4 * TOTAL * width * 4


@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_every_tested_family_resumes_with_the_full_forwards_loss_and_gradient(family):
    """Every family of tests/hf_families.py (tuple-returning blocks, ALiBi, sliding windows, MoE, parallel
    blocks): its layer-0 site passes LayerResume's self-check and one step's loss and gradients equal the full
    forward's."""
    models = [_entry(build_family(family, seed), "torch", "layer0", seed) for seed in (0, 1)]
    resumed, full = _problem(models), _problem(models, skip_below_site=False)
    assert all(r is not None and r.layer == 0 for r in resumed.resumes)
    rows = torch.tensor([1, 4, 9])
    alignments = [make_alignment("orthogonal", m.width, k=8, seed=i) for i, m in enumerate(models)]
    out = []
    for problem in (resumed, full):
        for a in alignments:
            a.zero_grad(set_to_none=True)
        loss, _ = problem.loss([a.materialize() for a in alignments], rows)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for a in alignments for p in a.parameters() if p.requires_grad]))
    (l_res, g_res), (l_full, g_full) = out
    torch.testing.assert_close(l_res, l_full, rtol=2e-6, atol=0)
    for a, b in zip(g_res, g_full):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_the_cache_holds_the_counterfactual_runs_layer_output():
    """What is cached for a pair is layer 0's output on its counterfactual input (the target's tokens up to i,
    the source's after), the same whichever batch first read the pair."""
    models = [_entry(FAMILIES["qwen2"](seed), "torch", "layer0", seed) for seed in (0, 1)]
    problem = _problem(models)
    d = problem.splits["train"][1]                                                  # source 0 -> target 1
    first = problem._site_outputs(d, "train", torch.tensor([4, 2]), problem.resumes[1])
    every = problem._site_outputs(d, "train", torch.arange(len(d)), problem.resumes[1])   # (P, L, d)
    hidden = models[1].model(input_ids=d.target_ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(every, hidden, rtol=1e-5, atol=1e-6)
    assert torch.equal(every[[4, 2]], first)
    assert not torch.equal(d.target_ids[:, -1], models[1].splits["train"].ids[:len(d), -1])  # spliced inputs


def test_fallbacks_run_the_whole_model_and_say_why():
    """The embeddings site (nothing below it), TransformerLens' converted model and skip_below_site=false run
    the whole model; the first two say why in the log."""
    logs: list[str] = []
    models = [_entry(FAMILIES["qwen2"](0), "torch", "embeddings", 0), _entry(FAMILIES["llama"](1), "torch", "layer1", 1)]
    problem = _problem(models, log=logs.append, skip_below_site=[True, False])
    assert problem.resumes == [None, None]
    assert len(logs) == 1 and logs[0].startswith("models.0: steps run the whole model (site 'model.embed_tokens' "
                                                 "is not the output of a decoder layer")

    from hf_families import tiny_tokenizer

    from llm_mas.backends.tlens_backend import to_hooked_transformer

    logs.clear()
    hooked = to_hooked_transformer(load_tiny(0)[0], tiny_tokenizer())
    backend = get_backend("tlens")
    hf_entry = _entry(FAMILIES["qwen2"](0), "torch", "layer0", 0)
    tl_entry = LLMModelEntry(**{**vars(hf_entry), "model": hooked, "backend": backend,
                                "site": backend.resolve(hooked, "layer0")})
    problem = _problem([tl_entry, hf_entry], log=logs.append)
    assert problem.resumes[0] is None and problem.resumes[1] is not None
    assert logs[0] == "models.0: steps run the whole model (the tlens backend runs its own model code)"


def test_a_failed_self_check_falls_back(monkeypatch):
    """A model whose layers LayerResume cannot drive (here: layer 0 made to return a tuple of another shape)
    fails the constructor's check against the full forward; the problem logs it and runs the whole model."""
    from llm_mas.backends import resume as resume_module

    def broken_check(self, length):
        raise resume_module.InterventionError("resuming at layer 0 does not reproduce the full forward")

    monkeypatch.setattr(resume_module.LayerResume, "_check", broken_check)
    logs: list[str] = []
    problem = _problem([_entry(FAMILIES["qwen2"](0), "torch", "layer0", 0)] * 2, log=logs.append)
    assert problem.resumes == [None, None]
    assert logs[0] == ("models.0: steps run the whole model (resuming at layer 0 does not reproduce the full "
                       "forward)")


def test_config_option_reaches_the_problem_and_not_the_fingerprint(tmp_path):
    """models.i.skip_below_site (default true) is passed per model; it changes no result, so a run's
    fingerprint does not hold it (a run continues with it switched)."""
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import tiny_corpus
    from llm_mas.run import build_problem, run_fingerprint
    from llm_mas.run_config import config_from_kwargs

    model, tokenizer = load_causal_lm(tiny_qwen2_dir(0))
    record_generations(model, tokenizer, tiny_corpus(60, seed=5), prompt_len=12, total_len=TOTAL, n=20,
                       batch_size=20, progress=False).save(tmp_path / "rec")
    entry = dict(name=str(tiny_qwen2_dir(0)), kind="hf", recording=str(tmp_path / "rec"), site="layer0")
    config = config_from_kwargs(models=[entry, {**entry, "skip_below_site": False}],
                                data={"n_train": 8, "n_valid": 4, "stepwise": True}, progress=False)
    logs: list[str] = []
    problem = build_problem(config, log=logs.append)
    assert problem.resumes[0] is not None and problem.resumes[1] is None
    assert any(line.startswith("models.0: steps start at its site") for line in logs)
    switched = config_from_kwargs(models=[{**entry, "skip_below_site": False}, entry],
                                  data={"n_train": 8, "n_valid": 4, "stepwise": True}, progress=False)
    assert run_fingerprint(config) == run_fingerprint(switched)


def test_bad_options_are_refused_before_anything_runs():
    from llm_mas.errors import ConfigError

    models = [_entry(FAMILIES["llama"](0), "torch", "layer0", 0)]
    with pytest.raises(ConfigError, match="skip_below_site lists 2 values for 1 models"):
        _problem(models, skip_below_site=[True, False])
    with pytest.raises(ConfigError, match="site_cache_bytes must be >= 0, got -1"):
        _problem(models, site_cache_bytes=-1)
