"""Stepwise LLM MAS on tiny offline Qwen2s: golden transfers, copy vs unrelated, backends, resume, n = 3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from llm_fixtures import tiny_qwen2_dir

from llm_mas.errors import ConfigError, DataError, SiteError

pytestmark = pytest.mark.llm

PROMPT, TOTAL, N_SEQ = 12, 32, 60
EMBEDDING_RANK = 8


def _record(model_dir: Path, out: Path) -> Path:
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import tiny_corpus

    model, tokenizer = load_causal_lm(model_dir)
    record_generations(model, tokenizer, tiny_corpus(120, seed=5), prompt_len=PROMPT, total_len=TOTAL, n=N_SEQ,
                       batch_size=30, progress=False).save(out)
    return out


def _train_low_rank_tiny(out_dir: Path, seed: int, steps: int = 120) -> Path:
    """A tiny Qwen2 trained briefly on the tiny corpus, with a rank-8 token embedding (8 <= k = d/2 = 32).

    Why not a random tiny model: its logit margins are so small that a change of 1e-4 (relative) in its
    embeddings flips ~5 % of its argmax predictions, and its full-rank embedding leaves no k = d/2 subspace
    that carries a whole token. Here an exact alignment exists (the embedding's row space; see
    ``test_oracle_alignment_transfers_exactly``) and training makes the predictions robust, so whether MAS
    *finds* the alignment is what the copy test measures.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_mas.llm.tiny import build_tiny_qwen2, tiny_corpus

    path = build_tiny_qwen2(out_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = [tokenizer(t)["input_ids"] for t in tiny_corpus(300, seed=7)]
    ids = torch.tensor([e[:TOTAL] for e in encoded if len(e) >= TOTAL])  # (n, TOTAL)
    g = torch.Generator().manual_seed(seed)
    d, vocab = model.config.hidden_size, model.config.vocab_size
    factor_a = torch.nn.Parameter(torch.randn(vocab, EMBEDDING_RANK, generator=g) * 0.02)        # (V, r)
    factor_b = torch.nn.Parameter(torch.linalg.qr(torch.randn(d, EMBEDDING_RANK, generator=g))[0].T.contiguous())
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + [factor_a, factor_b], lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(len(ids), (32,), generator=g)]
        loss = model(inputs_embeds=(factor_a @ factor_b)[batch], labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(factor_a @ factor_b)  # (V, d) of rank 8
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_mas_trained")
    model = _train_low_rank_tiny(root / "model", seed=3)
    return model, _record(model, root / "recording")


@pytest.fixture(scope="module")
def randoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_mas_random")
    return [(tiny_qwen2_dir(s), _record(tiny_qwen2_dir(s), root / f"rec{s}")) for s in (0, 1)]


def _config(entries, **kw):
    from llm_mas.run_config import config_from_kwargs

    backend = kw.pop("backend", "torch")
    data = {"n_train": 256, "n_valid": 64, "stepwise": True, **kw.pop("data", {})}
    train = {"lr": 3e-2, "batch_size": 32, "max_steps": 40, "eval_every": 40, "patience": 100, **kw.pop("train", {})}
    models = [dict(name=str(m), kind="hf", recording=str(r), site="embeddings", backend=backend) for m, r in entries]
    return config_from_kwargs(models=models, data=data, train=train, eval={"batch_size": 256}, progress=False, **kw)


def _fit(config, **trainer_kw):
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.trainer import MASTrainer, TrainerConfig

    problem = build_problem(config)
    alignments = build_alignments(config, problem)
    trainer = MASTrainer(alignments, problem, TrainerConfig(**vars(config.train)), progress=False, **trainer_kw)
    return problem, trainer, trainer.fit(resume=trainer_kw.get("checkpoint_path") is not None)


def _iia(records, metric="token_iia"):
    return {(r.source_index, r.target_index): getattr(r, metric) for r in records}


# ---------------------------------------------------------------------------------------------- problem
def test_problem_shapes_pairs_and_cache(trained):
    """Pairs follow docs/method.md §14.2 and the source latents are the source's own, cached once per split."""
    from llm_mas.run import build_problem

    config = _config([trained, trained], data={"n_train": 50, "n_valid": 20})
    problem = build_problem(config)
    assert problem.k == 32 and problem.stepwise and problem.all_variables == ["full"]
    assert [m.name for m in problem.models] == ["model#0", "model#1"]
    assert problem.models[0].model is problem.models[1].model  # identical entries share one loaded model
    entry = problem.models[0]
    assert len(entry.splits["train"]) == 48 and len(entry.splits["valid"]) == 12  # 80/20
    assert entry.latents["train"].shape == (48, TOTAL, 64)
    embedded = entry.model.model.embed_tokens(entry.splits["valid"].ids)  # (12, TOTAL, 64)
    torch.testing.assert_close(entry.latents["valid"], embedded)
    assert len(problem.splits["train"]) == 4 and all(len(d) == 50 for d in problem.splits["train"])
    for d in problem.splits["valid"]:
        source, target = problem.models[d.source].splits["valid"], problem.models[d.target].splits["valid"]
        i = d.index
        assert bool(((i >= 10) & (i < TOTAL - 10)).all())
        positions = torch.arange(TOTAL)
        assert torch.equal(d.mask, positions[None] <= i[:, None])
        # target inputs: its own tokens up to i, the source's after i; labels: the source's predictions from i on
        source_ids = source.ids[d.source_rows]
        assert torch.equal(d.target_ids[~d.mask], source_ids[~d.mask])
        assert torch.equal(d.labels[positions[None] >= i[:, None]],
                           source.predicted[d.source_rows][positions[None] >= i[:, None]])
        assert bool((d.labels[positions[None] < i[:, None]] == -100).all())
        assert target.total_len == TOTAL

    # any layer is a site: "layer0" caches the output of decoder block 0
    config = _config([trained], data={"n_train": 4, "n_valid": 4})
    config.models[0].site = "layer0"
    problem = build_problem(config)
    entry = problem.models[0]
    assert str(entry.site) == "model.layers.0:output@given"
    hidden = entry.model(entry.splits["valid"].ids, output_hidden_states=True).hidden_states[1]  # (12, TOTAL, 64)
    torch.testing.assert_close(entry.latents["valid"], hidden)


def test_oracle_alignment_transfers_exactly(trained, randoms):
    """Golden: with the embedding's row space as the swapped subspace, a model and its copy transfer perfectly
    (IIA 1 in every direction) while unrelated models do not; k = d with identity maps = running the source."""
    from llm_mas.alignments import AlignmentMap
    from llm_mas.run import build_problem

    def oracle(entry):
        weight = entry.model.model.embed_tokens.weight.detach()      # (V, d)
        basis = torch.linalg.svd(weight, full_matrices=True).Vh.T    # (d, d), row space first
        return AlignmentMap("orthogonal", 64, 64, weight=basis, inverse_weight=basis.T)

    problem = build_problem(_config([trained, trained], data={"n_train": 8}))
    records = problem.evaluate([oracle(m) for m in problem.models], with_ci=True)
    assert all(r.token_iia == 1.0 and r.trial_iia == 1.0 for r in records)
    assert all(r.trial_iia_ci == [1.0, 1.0] and r.token_iia_ci == [1.0, 1.0] for r in records)
    assert [(r.source_index, r.target_index) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    problem = build_problem(_config(randoms, k=64, data={"n_train": 8}))
    identity = [AlignmentMap("identity", 64, 64)] * 2
    iia = _iia(problem.evaluate(identity))
    assert iia[(0, 0)] == iia[(1, 1)] == 1.0          # a full swap within a model reproduces the source exactly
    assert max(iia[(0, 1)], iia[(1, 0)]) < 0.2        # another model given the source's embeddings does not


@pytest.mark.slow
def test_copy_reaches_high_iia_unrelated_stays_low(trained, randoms):
    """MAS (default random orthogonal init, k = d/2) between a model and its exact copy reaches token IIA >= 0.95
    in every direction and clearly raises trial IIA; two unrelated random tiny models stay far lower."""
    started = time.perf_counter()
    _, _, fit = _fit(_config([trained, trained]))
    seconds_per_step = (time.perf_counter() - started) / 40
    before, after = fit.history[0], _iia(fit.best_records)
    assert fit.best_step == 40
    assert min(after.values()) >= 0.95, after
    trial_before = [v for k, v in before.items() if k.endswith(":trial_iia")]
    trial_after = list(_iia(fit.best_records, "trial_iia").values())
    assert sum(trial_after) / 4 >= sum(trial_before) / 4 + 0.3, (trial_before, trial_after)

    _, _, unrelated = _fit(_config(randoms))
    cross = _iia(unrelated.best_records)
    assert max(cross[(0, 1)], cross[(1, 0)]) <= 0.25, cross
    assert min(after.values()) - max(cross[(0, 1)], cross[(1, 0)]) >= 0.7
    print(f"\ncopy token IIA {after}; unrelated {cross}; {seconds_per_step:.3f} s/step (copy, 4 directions)")


# ---------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", ["nnsight", "tlens"])
def test_backends_match_torch_and_train(trained, backend):
    """The nnsight (tracing) and TransformerLens (hook points) paths give the torch loss and gradient at step 0,
    and train through MASTrainer."""
    from llm_mas.run import build_alignments, build_problem

    results = {}
    for name in ("torch", backend):
        config = _config([trained, trained], backend=name, data={"n_train": 32, "n_valid": 8},
                         train={"max_steps": 2, "eval_every": 2, "batch_size": 8})
        problem = build_problem(config)
        assert problem.models[0].backend.name == name
        alignments = build_alignments(config, problem)
        loss, _ = problem.loss([a.materialize() for a in alignments], torch.arange(8))
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in alignments.parameters()])
    torch.testing.assert_close(results[backend][0], results["torch"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[backend][1], results["torch"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if backend == "nnsight":
        _, trainer, fit = _fit(config)
        assert fit.steps == 2 and len(fit.history) == 2 and fit.history[1]["train_loss"] > 0


# ---------------------------------------------------------------------------------------------- trainer
def test_checkpoint_resume_matches_uninterrupted_run(randoms, tmp_path):
    """A run killed after 2 steps and resumed from its checkpoint ends with the uninterrupted run's alignments."""
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.trainer import MASTrainer, StopAfter, TrainerConfig

    config = _config(randoms, data={"n_train": 48, "n_valid": 12},
                     train={"max_steps": 4, "eval_every": 2, "batch_size": 12, "grad_accum": 2})
    problem = build_problem(config)
    train_config = TrainerConfig(**vars(config.train))

    def trainer(path=None):
        return MASTrainer(build_alignments(config, problem), problem, train_config, checkpoint_path=path,
                          progress=False)

    straight = trainer()
    straight.fit(resume=False)
    killed = trainer(tmp_path / "checkpoint.pt")
    with pytest.raises(KeyboardInterrupt):
        killed.fit(callbacks=[StopAfter(3)])
    resumed = trainer(tmp_path / "checkpoint.pt")
    result = resumed.fit(resume=True)
    assert resumed.step == 4 and result.steps == 4
    for a, b in zip(straight.alignments.state_dict().values(), resumed.alignments.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [h["step"] for h in result.history] == [0, 2, 4]


def test_three_models_run_writes_results(trained, randoms, tmp_path):
    """n = 3 models (different weights, one shared recording length): 9 directions evaluated with CIs; the
    ordinary `run` path (what `llm-mas mas` runs) writes the run directory."""
    from llm_mas.run import run

    config = _config([trained, *randoms], data={"n_train": 24, "n_valid": 10},
                     train={"max_steps": 2, "eval_every": 2, "batch_size": 8}, directions="cross",
                     out_dir=str(tmp_path), name="three")
    result = run(config, log=lambda s: None)
    records = json.loads((tmp_path / "three" / "results.json").read_text())
    assert len(records) == 9 and [(r["source_index"], r["target_index"]) for r in records] == [
        (s, t) for s in range(3) for t in range(3)]
    for r in records:
        assert r["trained"] == (r["source_index"] != r["target_index"]) and r["n_pairs"] == 10
        assert r["trial_iia_ci"][0] <= r["trial_iia"] <= r["trial_iia_ci"][1]
        assert r["token_iia_ci"][0] <= r["token_iia"] <= r["token_iia_ci"][1] and r["n_tokens"] > 0
    assert result.matrix(metric="token_iia").shape == (3, 3)
    assert (tmp_path / "three" / "alignments.safetensors").is_file()


def test_stitch_intervention_and_low_rank_alignment_run(trained):
    from llm_mas.run import build_alignments, build_problem

    config = _config([trained, trained], intervention="stitch", data={"n_train": 8, "n_valid": 4})
    config.models[1].alignment = "low_rank"
    problem = build_problem(config)
    maps = [a.materialize() for a in build_alignments(config, problem)]
    loss, _ = problem.loss(maps, torch.arange(4))
    assert torch.isfinite(loss) and loss.requires_grad
    assert len(problem.evaluate(maps)) == 4


def test_bfloat16_models_cache_bf16_latents_and_intervene_in_float32(tmp_path):
    """bf16 models (the DeepSeek preset's dtype): latents cached in bf16, interventions computed in float32 and
    cast back, float32 alignments receive gradients."""
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import tiny_corpus
    from llm_mas.run import build_alignments, build_problem

    model, tokenizer = load_causal_lm(tiny_qwen2_dir(0), dtype="bfloat16")
    record_generations(model, tokenizer, tiny_corpus(60, seed=5), prompt_len=PROMPT, total_len=TOTAL, n=20,
                       batch_size=20, progress=False).save(tmp_path / "rec")
    config = _config([(tiny_qwen2_dir(0), tmp_path / "rec")] * 2, data={"n_train": 8, "n_valid": 4})
    for m in config.models:
        m.dtype = "bfloat16"
    problem = build_problem(config)
    assert problem.models[0].latents["train"].dtype == torch.bfloat16 and problem.models[0].dtype == torch.bfloat16
    alignments = build_alignments(config, problem)
    loss, _ = problem.loss([a.materialize() for a in alignments], torch.arange(4))
    loss.backward()
    grads = [p.grad for p in alignments.parameters()]
    assert loss.dtype == torch.float32 and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(0.0 <= r.token_iia <= 1.0 for r in problem.evaluate([a.materialize() for a in alignments]))


# ---------------------------------------------------------------------------------------------- errors
def test_config_problems_are_reported_together(trained, tmp_path):
    """Every problem of an HF run config is reported at once when the config is built, before any load."""
    from llm_mas.run import build_problem
    from llm_mas.run_config import config_from_kwargs

    model, _ = trained
    with pytest.raises(ConfigError) as e:
        config_from_kwargs(
            models=[dict(name=str(model), kind="hf", recording=str(tmp_path / "nope"), backend="jax"),
                    dict(name=str(model), kind="hf", site="not a site!"),
                    dict(name=str(model), kind="hf", site="hidden")],
            variables=["count"], data={"stepwise": False})
    text = str(e.value)
    for part in ("models.0.backend: unknown backend 'jax'", "llm-mas record",
                 "models.1.recording: an HF model needs a recording", "models.1.site", "variables:",
                 "data.stepwise: LLM MAS is stepwise", "models.2.site: 'hidden' is a task-model site"):
        assert part in text, part
    # a recording directory that does not hold one is reported (every model at once) before any weights load
    config = config_from_kwargs(models=[dict(name=str(model), kind="hf", recording=str(tmp_path / "nope"))] * 2,
                                data={"stepwise": True})
    with pytest.raises(ConfigError) as e:
        build_problem(config)
    assert "models.0.recording" in str(e.value) and "models.1.recording" in str(e.value)


def test_model_kinds_take_only_their_own_keys():
    """A key of the other model kind is an error (the union is told apart by `kind`), as is an unknown kind."""
    from llm_mas.run_config import config_from_kwargs

    with pytest.raises(ConfigError) as e:
        config_from_kwargs(models=[dict(name="multiobject-gru-s0", dtype="bfloat16"),
                                   dict(name="m", kind="hf", recording="r", untrained=True),
                                   dict(name="m", kind="onnx")])
    text = str(e.value)
    for part in ("unknown key 'models.0.dtype'", "unknown key 'models.1.untrained'",
                 "models.2.kind: 'onnx' is not one of 'task', 'hf'"):
        assert part in text, part


def test_wrong_recording_and_bad_k_are_refused(trained, randoms):
    from llm_mas.run import build_problem

    (model, _), (_, other_recording) = trained, randoms[0]
    with pytest.raises(DataError, match="stale"):
        build_problem(_config([(model, other_recording)]))
    with pytest.raises(ConfigError, match="k=65 must lie in 1..64"):
        build_problem(_config([trained], k=65))
    config = _config([trained])
    config.models[0].site = "layer7"
    with pytest.raises(SiteError, match="layer7"):
        build_problem(config)
