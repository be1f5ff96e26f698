"""The trainer as a step plus callbacks: `MASTrainer.train_step` returns a `StepOutput`; stops, the stop file,
`StopAfter` and the log are callbacks; with a direction budget, `train.budget_gradients: memory` keeps each
direction's last gradient (SAG) and steps on the sum of all of them."""

from __future__ import annotations

import math

import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.errors import ConfigError
from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry, TaskModelProblem
from llm_mas.run_config import config_from_kwargs
from llm_mas.sites import resolve_site
from llm_mas.tasks import get_task
from llm_mas.trainer import Callback, MASTrainer, StepOutput, StopAfter, StopFile, TrainerConfig

TASK = get_task("multiobject")


@pytest.fixture(scope="module")
def problem() -> TaskModelProblem:
    entries = []
    for i in range(3):
        m = build_task_model("gru", "multiobject", len(TASK.vocab), seed=i).eval().requires_grad_(False)
        entries.append(TaskModelEntry(name=f"gru{i}", model=m, task=TASK, site=resolve_site(m, "hidden"),
                                      width=m.d_model, variable_map={}))
    return TaskModelProblem(entries, ["full"], 8, n_train=48, n_valid=16, seed=3, progress=False)


def _trainer(problem, path=None, callbacks=None, **train) -> MASTrainer:
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, k=8, seed=i) for i in range(3)])
    cfg = TrainerConfig(**{"lr": 1e-2, "batch_size": 16, "max_steps": 8, "eval_every": 3, "patience": 100,
                           "seed": 5, **train})
    return MASTrainer(aligns, problem, cfg, checkpoint_path=path, progress=False, callbacks=callbacks)


