"""The open runner: any torch module on counterfactual tensors, through compare(), configs (kind: module),
a user-registered kind (config and CLI), the recurrent state of a plain nn.GRU at a step, the tensor
dataset's files and checks, and the trainer's refusal of another problem's checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from open_fixtures import STIM, GRUNet, T, decision_data, decision_trials, train_decision
from torch import nn

import llm_mas
from llm_mas import CounterfactualTensors
from llm_mas.backends import Edit, TorchHookBackend
from llm_mas.errors import ConfigError, DataError
from llm_mas.models.recurrent import SteppedRNN, stepped_site
from llm_mas.run import build_problem, run
from llm_mas.run_config import config_from_kwargs, load_mas_config
from llm_mas.sites import Site
from llm_mas.tasks.tensor_data import RegressionScorer

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False}


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def grus():
    """Two GRUs (different seeds) trained on the choice; accuracy is checked (the task is learnable)."""
    nets = [GRUNet(24, seed) for seed in (0, 1)]
    accuracy = [train_decision(net, 250, seed) for seed, net in enumerate(nets)]
    assert min(accuracy) > 0.85, accuracy
    return [net.eval() for net in nets]


# ---------------------------------------------------------------------------------- recurrent state at a step
def test_a_site_at_an_nn_gru_edits_the_state_the_recurrence_continues_from():
    torch.manual_seed(0)
    net = GRUNet(8, seed=3).eval()
    x = torch.randn(3, T, 3)
    view, site = stepped_site(net, "rnn")
    assert str(site) == "rnn.hook:output@given" and isinstance(view.rnn, SteppedRNN)
    assert isinstance(net.rnn, nn.GRU)  # the user's module is not changed
    with torch.no_grad():
        torch.testing.assert_close(view(x), net(x), rtol=0, atol=0)
        latents = TorchHookBackend().collect(view, x, [site])[str(site)]
        torch.testing.assert_close(latents, net.rnn(x)[0], rtol=0, atol=0)
        # replace row 1's state at step 5 by v; by hand: run to step 5, swap the state, continue
        v = torch.randn(8)
        mask = torch.zeros(3, T, dtype=torch.bool)
        mask[1, 5] = True
        patched = TorchHookBackend().patch(view, x, [Edit(site, mask, lambda h, which: v.expand_as(h))])
        out1, h = net.rnn(x[:, :6])
        out1 = out1.clone()
        out1[1, 5] = v
        h = h.clone()
        h[0, 1] = v
        out2, _ = net.rnn(x[:, 6:], h)
        torch.testing.assert_close(patched, net.head(torch.cat([out1, out2], 1)), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(patched[1, -1], net(x)[1, -1])      # the edit reached the last step
        torch.testing.assert_close(patched[[0, 2]], net(x)[[0, 2]], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- the dataset
def test_counterfactual_tensors_save_load_and_digest(tmp_path):
    rng = np.random.default_rng(0)
    n = 10
    ids = torch.tensor(rng.integers(1, 9, (n, 6)))
    cont = torch.randn(n, 6, 3)
    data = CounterfactualTensors(
        base=[cont, {"x": cont, "mask": torch.ones(n, 6, dtype=torch.bool)}, ids],
        source=[cont, {"x": cont.flip(0), "mask": torch.ones(n, 6, dtype=torch.bool)}, ids.flip(0)],
        base_positions=torch.stack([torch.tensor(rng.integers(0, 6, n)), torch.full((n,), -1)], 1),
        source_positions=torch.stack([torch.arange(n) % 6, torch.full((n,), -1)], 1),
        labels=torch.randn(n, 6), scorer="regression", scorer_options={"tolerance": 0.5}, variable="evidence")
    assert data.problems(3) == []
    data.save(tmp_path / "cf")
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["data.json", "data.safetensors"]
    back = CounterfactualTensors.load(tmp_path / "cf")
    assert back.digest() == data.digest()
    assert back.variable == "evidence" and back.make_scorer().tolerance == 0.5
    torch.testing.assert_close(back.base[1]["x"], cont, rtol=0, atol=0)
    assert back.base[1]["mask"].dtype == torch.bool and torch.equal(back.source[2], ids.flip(0))
    back.labels[3, 2] += 1.0
    assert back.digest() != data.digest()


def test_counterfactual_tensors_report_every_problem_at_once_naming_rows_and_fields():
    n = 8
    labels = torch.full((n, 5), -100)
    labels[:, -1] = 1
    labels[[2, 6]] = -100                                     # rows 2 and 6 score nothing
    pos = torch.tensor([0, 1, 2, 9, 3, 4, -1, 1])             # row 3 beyond T=5, row 6 no position
    data = CounterfactualTensors(base=torch.randn(n, 5, 3), source=torch.randn(n + 1, 5, 3),
                                 base_positions=pos, source_positions=pos, labels=labels)
    with pytest.raises(DataError) as err:
        data.validate()
    message = str(err.value)
    assert "source: 9 rows" in message and "shape (9, 5, 3)" in message   # a shape problem stops the row checks
    data.source = torch.randn(n, 5, 3)
    with pytest.raises(DataError) as err:
        data.validate()
    message = str(err.value)
    for words in ["base_positions: row 3 hold positions outside 0..4", "source_positions: row 3",
                  "base_positions: row 6 have no position", "labels: rows 2, 6 score nothing (every label -100)"]:
        assert words in message, message
    wrong = CounterfactualTensors(base=torch.randn(n, 5, 3), source=torch.randn(n, 5, 3), base_positions=pos.float(),
                                  source_positions=pos, labels=torch.randn(n, 5))
    problems = wrong.problems()
    assert any("base_positions: dtype torch.float32" in p for p in problems)
    assert any("labels: dtype torch.float32: cross-entropy labels are class indices" in p for p in problems)


def test_regression_scorer_by_hand():
    scorer = RegressionScorer(tolerance=0.25)
    output = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([[0.2, float("nan"), 2.5], [1.0, 0.8, float("nan")]])
    loss, correct, scored = scorer(output, labels)
    torch.testing.assert_close(loss, torch.tensor([0.04 + 0.25, 0.04]))
    assert correct.tolist() == [1.0, 2.0] and scored.tolist() == [2.0, 2.0]
    torch.testing.assert_close(scorer.scored(labels), torch.tensor([2, 2]))


# ---------------------------------------------------------------------------------- any module through compare
def test_two_user_grus_align_on_the_choice_and_random_alignments_do_not(grus, tmp_path):
    data = decision_data()
    common = dict(data=data, site="rnn", k=1, names=["gru-a", "gru-b"], out_dir=str(tmp_path), **QUIET)
    untrained = llm_mas.compare(models=grus, train={"max_steps": 0}, name="random", **common)
    trained = llm_mas.compare(models=grus, train={"max_steps": 150, "batch_size": 128, "eval_every": 50,
                                                  "lr": 1e-2}, name="trained", **common)
    random_iia, iia = untrained.matrix(), trained.matrix()
    assert (random_iia < 0.2).all(), random_iia          # a random 1-d swap leaves the base's own choice
    assert iia[0, 1] > 0.9 and iia[1, 0] > 0.9, iia      # the choice at the delay is one aligned coordinate
    run_dir = tmp_path / "trained"
    assert {"config.yaml", "fingerprint.json", "results.json", "alignments.safetensors", "iia_matrix.png",
            "summary.json", "history.csv"} <= {p.name for p in run_dir.iterdir()}
    values = json.loads((run_dir / "fingerprint.json").read_text())["values"]
    assert values["models.0.kind"] == "module" and values["models.0.class"] == "GRUNet"
    assert values["models.0.weights"] != values["models.1.weights"]
    assert values["data.tensors"] == data.digest()
    config_text = (run_dir / "config.yaml").read_text()
    assert "module:" not in config_text and "kind: module" in config_text   # no Python object in the YAML
    assert config_text.startswith("# run from Python objects") and "llm_mas.compare" in config_text.splitlines()[0]
    record = trained.records[1]
    assert record.n_pairs == 120 and record.n_tokens == 120 and record.trial_iia_ci[0] <= record.trial_iia


def test_a_module_config_reads_factory_and_weights_and_matches_the_objects(grus, tmp_path):
    from safetensors.torch import save_file

    data = decision_data(n=300)
    data.save(tmp_path / "cf")
    for i, net in enumerate(grus):
        save_file(net.state_dict(), str(tmp_path / f"gru{i}.safetensors"))
    settings = {"k": 2, "train": {"max_steps": 20, "batch_size": 64, "eval_every": 10}, **QUIET}
    base = {"name": "from-config", "out_dir": str(tmp_path), "data": {"dataset": str(tmp_path / "cf")},
            "models": [{"kind": "module", "name": f"gru-{i}", "site": "rnn", "factory": "open_fixtures:gru_net",
                        "kwargs": {"hidden": 24, "seed": i}, "weights": str(tmp_path / f"gru{i}.safetensors")}
                       for i in range(2)], **settings}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base))
    from_config = run(load_mas_config(path), log=lambda s: None)
    from_objects = llm_mas.compare(models=grus, data=data, site="rnn", names=["gru-0", "gru-1"], name="objects",
                                   out_dir=str(tmp_path), **settings)
    assert [r.trial_iia for r in from_config.records] == [r.trial_iia for r in from_objects.records]
    assert [r.loss for r in from_config.records] == [r.loss for r in from_objects.records]
    values = json.loads((tmp_path / "from-config" / "fingerprint.json").read_text())["values"]
    assert values["models.0.factory"] == "open_fixtures:gru_net" and len(values["models.0.weights"]) == 16


# ---------------------------------------------------------------------------------- a user-registered kind
def _toy_config(tmp_path, name: str) -> dict:
    decision_data(n=200).save(tmp_path / "cf")
    return {"name": name, "out_dir": str(tmp_path), "plugins": ["open_fixtures"], "k": 2,
            "data": {"dataset": str(tmp_path / "cf")}, "train": {"max_steps": 4, "batch_size": 32}, **QUIET,
            "models": [{"kind": "toy", "name": "toy-a", "seed": 0, "train_steps": 20},
                       {"kind": "toy", "name": "toy-b", "seed": 1, "train_steps": 20}]}


def _check_toy_run(run_dir: Path) -> None:
    values = json.loads((run_dir / "fingerprint.json").read_text())["values"]
    assert values["models.1.kind"] == "toy" and values["models.1.recipe"] == "GRUNet(24, seed=1), 20 steps"
    assert values["plugins.0"] == "open_fixtures"
    assert len(json.loads((run_dir / "results.json").read_text())) == 4


def test_a_user_registered_kind_runs_through_a_config(tmp_path):
    config = _toy_config(tmp_path, "toy-run")
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    run(load_mas_config(path), log=lambda s: None)
    _check_toy_run(tmp_path / "toy-run")
    # an unknown key of the kind's own schema is reported like any other
    bad = {**config, "models": [{"kind": "toy", "name": "toy-a", "sede": 0}]}
    with pytest.raises(ConfigError, match="unknown key 'models.0.sede'"):
        load_mas_config(None, [], base=bad)
    with pytest.raises(ConfigError, match="plugins: 'no_such_plugin' does not import"):
        load_mas_config(None, [], base={**config, "plugins": ["no_such_plugin"]})


@pytest.mark.slow
def test_a_user_registered_kind_runs_through_the_cli(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(_toy_config(tmp_path, "toy-cli")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "llm_mas.cli", "mas", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_toy_run(tmp_path / "toy-cli")


def test_register_problem_makes_a_kind_configs_accept(tmp_path):
    from llm_mas.problems import PROBLEMS, TensorProblem, register_problem
    from llm_mas.problems.tensors import TensorModelEntry

    def build(config, *, shard=None, log=None):
        entries = []
        for m in config.models:
            net = GRUNet(m.options.get("hidden", 16), m.options.get("seed", 0)).eval().requires_grad_(False)
            view, site = stepped_site(net, m.site)
            entries.append(TensorModelEntry(m.name, view, site, 16, TorchHookBackend(), torch.device("cpu")))
        return TensorProblem(entries, decision_data(n=100), config.k, train_directions=config.train_directions())

    if "neurogym_like" not in PROBLEMS:
        register_problem("neurogym_like", build)
    cfg = load_mas_config(None, ["train.max_steps=1", "k=2", f"out_dir={tmp_path}", "progress=false"], base={
        "name": "ng", "models": [{"kind": "neurogym_like", "name": "a", "site": "rnn", "options": {"seed": 0}},
                                 {"kind": "neurogym_like", "name": "b", "site": "rnn", "options": {"seed": 1}}]})
    assert cfg.kind == "neurogym_like"
    result = run(cfg, log=lambda s: None)
    assert result.matrix().shape == (2, 2) and (tmp_path / "ng" / "results.json").exists()


# ---------------------------------------------------------------------------------- the trainer's guard
def test_the_trainer_alone_refuses_a_checkpoint_of_another_k_or_data(tmp_path):
    from llm_mas.run import build_alignments
    from llm_mas.trainer import MASTrainer, TrainerConfig

    def trainer_for(k, data):
        cfg = config_from_kwargs(k=k, progress=False, data={"tensors": data}, models=[
            {"kind": "module", "name": "a", "factory": "open_fixtures:gru_net", "site": "rnn"},
            {"kind": "module", "name": "b", "factory": "open_fixtures:gru_net", "site": "rnn", "kwargs": {"seed": 1}}])
        problem = build_problem(cfg)
        return MASTrainer(build_alignments(cfg, problem), problem, TrainerConfig(max_steps=2, batch_size=32),
                          checkpoint_path=tmp_path / "checkpoint.pt", progress=False)

    data = decision_data(n=100)
    trainer_for(1, data).fit()
    assert trainer_for(1, data).try_resume()
    with pytest.raises(ConfigError) as err:
        trainer_for(8, data).try_resume()
    assert "k: 1 -> 8" in str(err.value) and "blocks" in str(err.value)
    with pytest.raises(ConfigError, match="data: "):
        trainer_for(1, decision_data(n=100, seed=6)).try_resume()


# ---------------------------------------------------------------------------------- correlative reach
def test_collect_rows_and_similarity_take_continuous_inputs_and_any_module(tmp_path):
    from safetensors.torch import save_file

    from llm_mas.correlative import collect_rows, run_similarity, similarity_config

    nets = [GRUNet(8, 0).eval(), GRUNet(8, 1).eval()]
    x, _ = decision_trials(20, np.random.default_rng(0))
    rows = collect_rows(nets, "rnn", x, batch_size=7)
    assert len(rows) == 20 * T and rows.sites == ["rnn.hook:output@given"] * 2
    with torch.no_grad():
        np.testing.assert_array_equal(rows.latents[1], nets[1].rnn(x)[0].reshape(-1, 8).numpy())
    assert (rows.token_id == -1).all() and rows.position[:T].tolist() == list(range(T))
    save_file(nets[0].state_dict(), str(tmp_path / "a.safetensors"))
    save_file({"inputs": x}, str(tmp_path / "inputs.safetensors"))
    entry = {"kind": "module", "name": "a", "site": "rnn", "factory": "open_fixtures:gru_net",
             "kwargs": {"hidden": 8, "seed": 0}, "weights": str(tmp_path / "a.safetensors")}
    cfg = similarity_config(models=[entry, {**entry, "name": "a-again"}], sequences={"file": str(tmp_path / "inputs.safetensors")},
                            n_rows=100, n_repeats=2, out_dir=str(tmp_path))
    result = run_similarity(cfg, log=lambda s: None)
    metrics = result["pairs"][0]["metrics"]
    assert result["n_sequences"] == 20 and result["n_rows_total"] == 20 * T
    for key in ("cka_biased", "rsa_cosine_pearson", "rsa_euclidean_spearman"):   # a model against itself
        assert metrics[key]["mean"] == pytest.approx(1.0, abs=1e-5), key


def test_kinds_mix_on_tensors_with_inputs_and_labels_per_model(tmp_path):
    """A shipped task model (token ids of its task), a tiny HF LM (its own token ids) and a user module
    (continuous inputs) on one tensor dataset: each model reads its own inputs and labels."""
    from llm_fixtures import tiny_qwen2_dir

    from llm_mas.tasks import get_task

    rng = np.random.default_rng(0)
    n, t_len = 40, 6
    vocab = len(get_task("multiobject").vocab)
    task_ids = torch.tensor(rng.integers(1, vocab, (2, n, t_len)))
    lm_ids = torch.tensor(rng.integers(1, 512, (2, n, t_len)))
    cont = torch.randn(2, n, t_len, 3)
    labels = [torch.full((n, t_len), -100) for _ in range(3)]
    labels[0][:, -1] = torch.tensor(rng.integers(1, vocab, n))
    labels[1][:, -1] = torch.tensor(rng.integers(1, 512, n))
    labels[2][:, -1] = torch.tensor(rng.integers(0, 2, n))
    pos = torch.full((n,), 2)
    data = CounterfactualTensors(base=[task_ids[0], lm_ids[0], cont[0]], source=[task_ids[1], lm_ids[1], cont[1]],
                                 base_positions=pos, source_positions=pos, labels=labels)
    models = [{"kind": "task", "name": "multiobject-gru-s0", "site": "hidden"},
              {"kind": "hf", "name": str(tiny_qwen2_dir(0)), "site": "layer0"},
              GRUNet(8, 0)]
    result = llm_mas.compare(models=models, data=data, site="rnn", k=4, name="mixed", out_dir=str(tmp_path),
                             train={"max_steps": 2, "batch_size": 16}, **QUIET)
    assert result.models == ["multiobject-gru-s0", "model", "GRUNet"]
    assert result.matrix().shape == (3, 3) and all(r.n_tokens == 8 for r in result.records)
    values = json.loads((tmp_path / "mixed" / "fingerprint.json").read_text())["values"]
    assert {"models.0.model.safetensors", "models.1.weights", "models.2.weights"} <= set(values)


class _CellLoop(nn.Module):
    """A user's own step loop (nn.GRUCell) calling a HookPoint on its state each step, as the README says."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.cell, self.head, self.hook = nn.GRUCell(3, 6), nn.Linear(6, 2), llm_mas.HookPoint()

    def forward(self, x):
        h, outs = x.new_zeros(x.shape[0], 6), []
        for t in range(x.shape[1]):
            h = self.hook(self.cell(x[:, t], h)[:, None], torch.tensor([t]))[:, 0]
            outs.append(self.head(h))
        return torch.stack(outs, 1)


