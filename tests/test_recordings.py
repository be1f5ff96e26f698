"""Recorded systems: a member known only from recorded latents and causal states — the causally
inaccessible side of CLMAS (kind ``recorded``), and a member of RSA / CKA / GPA; the public CL loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_fixtures import STIM, GRUNet, T, decision_trials, train_decision

import llm_mas
from llm_mas import CounterfactualTensors, RecordedSystem, cl_loss
from llm_mas.errors import ConfigError, DataError
from llm_mas.hyperalignment import generalized_procrustes
from llm_mas.recordings import match_states
from llm_mas.similarity import cka, rsa

FIT = {"train": {"max_steps": 150, "batch_size": 128, "eval_every": 50, "lr": 1e-2}, "progress": False}


# ---------------------------------------------------------------------------------- the CL loss, matching
def test_cl_loss_is_half_cosine_distance_plus_mean_squared_error_over_matched_rows():
    h_hat = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    h_cl = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    # row 0: identical -> 0; row 1: orthogonal (cos 0) and squared errors (4 + 4) / 2 = 4 -> ½(1 + 4) = 2.5
    assert float(cl_loss(h_hat[:2], h_cl[:2])) == pytest.approx((0 + 2.5) / 2)
    # row 2 unmatched: left out of the mean
    assert float(cl_loss(h_hat, h_cl, torch.tensor([True, True, False]))) == pytest.approx(1.25)
    assert float(cl_loss(h_hat, h_cl, torch.tensor([False, True, False]))) == pytest.approx(2.5)


def test_match_states_draws_a_row_of_the_wanted_state_and_flags_the_rest():
    natural = np.array([[0, 1], [1, 1], [0, 1], [2, 0]])
    wanted = np.array([[0, 1], [2, 0], [1, 0], [0, 1]])
    pick, matched = match_states(natural, wanted, np.random.default_rng(0))
    assert matched.tolist() == [True, True, False, True]
    assert (natural[pick[matched]] == wanted[matched]).all()
    seen = {int(match_states(natural, wanted[:1], np.random.default_rng(s))[0][0]) for s in range(40)}
    assert seen == {0, 2}                               # uniform over the rows in that state


def test_a_recording_refuses_bad_latents_and_states():
    with pytest.raises(DataError, match=r"shape \(4,\)"):
        RecordedSystem(torch.zeros(4))
    with pytest.raises(DataError, match="NaN or inf"):
        RecordedSystem(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(DataError, match=r"states\['choice'\] has shape \(3, 2\); expected \(2, 5\)"):
        RecordedSystem(torch.zeros(2, 5, 3), {"choice": torch.zeros(3, 2)})
    with pytest.raises(DataError, match="non-integer"):
        RecordedSystem(torch.zeros(2, 3), {"x": torch.tensor([0.5, 1.0])})
    rec = RecordedSystem(torch.zeros(2, 5, 3), {"choice": torch.tensor([0, 1])})
    assert rec.states["choice"].shape == (2, 5) and np.asarray(rec).shape == (10, 3)
    with pytest.raises(DataError, match=r"trial indices at rows \[1\]"):
        rec.inputs([0, 2])


def test_a_recording_round_trips_through_its_file(tmp_path):
    rec = RecordedSystem(torch.randn(3, 4, 2), {"s": torch.arange(12).reshape(3, 4) % 3}, name="v1")
    back = RecordedSystem.load(rec.save(tmp_path / "rec"))
    assert back.name == "v1" and torch.equal(back.latents, rec.latents) and torch.equal(back.states["s"],
                                                                                         rec.states["s"])


# ---------------------------------------------------------------------------------- a recording of a GRU
@pytest.fixture(scope="module")
def gru():
    net = GRUNet(16, seed=0)
    assert train_decision(net, 200, 0) > 0.85
    return net.eval()


def gru_states(net, x):
    with torch.no_grad():
        return net.rnn(x)[0]                                            # (n, T, 16)


def simulated_recording(net, x, choice, *, shuffle: bool, seed: int = 0) -> RecordedSystem:
    """The GRU's states through a random linear map (16 -> 20 units) plus noise; the causal state
    ``choice`` at the first delay step (-1 elsewhere). shuffle: the trials' latents permuted (the states
    no longer belong to them)."""
    g = torch.Generator().manual_seed(seed)
    h = gru_states(net, x)
    latents = h @ torch.randn(16, 20, generator=g) / 4
    latents = latents + 0.05 * latents.std() * torch.randn(latents.shape, generator=g)
    if shuffle:
        latents = latents[torch.randperm(len(latents), generator=g)]
    states = torch.full((len(x), T), -1)
    states[:, STIM] = choice
    return RecordedSystem(latents, {"choice": states}, name="shuffled" if shuffle else "recording")


def clmas_data(net, n=400, seed=3, shuffle=False):
    """Random base and source trials (their choices agree in about half the rows, so neither keeping nor
    flipping the base's choice scores above ~0.5); the GRU swaps its state at the first delay step and must
    give the source's choice; the recording (trials: the bases, then the sources) is CL-trained towards a
    recorded latent of the source's choice."""
    rng = np.random.default_rng(seed)
    xb, yb = decision_trials(n, rng)
    xs, ys = decision_trials(n, rng)
    rec = simulated_recording(net, torch.cat([xb, xs]), torch.cat([yb, ys]), shuffle=shuffle)
    labels = torch.full((n, T), -100)
    labels[:, -1] = ys
    pos = torch.full((n,), STIM)
    trials = torch.arange(n)
    data = CounterfactualTensors(base=[xb, rec.inputs(trials)], source=[xs, rec.inputs(n + trials)],
                                 base_positions=pos, source_positions=pos, labels=[labels, ys])
    return rec, data


def test_clmas_recovers_a_recording_of_the_gru_and_not_a_shuffled_one(gru, tmp_path):
    out = {}
    for shuffle in (False, True):
        rec, data = clmas_data(gru, shuffle=shuffle)
        res = llm_mas.compare(models=[gru, rec], data=data, site=["rnn", "latents"], k=1, out_dir=str(tmp_path),
                              names=["gru", rec.name], cl={"inaccessible": [1], "epsilon": 0.5}, **FIT)
        out[shuffle] = {(r.source_index, r.target_index): r for r in res.records}
    real, shuffled = out[False], out[True]
    assert real[(0, 1)].trained_by == "cl" and real[(1, 0)].trained_by == "behaviour"
    assert real[(0, 1)].cl_unmatched == 0 and real[(0, 1)].n_pairs == 80
    # the recording's latent, swapped into the GRU, carries the choice; the GRU's, swapped into the
    # recording, lands nearest the recorded latents of the intended choice
    assert real[(1, 0)].trial_iia > 0.85 and real[(0, 1)].trial_iia > 0.85, real
    assert shuffled[(1, 0)].trial_iia < 0.75 and shuffled[(0, 1)].trial_iia < 0.75, shuffled
    assert real[(0, 1)].cl_loss < 0.5 * shuffled[(0, 1)].cl_loss, (real[(0, 1)].cl_loss, shuffled[(0, 1)].cl_loss)


def test_a_recorded_target_needs_cl_and_intended_states(gru, tmp_path):
    rec, data = clmas_data(gru, n=60)
    with pytest.raises(ConfigError, match="model 0 .* is not a recorded system"):
        llm_mas.compare(models=[gru, rec], data=data, site=["rnn", "latents"], k=1, out_dir=str(tmp_path),
                        cl={"inaccessible": [0]}, **FIT)
    with pytest.raises(ConfigError, match="no state"):
        llm_mas.compare(models=[gru, rec], data=data, site=["rnn", "latents"], k=1, out_dir=str(tmp_path),
                        cl={"inaccessible": [1], "match_on": ["coherence"]}, **FIT)


# ---------------------------------------------------------------------------------- RSA / CKA / GPA
def test_a_recording_is_a_member_of_rsa_cka_and_gpa(gru):
    x, _ = decision_trials(60, np.random.default_rng(1))
    h = gru_states(gru, x)                                               # (60, T, 16)
    X = h.reshape(-1, 16).double().numpy()
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rotated = RecordedSystem(h.double() @ q)
    assert cka(X, rotated) == pytest.approx(1.0, abs=1e-9)               # invariant to an orthogonal map
    assert rsa(X, rotated, metric="euclidean") == pytest.approx(1.0, abs=1e-9)
    assert rsa(X, rotated, metric="cosine") == pytest.approx(1.0, abs=1e-9)
    gpa = generalized_procrustes([X, rotated])
    assert gpa.residuals[-1] < 1e-12 * float((X ** 2).sum())                 # ~0 against the data's scale
    np.testing.assert_allclose(gpa.transform(1, rotated), gpa.transform(0, X), atol=1e-9)
    choice = torch.zeros(60, dtype=torch.long)
    noisy = simulated_recording(gru, x, choice, shuffle=False)
    shuffled = simulated_recording(gru, x, choice, shuffle=True)
    c_noisy, c_shuffled = cka(X, noisy), cka(X, shuffled)
    assert 0.6 < c_noisy < 1.0 and c_shuffled < c_noisy - 0.2, (c_noisy, c_shuffled)
    assert rsa(X, noisy) > rsa(X, shuffled) + 0.2


def test_a_recording_in_a_config_runs_and_its_run_is_reevaluated_from_the_files(gru, tmp_path):
    """kind: recorded by path; the tensors a directory; evaluate reloads the recording (data) by its path and
    takes the GRU as an object (a module is never rebuilt from the run)."""
    from safetensors.torch import save_file

    from llm_mas.run import run
    from llm_mas.run_config import load_mas_config

    rec, data = clmas_data(gru, n=200)
    rec.save(tmp_path / "rec")
    data.save(tmp_path / "cf")
    save_file(gru.state_dict(), str(tmp_path / "gru.safetensors"))
    base = {"name": "cfg", "out_dir": str(tmp_path), "progress": False, "k": 1,
            "models": [{"kind": "module", "name": "gru", "site": "rnn", "factory": "open_fixtures:gru_net",
                        "kwargs": {"hidden": 16}, "weights": str(tmp_path / "gru.safetensors")},
                       {"kind": "recorded", "name": "v1", "path": str(tmp_path / "rec")}],
            "data": {"dataset": str(tmp_path / "cf")}, "cl": {"inaccessible": [1], "epsilon": 0.5},
            "train": {"max_steps": 60, "batch_size": 64, "eval_every": 30, "lr": 1e-2}}
    res = run(load_mas_config(None, [], base=base), log=lambda s: None)
    values = __import__("json").loads((tmp_path / "cfg" / "fingerprint.json").read_text())["values"]
    assert values["models.1.kind"] == "recorded" and len(values["models.1.latents"]) == 16
    again = llm_mas.evaluate(tmp_path / "cfg", models=[gru, None], data=tmp_path / "cf", log=lambda s: None)
    by = {(r.source_index, r.target_index): r for r in again.records}
    assert by[(0, 1)].trained_by == "cl" and by[(0, 1)].n_pairs == 200 - by[(0, 1)].cl_unmatched
    assert res.records[0].n_pairs == 40
    with pytest.raises(ConfigError, match="models.1.path"):
        run(load_mas_config(None, ["name=bad", "models.1.path=/nonexistent"], base=base), log=lambda s: None)