def _timeless(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------------------------------ the step
def test_train_step_returns_what_it_did_and_fit_records_the_same_losses(problem, tmp_path):
    stepped = _trainer(problem, directions_per_step=4, direction_sampling="balanced")
    outs = [stepped.train_step() for _ in range(3)]
    assert all(isinstance(o, StepOutput) for o in outs)
    assert [o.step for o in outs] == [1, 2, 3] and stepped.step == 3
    assert [o.directions for o in outs] == [stepped.step_directions(s) for s in range(3)]
    assert all(math.isfinite(o.loss) and o.seconds > 0 and "loss_behaviour" in o.info for o in outs)
    # behaviour only: the loss is its behaviour term
    assert all(o.info["loss_behaviour"] == pytest.approx(o.loss, rel=1e-6) for o in outs)
    fitted = _trainer(problem, tmp_path / "c.pt", directions_per_step=4, direction_sampling="balanced", max_steps=3)
    res = fitted.fit(resume=False)
    assert res.history[-1]["train_loss"] == pytest.approx(sum(o.loss for o in outs) / 3, rel=1e-6)
    last = torch.load(tmp_path / "c.pt", weights_only=True)["alignments"]   # fit returns the best ones
    for a, b in zip(stepped.alignments.state_dict().values(), last.values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    every = _trainer(problem).train_step()
    assert every.directions is None


# ------------------------------------------------------------------------------------------ callbacks
class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at = [], stop_at

    def on_fit_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_validation(self, trainer, output, records):
        assert output.step == trainer.step and len(records) == 9
        self.calls.append(("validation", trainer.step))

    def on_step_end(self, trainer, output):
        self.calls.append(("step", output.step))
        if output.step == self.stop_at:
            return f"asked at step {output.step}"
        return None

    def on_fit_end(self, trainer, result):
        self.calls.append(("end", None if result is None else result.steps))


def test_callbacks_are_called_in_order_and_a_requested_stop_is_not_recorded(problem, tmp_path):
    rec = Recorder(stop_at=4)
    trainer = _trainer(problem, tmp_path / "c.pt", callbacks=[rec])
    res = trainer.fit()
    assert res.steps == 4 and res.stopped == "asked at step 4"
    assert rec.calls == [("start", 0), ("step", 1), ("step", 2), ("validation", 3), ("step", 3), ("step", 4),
                         ("end", 4)]
    # the best alignments are loaded after a requested stop, as after any other
    for k, v in trainer.alignments.state_dict().items():
        torch.testing.assert_close(v, trainer.best_state[k], atol=0, rtol=0)
    # not recorded: the same command continues from the checkpoint (step 3) to the budget
    again = _trainer(problem, tmp_path / "c.pt", callbacks=[])
    res2 = again.fit()
    assert res2.steps == 8 and "step budget" in res2.stopped


def test_stop_after_interrupts_like_a_kill_or_stops_cleanly_and_not_at_the_end(problem, tmp_path):
    rec = Recorder()
    killed = _trainer(problem, tmp_path / "k.pt", callbacks=[rec])
    with pytest.raises(KeyboardInterrupt):
        killed.fit(callbacks=[StopAfter(5)])
    assert killed.step == 5 and rec.calls[-1] == ("end", None)   # on_fit_end hears of the interruption
    assert torch.load(tmp_path / "k.pt", weights_only=True)["step"] == 3   # the last checkpoint
    clean = _trainer(problem, callbacks=[])
    res = clean.fit(callbacks=[StopAfter(2, interrupt=False)])
    assert res.steps == 2 and "StopAfter" in res.stopped
    # counted per call: a second call trains two more steps
    assert clean.fit(resume=False, callbacks=[StopAfter(2, interrupt=False)]).steps == 4
    # a run that ends by its own budget at that step is not interrupted
    assert _trainer(problem, max_steps=5, callbacks=[]).fit(callbacks=[StopAfter(5)]).steps == 5
    with pytest.raises(ConfigError, match="-1"):
        StopAfter(-1)


def test_stop_file_is_checked_only_while_the_run_goes_on(problem, tmp_path):
    stop = tmp_path / "STOP"
    stop.touch()
    res = _trainer(problem, callbacks=[StopFile(stop)]).fit()
    assert res.steps == 0 and "STOP was created" in res.stopped and not stop.exists()
    stop.touch()   # a run with no steps left ends by its budget and leaves the file alone
    res = _trainer(problem, callbacks=[StopFile(stop)], max_steps=0).fit()
    assert res.steps == 0 and "step budget" in res.stopped and stop.exists()
    # the trainer's default callbacks include it when given stop_file
    trainer = MASTrainer(torch.nn.ModuleList([make_alignment("orthogonal", 128, k=8, seed=i) for i in range(3)]),
                         problem, TrainerConfig(max_steps=2, batch_size=16), progress=False, stop_file=stop)
    assert any(isinstance(cb, StopFile) for cb in trainer.default_callbacks())
    assert trainer.fit().steps == 0 and not stop.exists()
    with pytest.raises(ConfigError, match="add StopFile"):   # not silently dropped beside explicit callbacks
        MASTrainer(trainer.alignments, problem, TrainerConfig(), stop_file=stop, callbacks=[])


def test_progress_log_lines(problem):
    lines = []
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, k=8, seed=i) for i in range(3)])
    MASTrainer(aligns, problem, TrainerConfig(lr=1e-2, batch_size=16, max_steps=4, eval_every=2), progress=False,
               log=lines.append).fit()
    assert lines[0].startswith("directions are shown as source→target:variable; 0 = gru0")
    assert [line.split(" (")[0] for line in lines[1:3]] == ["step 2/4", "step 4/4"]
    assert " 0→1:full " in lines[1] and lines[-1].startswith("stopped at step 4: step budget reached")


