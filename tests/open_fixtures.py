"""User-side code the open-runner tests import by name (as a user's config would): a GRU on continuous
inputs, its factory, a perceptual-decision task generated with numpy, and a plugin registering a model kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from llm_mas.tasks.tensor_data import CounterfactualTensors

T, STIM, N_IN = 14, 8, 3


def decision_trials(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, T, 3): fixation (1 during the stimulus), noisy evidence (steps 0..STIM-1), a go cue at the
    last step; the choice (n,): the sign of the summed evidence (1 = positive)."""
    coherence = rng.choice([-0.4, -0.2, 0.2, 0.4], n)
    evidence = coherence[:, None] + rng.normal(0, 1, (n, STIM))
    x = np.zeros((n, T, N_IN), np.float32)
    x[:, :STIM, 0] = 1.0
    x[:, :STIM, 1] = evidence
    x[:, -1, 2] = 1.0
    return torch.tensor(x), torch.tensor((evidence.sum(1) > 0).astype(np.int64))


class GRUNet(nn.Module):
    """A plain user GRU: nn.GRU over continuous inputs, a linear readout at every step (no HookPoints)."""

    def __init__(self, hidden: int = 24, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.GRU(N_IN, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def gru_net(hidden: int = 24, seed: int = 0) -> GRUNet:
    """The factory a `kind: module` config names (``open_fixtures:gru_net``)."""
    return GRUNet(hidden, seed)


def train_decision(net: nn.Module, steps: int, seed: int) -> float:
    """Train on the choice at the last step; returns held-out accuracy."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        x, y = decision_trials(128, rng)
        loss = nn.functional.cross_entropy(net(x)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = decision_trials(1000, rng)
    with torch.no_grad():
        return float((net(x)[:, -1].argmax(-1) == y).float().mean())


# ---------------------------------------------------------------------------------- a user's model kind
def decision_data(n: int = 600, seed: int = 5, position: int = STIM) -> CounterfactualTensors:
    """Rows whose base and source choices differ; swap the state at `position` (the first delay step);
    the target must then give the source's choice at the last step."""
    rng = np.random.default_rng(seed)
    xb, yb = decision_trials(3 * n, rng)
    xs, ys = decision_trials(3 * n, rng)
    keep = torch.nonzero(yb != ys).flatten()[:n]
    labels = torch.full((len(keep), T), -100)
    labels[:, -1] = ys[keep]
    pos = torch.full((len(keep),), position)
    return CounterfactualTensors(base=xb[keep], source=xs[keep], base_positions=pos, source_positions=pos,
                                 labels=labels, info={"task": "decision", "position": position})


def _register_toy_kind() -> None:
    """``kind: toy``: a GRUNet built from (hidden, seed) and trained briefly at load time; importing this
    module (``plugins: [open_fixtures]`` in a config) registers it."""
    from llm_mas.backends import TorchHookBackend
    from llm_mas.models.recurrent import stepped_site
    from llm_mas.problems.kinds import KINDS, LoadedModel, ModelConfigBase, ModelKind, register_kind
    from llm_mas.sites import Site

    if "toy" in KINDS:
        return

    @dataclass
    class ToyConfig(ModelConfigBase):
        kind: Literal["toy"] = "toy"
        site: str = "rnn"
        hidden: int = 24
        seed: int = 0
        train_steps: int = 60

    def load(entry, index, device, log):
        net = GRUNet(entry.hidden, entry.seed)
        train_decision(net, entry.train_steps, entry.seed)
        net.eval().requires_grad_(False)
        view, site = stepped_site(net, Site.parse(entry.site))
        return LoadedModel(view, TorchHookBackend(), site, None)

    def fingerprint(entry):
        return {"recipe": f"GRUNet({entry.hidden}, seed={entry.seed}), {entry.train_steps} steps"}

    register_kind(ModelKind("toy", ToyConfig, load=load, fingerprint=fingerprint))


_register_toy_kind()


# ---------------------------------------------------------------------------------- a user's scorer
def _sign_scorer():
    from llm_mas import Scorer

    class SignScorer(Scorer):
        """Right when the output's sign matches the label's (labels ±1, 0 = not scored); hinge loss."""

        name = "sign"

        def scored(self, labels):
            return (labels != 0).reshape(len(labels), -1).sum(1)

        def __call__(self, output, labels):
            output = output[..., 0] if output.shape[-1] == 1 else output
            mask = labels != 0
            margin = torch.where(mask, 1 - output * labels, torch.zeros_like(output)).clamp(min=0)
            b = len(labels)
            right = ((output * labels > 0) & mask).reshape(b, -1).sum(1).float()
            return margin.reshape(b, -1).sum(1), right, mask.reshape(b, -1).sum(1).float()

    return SignScorer


SignScorer = _sign_scorer()