def test_a_hookpoint_in_a_users_step_loop_is_a_site_whose_edit_feeds_the_loop():
    net = _CellLoop().eval()
    x = torch.randn(2, 5, 3)
    v = torch.randn(6)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = True
    with torch.no_grad():
        states = TorchHookBackend().collect(net, x, ["hook"])["hook:output@given"]          # (2, 5, 6)
        patched = TorchHookBackend().patch(net, x, [Edit(Site.parse("hook"), mask, lambda h, which: v.expand_as(h))])
        # by hand: row 0's state becomes v after step 2 and the loop continues from it
        expected = [net.head(states[0, t]) for t in range(2)] + [net.head(v)]
        h = v
        for t in range(3, 5):
            h = net.cell(x[0, t][None], h[None])[0]
            expected.append(net.head(h))
    torch.testing.assert_close(patched[0], torch.stack(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(patched[1], net(x)[1], rtol=0, atol=0)


class _TwoInputs(nn.Module):
    """Inputs as named tensors: model(evidence=(B, T, 2), cue=(B, T))."""

    def __init__(self, seed: int):
        super().__init__()
        self.net = GRUNet(8, seed)

    def forward(self, evidence, cue):
        return self.net(torch.cat([evidence, cue[..., None]], -1))


def test_dict_inputs_reach_the_module_as_keyword_arguments(tmp_path):
    x, _ = decision_trials(60, np.random.default_rng(1))
    base = {"evidence": x[:30, :, :2], "cue": x[:30, :, 2]}
    source = {"evidence": x[30:, :, :2], "cue": x[30:, :, 2]}
    labels = torch.full((30, T), -100)
    labels[:, -1] = 1
    pos = torch.full((30,), STIM)
    data = CounterfactualTensors(base=base, source=source, base_positions=pos, source_positions=pos, labels=labels)
    result = llm_mas.compare(models=[_TwoInputs(0), _TwoInputs(1)], data=data, site="net.rnn", k=2, name="dict",
                             out_dir=str(tmp_path), train={"max_steps": 2, "batch_size": 8}, **QUIET)
    assert [r.n_pairs for r in result.records] == [6] * 4


@pytest.mark.parametrize("cls", [nn.LSTM, nn.RNN])
def test_stepped_multilayer_rnns_edit_the_top_layer_state_and_keep_the_rest(cls):
    """Two layers, time-major (batch_first=False): the edit replaces the top layer's h at the step (an LSTM's
    cell state c is kept) and the recurrence continues from it; no edit: the outputs are the module's own."""
    torch.manual_seed(1)
    rnn = cls(3, 5, num_layers=2).eval()
    model = nn.Sequential()
    model.add_module("rnn", rnn)
    x = torch.randn(T, 2, 3)                        # (T, B, n_in)
    view, site = stepped_site(model, "rnn")
    v = torch.randn(5)
    mask = torch.zeros(2, T, dtype=torch.bool)      # masks are (B, T) whatever the module's layout
    mask[1, 3] = True
    with torch.no_grad():
        out, state = view(x)
        ref_out, ref_state = rnn(x)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        patched = TorchHookBackend().patch(view, x, [Edit(site, mask, lambda h, which: v.expand_as(h))])
        first, state = rnn(x[:4])
        first = first.clone()
        first[3, 1] = v
        if isinstance(state, tuple):
            h, c = state[0].clone(), state[1]
            h[-1, 1] = v
            state = (h, c)
        else:
            state = state.clone()
            state[-1, 1] = v
        rest, _ = rnn(x[4:], state)
    torch.testing.assert_close(patched, torch.cat([first, rest]), rtol=1e-6, atol=1e-6)


class _Readout(nn.Module):
    """Per-step linear encoder and a scalar readout: model(x (B, T, 3)) -> (B, T, 1); site "enc"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.enc, self.out = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.enc(x))


@pytest.mark.parametrize("scorer", ["regression", "open_fixtures:SignScorer"])
def test_a_full_swap_into_the_same_model_gives_the_sources_output_under_any_scorer(scorer, tmp_path):
    """k = d on a model with itself: h' = A⁻¹(A h_s) = h_s for any orthogonal A, so the target's output at the
    swapped step is the source's own output there (hand-computed labels): trial IIA 1 without training."""
    net = _Readout().eval()
    x_base, x_source = torch.randn(50, 4, 3), torch.randn(50, 4, 3)
    with torch.no_grad():
        y = net(x_source)[:, 2, 0]                                 # the source's output at step 2
    labels = torch.full((50, 4), float("nan") if scorer == "regression" else 0.0)
    labels[:, 2] = y if scorer == "regression" else torch.sign(y)
    data = CounterfactualTensors(base=x_base, source=x_source, base_positions=torch.full((50,), 2),
                                 source_positions=torch.full((50,), 2), labels=labels, scorer=scorer,
                                 scorer_options={"tolerance": 1e-5} if scorer == "regression" else {})
    data.save(tmp_path / "cf")
    data = CounterfactualTensors.load(tmp_path / "cf")
    result = llm_mas.compare(models=[net], data=data, site="enc", k=4, directions="self", name="full-swap",
                             out_dir=str(tmp_path), train={"max_steps": 0}, **QUIET)
    record = result.records[0]
    assert record.trial_iia == 1.0 and record.n_tokens == 10      # 10 valid rows, one scored label each
    assert record.loss == pytest.approx(0.0, abs=1e-9) if scorer == "regression" else record.loss >= 0
    if scorer == "regression":   # the base's own output is not the label: a partial swap (k = 1) fails some rows
        partial = llm_mas.compare(models=[net], data=data, site="enc", k=1, directions="self", name="partial",
                                  out_dir=str(tmp_path), train={"max_steps": 0}, **QUIET)
        assert partial.records[0].trial_iia < 1.0