# ------------------------------------------------------------------------------------------ gradient memory
def _alone(trainer, rows, d):
    """Direction d's own gradient at the trainer's current parameters: {alignment: [grad per parameter]}."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = trainer.problem.loss(trainer.materialize(), rows, directions=[d])
    loss.backward()
    return {i: [p.grad.clone() if p.grad is not None else None for p in trainer._trainable(i)]
            for i in range(len(trainer.alignments))}


def test_memory_stores_each_directions_own_gradient_and_unseen_directions_add_nothing(problem):
    trainer = _trainer(problem, directions_per_step=2, direction_sampling="balanced", budget_gradients="memory")
    start = {k: v.clone() for k, v in trainer.alignments.state_dict().items()}
    picked, rows = trainer.step_directions(0), trainer._batch(0)
    trainer.train_step()
    stepped = [p.grad.clone() if p.grad is not None else None for p in trainer.alignments.parameters()]
    assert sorted(trainer.grad_memory) == picked
    trainer.alignments.load_state_dict(start)
    alone = {d: _alone(trainer, rows, d) for d in picked}
    for d in picked:
        assert sorted(trainer.grad_memory[d]) == sorted(set(d))   # only its source and target alignments
        for i in set(d):
            for stored, own in zip(trainer.grad_memory[d][i], alone[d][i]):
                torch.testing.assert_close(stored, own, atol=1e-7, rtol=1e-5)
        for i in set(range(3)) - set(d):   # the other alignments get nothing from d
            assert all(g is None or not g.any() for g in alone[d][i])
    # the step's gradient: the fresh ones / 9 (the 7 unseen directions add nothing)
    params = list(trainer.alignments.parameters())
    for j, p in enumerate(params):
        i = next(i for i in range(3) if any(p is q for q in trainer._trainable(i)))
        k = [q is p for q in trainer._trainable(i)].index(True)
        want = sum(alone[d][i][k] for d in picked if i in d and alone[d][i][k] is not None)
        if isinstance(want, int):
            assert stepped[j] is None
        else:
            torch.testing.assert_close(stepped[j], want / 9, atol=1e-8, rtol=1e-5)


def test_memory_step_is_the_full_gradient_once_every_direction_was_trained_at_these_parameters(problem):
    # the whole split in every batch and the parameters put back after each step: after one balanced cycle
    # (ceil(9 / 2) = 5 steps) every stored gradient was taken at the same parameters on the same rows
    trainer = _trainer(problem, batch_size=48, directions_per_step=2, direction_sampling="balanced",
                       budget_gradients="memory")
    start = {k: v.clone() for k, v in trainer.alignments.state_dict().items()}
    for _ in range(5):
        trainer.train_step()
        stepped = [p.grad.clone() for p in trainer.alignments.parameters()]
        trainer.alignments.load_state_dict(start)
    assert len(trainer.grad_memory) == 9
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, _ = problem.loss(trainer.materialize(), trainer._batch(5))   # every direction
    loss.backward()
    for got, p in zip(stepped, trainer.alignments.parameters()):
        scale = p.grad.abs().max()
        assert scale > 0
        torch.testing.assert_close(got, p.grad, atol=1e-5 * float(scale), rtol=1e-4)
    # sampled: the same step's gradient is that of its two directions only, far from the full one
    sampled = _trainer(problem, batch_size=48, directions_per_step=2, direction_sampling="balanced",
                       budget_gradients="sampled")
    sampled.step = 4
    sampled.train_step()
    far = max(float((g - p.grad).abs().max() / p.grad.abs().max())
              for g, p in zip([q.grad for q in sampled.alignments.parameters()], trainer.alignments.parameters())
              if g is not None)
    assert far > 0.1


@pytest.mark.parametrize("mode", ["memory", "sampled"])
def test_a_killed_budgeted_run_resumes_bit_identically_with_its_memory(problem, tmp_path, mode):
    budget = {"directions_per_step": 2, "direction_sampling": "balanced", "budget_gradients": mode}
    whole = _trainer(problem, tmp_path / "a.pt", callbacks=[], **budget)
    res = whole.fit()
    killed = _trainer(problem, tmp_path / "b.pt", callbacks=[], **budget)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(callbacks=[StopAfter(5)])                   # last checkpoint at step 3
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert ("grad_memory" in saved) == (mode == "memory")
    resumed = _trainer(problem, tmp_path / "b.pt", callbacks=[], **budget)
    res2 = resumed.fit()
    assert res2.steps == 8 and _timeless(res2.history) == _timeless(res.history)
    last = [torch.load(tmp_path / f, weights_only=True)["alignments"] for f in ("a.pt", "b.pt")]
    for a, b in zip(last[0].values(), last[1].values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if mode == "memory":
        # without its memory the resumed run is another run
        forgetful = _trainer(problem, tmp_path / "c.pt", callbacks=[], **budget)
        forgetful.load_state_dict({**saved, "grad_memory": []})
        res3 = forgetful.fit(resume=False)
        assert [r["train_loss"] for r in res3.history[2:]] != [r["train_loss"] for r in res.history[2:]]


def test_memory_with_grad_accum_and_sync_gradients(problem):
    # at the first step nothing else is stored: the memory's gradient is the sampled directions' summed
    # gradient / 9, where sampled steps on their mean (/ 2): the same direction, 2/9 of the length, with
    # and without micro-batches
    for accum in (1, 2):
        memory = _trainer(problem, directions_per_step=2, direction_sampling="balanced", grad_accum=accum,
                          budget_gradients="memory")
        sampled = _trainer(problem, directions_per_step=2, direction_sampling="balanced", grad_accum=accum,
                           budget_gradients="sampled")
        out_m, out_s = memory.train_step(), sampled.train_step()
        assert out_m.loss == pytest.approx(out_s.loss, rel=1e-6)
        for a, b in zip(memory.alignments.parameters(), sampled.alignments.parameters()):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                torch.testing.assert_close(a.grad * 9 / 2, b.grad, atol=1e-8, rtol=1e-4)
        if accum == 1:
            one = memory
    # sync_gradients (data parallelism) runs once per sampled direction, and the memory keeps what it made
    # sync_gradients (data parallelism) runs once per sampled direction, and the memory keeps what it made
    calls = []

    def doubling(module):
        calls.append(1)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(2)

    synced = _trainer(problem, directions_per_step=2, direction_sampling="balanced", budget_gradients="memory")
    synced.sync_gradients = doubling
    synced.train_step()
    assert len(calls) == 2
    for d in one.grad_memory:
        for i in one.grad_memory[d]:
            for a, b in zip(one.grad_memory[d][i], synced.grad_memory[d][i]):
                torch.testing.assert_close(2 * a, b, atol=1e-7, rtol=1e-5)


def test_budget_gradients_is_validated_and_only_fingerprinted_with_a_budget(problem):
    assert TrainerConfig(budget_gradients="saga").validate() == [
        "train.budget_gradients 'saga' must be memory or sampled"]
    with pytest.raises(ConfigError, match=r"budget_gradients 'saga' must be memory or sampled"):
        MASTrainer(torch.nn.ModuleList(), problem, TrainerConfig(budget_gradients="saga"))
    with pytest.raises(ConfigError, match=r"budget_gradients 'often' must be memory or sampled"):
        config_from_kwargs(models=[{"name": "multiobject-gru-s0"}], train={"budget_gradients": "often"})
    from llm_mas.run import run_fingerprint

    def keys(**train):
        config = config_from_kwargs(models=[{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}],
                                    train=train)
        return run_fingerprint(config)["values"]

    assert "train.budget_gradients" not in keys()
    assert "train.budget_gradients" not in keys(budget_gradients="memory")                 # no budget
    assert "train.budget_gradients" not in keys(directions_per_step=2)                     # sampled: as before
    assert keys(directions_per_step=2, budget_gradients="memory")["train.budget_gradients"] == "memory"
    assert TrainerConfig().budget_gradients == "sampled"
