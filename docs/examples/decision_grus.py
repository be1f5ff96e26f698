"""Do two GRUs trained on a perceptual decision task carry the choice (and the evidence) the same way?

A NeuroGym-style PerceptualDecisionMaking task simulated with numpy (inputs (B, T, 3): fixation, evidence
for left, evidence for right), two plain 64-unit torch GRUs, and MAS through `llm_mas.compare`.
    python docs/examples/decision_grus.py      # ~10 min on one CPU thread

Measured (one run, seed 0; 3000 rows per dataset, 600 of them valid): accuracy 0.977 / 0.984; the choice at
the first delay step, trial IIA s0->s1 / s1->s0: k = 1 0.993 / 0.998, k = 8 0.995 / 0.993; the accumulated
evidence mid-stimulus, k = 1: 0.987 / 0.988; random alignments (k = 8, untrained) 0.02-0.04; an untrained
GRU as source into gru-s1 at k = 8: choice 0.963, evidence 0.660.
"""
import numpy as np
import torch
from torch import nn

import llm_mas

FIX, STIM, DELAY, DECIDE = 2, 10, 3, 2
T = FIX + STIM + DELAY + DECIDE


def trials(n, rng):
    """Inputs (n, T, 3), per-step evidence (n, STIM), the ideal observer's choice (n,) (0 left, 1 right)."""
    side = rng.integers(0, 2, n)
    coherence = rng.choice([0.0, 0.032, 0.064, 0.128, 0.256, 0.512], n) * np.where(side == 1, 1, -1)
    noise = rng.normal(0, 1, (n, STIM, 2))
    x = np.zeros((n, T, 3), np.float32)
    x[:, :FIX + STIM + DELAY, 0] = 1
    x[:, FIX:FIX + STIM, 1] = (1 - coherence[:, None]) / 2 + noise[..., 0]
    x[:, FIX:FIX + STIM, 2] = (1 + coherence[:, None]) / 2 + noise[..., 1]
    evidence = x[:, FIX:FIX + STIM, 2] - x[:, FIX:FIX + STIM, 1]
    return torch.tensor(x), evidence, (evidence.sum(1) > 0).astype(np.int64)


class GRUNet(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn, self.head = nn.GRU(3, 64, batch_first=True), nn.Linear(64, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def train(net, rng, steps=1500):
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        x, _, y = trials(64, rng)
        target = torch.tensor(y).repeat_interleave(DECIDE)
        loss = nn.functional.cross_entropy(net(x)[:, -DECIDE:].reshape(-1, 2), target)
        opt.zero_grad(), loss.backward(), opt.step()
    x, _, y = trials(5000, rng)
    with torch.no_grad():
        return float((net(x)[:, -1].argmax(-1).numpy() == y).mean())


def counterfactuals(rng, step, n=3000):
    """Swap the state after input `step`; the label: the choice of the source's evidence up to `step`
    followed by the base's after it. Only rows where that differs from the base's own choice."""
    xb, eb, yb = trials(4 * n, rng)
    xs, es, _ = trials(4 * n, rng)
    k = min(step - FIX + 1, STIM)
    y = ((es[:, :k].sum(1) + eb[:, k:].sum(1)) > 0).astype(np.int64)
    keep = np.flatnonzero(y != yb)[:n]
    labels = torch.full((len(keep), T), -100)
    labels[:, -DECIDE:] = torch.tensor(y[keep])[:, None]
    pos = torch.full((len(keep),), step)
    return llm_mas.CounterfactualTensors(base=xb[keep], source=xs[keep], base_positions=pos,
                                         source_positions=pos, labels=labels)


rng = np.random.default_rng(0)
nets = [GRUNet(seed) for seed in (0, 1)]
print("accuracy", [round(train(net, rng), 3) for net in nets])
choice, evidence = counterfactuals(rng, FIX + STIM), counterfactuals(rng, FIX + STIM // 2)
fit = {"train": {"max_steps": 600, "batch_size": 256, "lr": 1e-2, "eval_every": 100}, "progress": False}
for label, data, k, options in [("choice, k=1", choice, 1, fit), ("choice, k=8", choice, 8, fit),
                                ("evidence, k=1", evidence, 1, fit),
                                ("choice, random alignments k=8", choice, 8, {"train": {"max_steps": 0}})]:
    res = llm_mas.compare(models=nets, data=data, site="rnn", k=k, names=["gru-s0", "gru-s1"], **options)
    print(label, "\n", res.table())
untrained = GRUNet(7)
for label, data in [("choice", choice), ("evidence", evidence)]:
    res = llm_mas.compare(models=[untrained, nets[1]], data=data, site="rnn", k=8,
                          names=["untrained", "gru-s1"], directions=[[0, 1]], **fit)
    print(f"untrained GRU -> trained, {label}, k=8: {res.matrix()[0, 1]:.3f}")
