"""Many models in one run: a per-step direction budget (seeded, resumable, balanced), every direction still
evaluated, and memory that grows linearly in the number of models (latent caches held once per model)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.errors import ConfigError
from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry, TaskModelProblem
from llm_mas.sites import resolve_site
from llm_mas.tasks import get_task
from llm_mas.trainer import MASTrainer, StopAfter, TrainerConfig

TASK = get_task("multiobject")


def _entries(n: int) -> list[TaskModelEntry]:
    entries = []
    for i in range(n):
        m = build_task_model("gru", "multiobject", len(TASK.vocab), seed=i).eval().requires_grad_(False)
        entries.append(TaskModelEntry(name=f"gru{i}", model=m, task=TASK, site=resolve_site(m, "hidden"),
                                      width=m.d_model, variable_map={}))
    return entries


def _problem(n: int, n_train: int = 48, n_valid: int = 16) -> TaskModelProblem:
    return TaskModelProblem(_entries(n), ["full"], 8, n_train=n_train, n_valid=n_valid, seed=3, progress=False)


def _trainer(problem, path=None, **train) -> tuple[MASTrainer, torch.nn.ModuleList]:
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, k=8, seed=i)
                                  for i in range(len(problem.models))])
    cfg = TrainerConfig(**{"lr": 1e-2, "batch_size": 16, "max_steps": 8, "eval_every": 3, "patience": 100,
                           "seed": 5, **train})
    return MASTrainer(aligns, problem, cfg, checkpoint_path=path, progress=False), aligns


@pytest.mark.parametrize("sampling", ["uniform", "balanced", "by_target"])
def test_sampled_directions_are_seeded_and_a_killed_run_resumes_bit_identically(sampling, tmp_path):
    problem = _problem(3)
    budget = {"directions_per_step": 2, "direction_sampling": sampling}
    whole, aligns = _trainer(problem, tmp_path / "a.pt", **budget)
    res = whole.fit()
    assert res.steps == 8
    killed, _ = _trainer(problem, tmp_path / "b.pt", **budget)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(callbacks=[StopAfter(5)])                              # last checkpoint at step 3
    resumed, aligns2 = _trainer(problem, tmp_path / "b.pt", **budget)
    res2 = resumed.fit()
    def timeless(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert res2.steps == 8 and timeless(res2.history) == timeless(res.history)
    for a, b in zip(aligns.state_dict().values(), aligns2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the same steps train the same directions in a fresh trainer; a different seed draws others
    fresh, _ = _trainer(problem, **budget)
    assert [fresh.step_directions(s) for s in range(8)] == [whole.step_directions(s) for s in range(8)]
    other, _ = _trainer(problem, **budget, seed=6)
    assert [other.step_directions(s) for s in range(8)] != [whole.step_directions(s) for s in range(8)]
    # every direction is evaluated at every validation, whatever the step trained
    for row in res.history:
        assert sum(key.endswith(":trial_iia") for key in row) == 9
    assert len(res.best_records) == 9


def test_a_step_trains_only_its_directions():
    problem = _problem(3)
    trainer, aligns = _trainer(problem, directions_per_step=2)
    picked = trainer.step_directions(0)
    assert len(picked) == 2 and len(set(picked)) == 2
    used = {m for d in picked for m in d}
    loss, _ = problem.loss(trainer._step_maps(picked), trainer._batch(0), directions=picked)
    loss.backward()
    for i, a in enumerate(aligns):
        grads = [p.grad for p in a.parameters() if p.requires_grad]
        assert all((g is not None) == (i in used) for g in grads), (i, picked)
    # the budgeted loss is the loss of a problem training only those directions
    maps = [a.materialize() for a in aligns]
    rows = torch.arange(16)
    only = TaskModelProblem(_entries(3), ["full"], 8, n_train=48, n_valid=16, seed=3, progress=False,
                            train_directions=picked)
    with torch.no_grad():
        assert float(problem.loss(maps, rows, directions=picked)[0]) == float(only.loss(maps, rows)[0])
    # no budget (or one covering every direction): every trained direction every step
    assert _trainer(problem)[0].step_directions(0) is None
    assert _trainer(problem, directions_per_step=9)[0].step_directions(0) is None


@pytest.mark.parametrize("sampling", ["balanced", "by_target"])
@pytest.mark.parametrize("n,budget", [(3, 2), (4, 5), (5, 8)])
def test_balanced_sampling_covers_every_direction_once_per_cycle(n, budget, sampling):
    trainer, _ = _trainer(_FakeProblem(n), directions_per_step=budget, direction_sampling=sampling)
    every = [(s, t) for s in range(n) for t in range(n)]
    per_cycle = -(-len(every) // budget)
    for cycle in range(3):
        steps = [trainer.step_directions(cycle * per_cycle + j) for j in range(per_cycle)]
        assert all(len(d) == budget for d in steps[:-1])
        drawn = [d for step in steps for d in step]
        assert sorted(drawn) == every                           # each direction exactly once per cycle
        assert Counter(s for s, _ in drawn) == Counter(t for _, t in drawn) == {m: n for m in range(n)}
    first = [trainer.step_directions(j) for j in range(per_cycle)]
    second = [trainer.step_directions(per_cycle + j) for j in range(per_cycle)]
    assert first != second                                      # a fresh permutation per cycle


@pytest.mark.parametrize("n,budget", [(5, 4), (15, 16), (15, 8), (9, 20)])
def test_by_target_sampling_touches_as_few_targets_as_a_step_can(n, budget):
    """A by_target step's b directions span at most ceil(b / n) + 1 targets (n directions per target), and
    over a cycle each target's directions arrive together; balanced draws spread over many more targets."""
    grouped, _ = _trainer(_FakeProblem(n), directions_per_step=budget, direction_sampling="by_target")
    spread, _ = _trainer(_FakeProblem(n), directions_per_step=budget, direction_sampling="balanced")
    per_cycle = -(-n * n // budget)
    limit = -(-budget // n) + 1
    grouped_targets = [len({t for _, t in grouped.step_directions(j)}) for j in range(2 * per_cycle)]
    spread_targets = [len({t for _, t in spread.step_directions(j)}) for j in range(2 * per_cycle)]
    assert max(grouped_targets) <= limit
    assert sum(grouped_targets) < sum(spread_targets)
    # a target's n directions fall into at most two consecutive steps of a cycle
    for t in range(n):
        steps = [j for j in range(per_cycle) if any(tt == t for _, tt in grouped.step_directions(j))]
        assert steps == list(range(steps[0], steps[0] + len(steps))) and len(steps) <= 2 + (n - 1) // budget


class _FakeProblem:
    """Just enough of a problem for the trainer to sample directions (no data)."""

    def __init__(self, n: int):
        self.trained_directions = [(s, t) for s in range(n) for t in range(n)]
        self.n_train = 16
        self.models = range(n)


def test_a_bad_budget_is_one_clear_error():
    problem = _FakeProblem(2)
    with pytest.raises(ConfigError, match="directions_per_step must be >= 1"):
        MASTrainer(torch.nn.ModuleList(), problem, TrainerConfig(directions_per_step=0))
    with pytest.raises(ConfigError, match="direction_sampling 'random' must be uniform, balanced or by_target"):
        MASTrainer(torch.nn.ModuleList(), problem, TrainerConfig(direction_sampling="random"))


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_memory_per_model_does_not_depend_on_the_number_of_models():
    small, large = _problem(2, n_train=40, n_valid=8), _problem(4, n_train=40, n_valid=8)
    for split in ("train", "valid"):
        # one latent cache per model and split, the same for a model whatever the other models are
        assert len(small.caches[split]) == 2 and len(large.caches[split]) == 4
        for a, b in zip(small.caches[split], large.caches[split]):
            assert a.nbytes == b.nbytes
            torch.testing.assert_close(a.packed, b.packed, atol=0, rtol=0)
        # every direction reads the shared caches instead of copying latents
        for p in (small, large):
            for chunk in p.splits[split]:
                assert chunk.source_cache is p.caches[split][chunk.source]
                assert chunk.target_cache is p.caches[split][chunk.target]
    # what a direction holds itself: its counterfactual ids and scored mask (one byte per cell) and four
    # int32 index arrays, no latents; the total grows with the number of directions only
    for p in (small, large):
        for chunk in p.splits["train"]:
            n, width = chunk.ids.shape
            assert chunk.ids.dtype == torch.uint8 and chunk.scored.dtype == torch.bool
            assert chunk.nbytes == n * (2 * width + 4 * 4 + 8)
            assert chunk.nbytes < 0.2 * _bytes(chunk.source_cache.packed)
    per_direction = [sum(c.nbytes for c in p.splits["train"]) / len(p.splits["train"]) for p in (small, large)]
    assert per_direction[1] < 1.5 * per_direction[0]
