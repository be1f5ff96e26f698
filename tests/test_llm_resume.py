"""Stepwise LLM MAS steps that start at the site (``skip_below_site``): the same losses, gradients and records as
the full forward through the backend (the reference), on tiny offline Qwen2 / Llama / GPT-NeoX models; the
per-pair cache of layer-l outputs bounded by ``site_cache_bytes`` in memory and ``site_disk_bytes`` on disk
(the ``site_cache`` config section); the fallbacks, each logged with its reason."""

from __future__ import annotations

from pathlib import Path

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


def _entry(model, backend_name: str, site: str, seed: int, dtype: torch.dtype = torch.float32) -> LLMModelEntry:
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
                         tokenizer=None, backend=backend, device=torch.device("cpu"), dtype=dtype,
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


# ---------------------------------------------------------------------------------------------- the disk tier
def _row_bytes(models, dtype_bytes: int = 4) -> int:
    return TOTAL * models[0].width * dtype_bytes


def _count_collects(monkeypatch) -> list[int]:
    """The number of pairs of each LayerResume.collect call (layers 0..l run without a graph) from now on."""
    from llm_mas.backends.resume import LayerResume

    calls: list[int] = []
    original = LayerResume.collect

    def counted(self, ids, *args, **kwargs):
        calls.append(int(ids.shape[0]))
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(LayerResume, "collect", counted)
    return calls


def test_pairs_beyond_memory_go_to_disk_with_the_same_results(monkeypatch):
    """Memory for 30 pairs, disk for 30 more, 2 models, 4 trained directions of 24 train and 10 valid pairs:
    places are given train first (directions in order (0,0), (0,1), (1,0), (1,1)), then valid, so
    (0,0) 24 in memory; (0,1) 6 in memory, 18 on disk; (1,0) 12 on disk, 12 recomputed; (1,1) and every valid
    pair recomputed. Loss, gradients and records equal the all-in-memory run's and the full forward's, on
    the step that fills the caches and on the one that reads them; memory and files hold what was planned."""
    models = [_entry(FAMILIES["qwen2"](seed), "torch", "layer0", seed) for seed in (0, 1)]
    row = _row_bytes(models)
    logs: list[str] = []
    spill = _problem(models, site_cache_bytes=30 * row + row - 1, site_disk_bytes=30 * row, log=logs.append)
    memory, full = _problem(models), _problem(models, skip_below_site=False)
    assert spill.site_cache_pairs == [{"memory": 24, "disk": 12, "recomputed": 12 + 2 * 10},
                                      {"memory": 6, "disk": 18, "recomputed": 24 + 2 * 10}]
    assert memory.site_cache_pairs == [{"memory": 68, "disk": 0, "recomputed": 0}] * 2
    mib = row / 2**20
    assert logs[2:] == [f"models.0: site outputs of 68 pairs: 24 in memory ({24 * mib:.1f} MiB on cpu), 12 on disk "
                        f"({12 * mib:.1f} MiB), 32 recomputed at every read (a larger site_cache.memory_mib or "
                        "site_cache.disk_mib keeps them)",
                        f"models.1: site outputs of 68 pairs: 6 in memory ({6 * mib:.1f} MiB on cpu), 18 on disk "
                        f"({18 * mib:.1f} MiB), 44 recomputed at every read (a larger site_cache.memory_mib or "
                        "site_cache.disk_mib keeps them)"]
    assert spill.site_spill_dir is None                               # nothing written before a pair is read
    rows = torch.tensor([0, 5, 7, 11, 3, 19, 14, 22])                 # every place in (0,1) and (1,0)
    reference = _loss_and_grads(full, rows)
    _assert_same(_loss_and_grads(memory, rows), reference)
    first = _loss_and_grads(spill, rows)
    _assert_same(first, reference)
    calls = _count_collects(monkeypatch)
    second = _loss_and_grads(spill, rows)                             # the kept pairs from memory and disk
    _assert_same(second, reference)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    # the second step recomputes (1,0)'s rows 19, 14, 22 and (1,1)'s 8 rows; the evaluation all 40 valid pairs
    assert calls[:2] == [3, 8] and sum(calls) == 3 + 8 + 40
    assert spill.cached_site_bytes == 30 * row
    assert spill.spilled_site_bytes == 30 * row
    files = sorted(spill.site_spill_dir.glob("*.bin"))               # target 0's pass, (1,0), runs first
    assert [f.name for f in files] == ["0.bin", "1.bin"] and [f.stat().st_size for f in files] == [12 * row, 18 * row]
    # only cross directions trained: (0,1) and (1,0)'s train pairs first, then every direction's valid pairs;
    # the train pairs of (0,0) and (1,1) are never read and get no place
    cross = _problem(models, train_directions=[(0, 1), (1, 0)], site_cache_bytes=30 * row, site_disk_bytes=20 * row)
    assert cross.site_cache_pairs == [{"memory": 6, "disk": 18 + 2, "recomputed": 8 + 10},
                                      {"memory": 24, "disk": 0, "recomputed": 10 + 10}]


def test_a_kept_pair_is_computed_once_and_one_beyond_both_budgets_at_every_read(monkeypatch):
    """One model, memory for 4 pairs, disk for 8: the train direction keeps pairs 0..3 in memory and 4..11
    on disk, 12..23 are recomputed. Three reads of every pair: layers 0..l run on all 24 the first time, then
    on the 12 beyond both budgets only; every read gives the same values as the all-in-memory cache."""
    models = [_entry(FAMILIES["llama"](0), "torch", "layer0", 0)]
    row = _row_bytes(models)
    problem = _problem(models, site_cache_bytes=4 * row, site_disk_bytes=8 * row)
    assert problem.site_cache_pairs == [{"memory": 4, "disk": 8, "recomputed": 12 + 10}]
    reference = _problem(models)
    d, d_ref = problem.splits["train"][0], reference.splits["train"][0]
    every = reference._site_outputs(d_ref, "train", torch.arange(24), reference.resumes[0])
    calls = _count_collects(monkeypatch)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for read in range(3):
        got = problem._site_outputs(d, "train", order, problem.resumes[0])
        assert sum(calls) == (24 if read == 0 else 12)
        assert torch.equal(got[order < 12], every[order[order < 12]])          # kept: bit for bit
        torch.testing.assert_close(got, every[order], rtol=1e-6, atol=1e-6)   # recomputed: up to batching
        calls.clear()
    part = problem._site_outputs(d, "train", torch.tensor([9, 2, 13]), problem.resumes[0])   # disk, memory, beyond
    assert calls == [1] and torch.equal(part[:2], every[[9, 2]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_site_outputs_round_trip_through_disk_bit_exactly(dtype):
    """A bf16 / fp16 model: the site outputs read back from the disk tier are bit-identical to those the
    all-in-memory cache holds (file-backed tensors of the model's dtype), and the step's loss is the same."""
    models = [_entry(FAMILIES["qwen2"](seed).to(dtype), "torch", "layer0", seed, dtype=dtype) for seed in (0, 1)]
    on_disk = _problem(models, site_cache_bytes=0, site_disk_bytes=1 << 30)
    in_memory = _problem(models)
    assert on_disk.site_cache_pairs == [{"memory": 0, "disk": 68, "recomputed": 0}] * 2
    for d, d_mem in zip(on_disk.splits["train"], in_memory.splits["train"]):
        rows = torch.tensor([3, 17, 0, 9])
        first = on_disk._site_outputs(d, "train", rows, on_disk.resumes[d.target])
        again = on_disk._site_outputs(d, "train", rows, on_disk.resumes[d.target])   # from the file
        kept = in_memory._site_outputs(d_mem, "train", rows, in_memory.resumes[d.target])
        assert first.dtype == again.dtype == dtype
        assert torch.equal(again, kept) and torch.equal(first, kept)
    assert on_disk.spilled_site_bytes == 4 * 24 * _row_bytes(models, 2)          # the 4 train directions' files
    rows = torch.tensor([1, 6, 20])
    maps = [make_alignment("orthogonal", m.width, k=8, seed=i).materialize() for i, m in enumerate(models)]
    with torch.no_grad():
        assert torch.equal(on_disk.loss(maps, rows)[0], in_memory.loss(maps, rows)[0])


def test_spill_files_live_in_a_fresh_directory_removed_with_the_problem(tmp_path):
    """site_cache_dir: the files go in a new llm_mas-site-cache-* directory under it (made if missing; what
    was there is untouched) and are removed once the problem is garbage-collected; a disk budget that no
    pair reaches writes nothing."""
    import gc

    models = [_entry(FAMILIES["qwen2"](0), "torch", "layer0", 0)]
    row = _row_bytes(models)
    parent = tmp_path / "scratch" / "cache"
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "keep.txt").write_text("mine")
    problem = _problem(models, site_cache_bytes=2 * row, site_disk_bytes=5 * row, site_cache_dir=parent)
    problem._site_outputs(problem.splits["train"][0], "train", torch.arange(10), problem.resumes[0])
    spill = problem.site_spill_dir
    assert spill.parent == parent and spill.name.startswith("llm_mas-site-cache-")
    assert [f.stat().st_size for f in spill.glob("*.bin")] == [5 * row]
    second = _problem(models, site_cache_bytes=2 * row, site_disk_bytes=5 * row, site_cache_dir=parent)
    second._site_outputs(second.splits["train"][0], "train", torch.arange(10), second.resumes[0])
    assert second.site_spill_dir != spill and spill.is_dir()                # each problem its own directory
    del problem
    gc.collect()
    assert not spill.exists() and second.site_spill_dir.is_dir()
    del second
    gc.collect()
    assert list(parent.iterdir()) == [] and (tmp_path / "scratch" / "keep.txt").read_text() == "mine"
    enough = _problem(models, site_disk_bytes=1 << 30, site_cache_dir=parent)   # memory holds every pair
    enough._site_outputs(enough.splits["train"][0], "train", torch.arange(24), enough.resumes[0])
    assert enough.site_spill_dir is None and enough.spilled_site_bytes == 0


def test_a_killed_runs_spill_directory_is_removed_by_the_next_run_that_spills_beside_it(tmp_path):
    """A process killed while spilling leaves its directory; the next problem spilling under the same parent
    removes it and says so. Directories of a live process, of another host, or without an owner stay."""
    import json
    import signal
    import subprocess
    import sys
    import textwrap

    from llm_mas.files import this_process

    parent = tmp_path / "cache"
    child = textwrap.dedent(f"""
        import time, torch
        from llm_mas.problems.llm import _SpillDir
        spill = _SpillDir({str(parent)!r})
        spill.tensor((4, 3), torch.float32)
        print(spill.path, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = Path(proc.stdout.readline().strip())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert killed.parent == parent and sorted(f.name for f in killed.iterdir()) == ["0.bin", "owner"]
        assert json.loads((killed / "owner").read_text()) == {"pid": proc.pid, "host": this_process()["host"]}
        kept = {}
        for name, owner in (("live", {"pid": live.pid, "host": this_process()["host"]}),
                            ("elsewhere", {"pid": proc.pid, "host": this_process()["host"] + "-elsewhere"}),
                            ("unowned", None)):
            kept[name] = parent / f"llm_mas-site-cache-{name}"
            kept[name].mkdir()
            (kept[name] / "0.bin").write_bytes(b"x")
            if owner is not None:
                (kept[name] / "owner").write_text(json.dumps(owner))
        models = [_entry(FAMILIES["qwen2"](0), "torch", "layer0", 0)]
        row = _row_bytes(models)
        logs = []
        problem = _problem(models, site_cache_bytes=2 * row, site_disk_bytes=5 * row, site_cache_dir=parent,
                           log=logs.append)
        assert killed.is_dir()                                              # nothing happens before a spill
        problem._site_outputs(problem.splits["train"][0], "train", torch.arange(10), problem.resumes[0])
        assert not killed.exists() and all(d.is_dir() for d in kept.values())
        assert problem.site_spill_dir.is_dir()
        assert [line for line in logs if line.startswith("site_cache:")] == [
            f"site_cache: removed 1 spill directory left by processes of this host no longer running: {killed}"]
    finally:
        for p in (proc, live):
            p.kill()
            p.wait()


def test_site_cache_config_reaches_the_problem_and_not_the_fingerprint(tmp_path):
    """site_cache.memory_mib / disk_mib / dir set the problem's budgets (log line per model) and leave the
    run's fingerprint as it is (a run continues with other budgets)."""
    from llm_mas.llm.loading import load_causal_lm
    from llm_mas.llm.record import record_generations
    from llm_mas.llm.tiny import tiny_corpus
    from llm_mas.run import build_problem, run_fingerprint
    from llm_mas.run_config import config_from_kwargs

    model, tokenizer = load_causal_lm(tiny_qwen2_dir(0))
    record_generations(model, tokenizer, tiny_corpus(60, seed=5), prompt_len=12, total_len=TOTAL, n=20,
                       batch_size=20, progress=False).save(tmp_path / "rec")
    entry = dict(name=str(tiny_qwen2_dir(0)), kind="hf", recording=str(tmp_path / "rec"), site="layer0")
    common = dict(models=[entry, {**entry, "skip_below_site": False}], data={"n_train": 8, "n_valid": 4,
                                                                             "stepwise": True}, progress=False)
    row_mib = TOTAL * 64 * 4 / 2**20                                  # 64-d float32: 7 KiB, exact in binary
    config = config_from_kwargs(**common, site_cache={"memory_mib": 5 * row_mib, "disk_mib": 7 * row_mib,
                                                      "dir": str(tmp_path / "spill")})
    logs: list[str] = []
    problem = build_problem(config, log=logs.append)
    # into model 0: (0,0) and (1,0), 8 train + 4 valid pairs each: memory 5 of (0,0); disk its other 3 and
    # 4 of (1,0); recomputed the other 4 of (1,0) and the 8 valid pairs
    assert problem.site_cache_pairs == [{"memory": 5, "disk": 7, "recomputed": 12}, None]
    assert [line for line in logs if "site outputs" in line] == [
        f"models.0: site outputs of 24 pairs: 5 in memory ({5 * row_mib:.1f} MiB on cpu), 7 on disk "
        f"({7 * row_mib:.1f} MiB), 12 recomputed at every read (a larger site_cache.memory_mib or "
        "site_cache.disk_mib keeps them)"]
    problem._site_outputs(problem.splits["train"][0], "train", torch.arange(8), problem.resumes[0])
    assert problem.site_spill_dir.parent == tmp_path / "spill"
    assert run_fingerprint(config) == run_fingerprint(config_from_kwargs(**common))


def test_bad_site_cache_settings_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """Negative budgets, a cache directory that is a file, lies under a file or is not writable, a directory
    with no disk budget and a site cache on a run without one: one ConfigError naming the key and the fix."""
    import os

    from llm_mas.errors import ConfigError
    from llm_mas.run_config import config_from_kwargs

    models = [_entry(FAMILIES["llama"](0), "torch", "layer0", 0)]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="site_disk_bytes must be >= 0, got -1"):
        _problem(models, site_disk_bytes=-1)
    with pytest.raises(ConfigError, match=f"site_cache_dir: '{a_file}' is not a directory; give a directory"):
        _problem(models, site_disk_bytes=1, site_cache_dir=a_file)

    entry = dict(name="unused", kind="hf", recording="unused", site="layer0")

    def problems(**site_cache) -> list[str]:
        with pytest.raises(ConfigError) as e:
            config_from_kwargs(models=[entry], data={"stepwise": True}, site_cache=site_cache)
        return e.value.problems

    assert problems(memory_mib=-1, disk_mib=-0.5) == ["site_cache: site_cache.memory_mib must be >= 0 (MiB), got -1.0",
                                                      "site_cache: site_cache.disk_mib must be >= 0 (MiB), got -0.5"]
    assert problems(disk_mib=64, dir=str(a_file)) == [
        f"site_cache: site_cache.dir: '{a_file}' is not a directory; give a directory (the cache goes in a fresh "
        "subdirectory of it) or leave it unset for the system's temporary directory"]
    assert problems(disk_mib=64, dir=str(a_file / "sub")) == [
        f"site_cache: site_cache.dir: '{a_file / 'sub'}' does not exist and cannot be made ('{a_file}' is not a "
        "writable directory); give a writable directory or leave it unset for the system's temporary directory"]
    assert problems(dir=str(tmp_path)) == [
        f"site_cache: site_cache.dir is '{tmp_path}' but site_cache.disk_mib is 0 (nothing goes to disk); set "
        "site_cache.disk_mib (e.g. 4096) or remove site_cache.dir"]
    from llm_mas.problems import llm as llm_module

    monkeypatch.setattr(llm_module.os, "access", lambda path, mode: False)   # (the tests may run as root)
    assert problems(disk_mib=64, dir=str(tmp_path)) == [
        f"site_cache: site_cache.dir: '{tmp_path}' is not writable by this user; give a writable directory or "
        "leave it unset for the system's temporary directory"]
    monkeypatch.setattr(llm_module.os, "access", os.access)
    with pytest.raises(ConfigError) as e:
        config_from_kwargs(models=[{"name": "gru_s0"}], site_cache={"disk_mib": 64})
    assert e.value.problems == ["site_cache: set, but only stepwise LLM MAS runs (kind: hf models, no data.dataset / "
                                "data.task) have a site cache; this is a task run: remove site_cache"]
