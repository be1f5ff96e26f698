"""Recorded systems: a member known only from recorded latents and the causal state of each recorded row.

    rec = RecordedSystem(latents=spikes,                   # (N, T, d) trials × time × units, or (N, d)
                         states={"choice": choice_so_far})  # each (N, T) (or (N,)) integers, -1: no state
    np.asarray(rec)                  # (N·T, d): a member of RSA / CKA / GPA (rows trial-major, time-minor)
    rec.inputs(trials)               # (n, T) long: what a counterfactual dataset gives the recording as inputs

A recording cannot be run, so in MAS it is *causally inaccessible*: directions into it are trained and
scored by the counterfactual-latent (CL) loss (CLMAS, docs/method.md): the intervened latent
ĥ = A⁻¹((1 − m) ⊙ A(h_base) + m ⊙ A_s(h_s)) is pulled towards a recorded latent whose causal state equals
the state the intervention intends (`match_states`; ``cl_loss``). Directions *from* it into a model are
ordinary interchange interventions (the recorded latent is the source). The ``recorded`` model kind
(`llm_mas.problems.kinds`) loads one: ``compare(models=[gru, rec], data=..., cl={"inaccessible": [1]})``.

This module is pure data and losses (torch, numpy); the problem that uses them is
`llm_mas.problems.tensors.TensorProblem`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .hooks import HookPoint

TENSOR_FILE = "recording.safetensors"


# ------------------------------------------------------------------------------------------ the CL loss
def cl_loss(h_hat: torch.Tensor, h_cl: torch.Tensor, matched: torch.Tensor | None = None) -> torch.Tensor:
    """The counterfactual-latent loss of CLMAS: ½[(1 − cos(ĥ, h_cl)) + mean_d (ĥ − h_cl)²] per row, averaged
    over the matched rows (``matched`` (n,) bool; None: every row).

    h_hat: (n, d) intervened latents of the inaccessible target, in its own space; h_cl: (n, d) natural
    latents of the target whose causal state is the one each intervention intends."""
    per = cl_loss_per_row(h_hat, h_cl)
    if matched is None:
        return per.mean()
    m = matched.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1)


def cl_loss_per_row(h_hat: torch.Tensor, h_cl: torch.Tensor) -> torch.Tensor:
    """(n,): ½[(1 − cos(ĥ, h_cl)) + mean_d (ĥ − h_cl)²] (see `cl_loss`)."""
    return 0.5 * ((1 - F.cosine_similarity(h_hat, h_cl, dim=-1)) + ((h_hat - h_cl) ** 2).mean(-1))


def match_states(natural: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each wanted state (n, n_keys), a uniformly drawn natural row (M, n_keys) in that state.

    Returns (pick (n,) indices into natural, matched (n,) bool; unmatched rows get an arbitrary pick).
    States are integer tuples, coded in a mixed radix, sorted once and looked up by binary search."""
    natural = np.asarray(natural, dtype=np.int64).reshape(len(natural), -1)
    wanted = np.asarray(wanted, dtype=np.int64).reshape(len(wanted), -1)
    lo = np.minimum(natural.min(0), wanted.min(0))
    radix = np.maximum(natural.max(0), wanted.max(0)) - lo + 1
    weights = np.concatenate([np.cumprod(radix[::-1])[::-1][1:], [1]]).astype(np.int64)
    nat_code = ((natural - lo) * weights).sum(1)
    want_code = ((wanted - lo) * weights).sum(1)
    order = np.argsort(nat_code, kind="stable")
    sorted_codes = nat_code[order]
    start = np.searchsorted(sorted_codes, want_code, "left")
    stop = np.searchsorted(sorted_codes, want_code, "right")
    matched = stop > start
    pick = start + np.floor(rng.random(len(want_code)) * np.maximum(stop - start, 1)).astype(np.int64)
    pick = order[np.minimum(pick, len(order) - 1)]
    return pick, matched


# ------------------------------------------------------------------------------------------ the recording
@dataclass(eq=False)   # compared (and hashed) by identity, like a module
class RecordedSystem:
    """Recorded latents (N, T, d) or (N, d) and the causal states of each recorded row (module docstring).

    states: name -> integer tensor (N, T) (or (N,), one state per trial, for (N, d) latents or broadcast
    over time); a negative value marks a row without that state (never matched)."""

    latents: Any
    states: Mapping[str, Any] = field(default_factory=dict)
    name: str = "recording"

    def __post_init__(self):
        lat = torch.as_tensor(np.asarray(self.latents) if not isinstance(self.latents, torch.Tensor)
                              else self.latents).float()
        if lat.dim() == 2:
            lat = lat[:, None, :]
        if lat.dim() != 3 or lat.shape[0] < 1 or lat.shape[-1] < 1:
            raise DataError(f"recording {self.name!r}: latents have shape {tuple(lat.shape)}; expected (N, T, d) "
                            "(trials, time, units) or (N, d)")
        if not torch.isfinite(lat).all():
            bad = torch.nonzero(~torch.isfinite(lat).reshape(len(lat), -1).all(1)).flatten()[:6].tolist()
            raise DataError(f"recording {self.name!r}: latents hold NaN or inf (trials {bad}); drop those trials")
        self.latents = lat
        n, t = lat.shape[:2]
        states = {}
        for key, value in dict(self.states).items():
            s = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            if s.is_floating_point() and not torch.equal(s, s.round()):
                raise DataError(f"recording {self.name!r}: states[{key!r}] holds non-integer values; causal states "
                                "are integers (code categories as 0, 1, ...; -1 where a row has no state)")
            s = s.long()
            if s.dim() == 1:
                s = s[:, None].expand(-1, t)
            if tuple(s.shape) != (n, t):
                raise DataError(f"recording {self.name!r}: states[{key!r}] has shape {tuple(s.shape)}; expected "
                                f"({n}, {t}) (one state per recorded row) or ({n},)")
            states[key] = s.contiguous()
        self.states = states

    @property
    def n_trials(self) -> int:
        return int(self.latents.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.latents.shape[1])

    @property
    def width(self) -> int:
        return int(self.latents.shape[2])

    def __array__(self, dtype=None, copy=None):
        """(N·T, d) rows, trial-major: what RSA, CKA and GPA read (`llm_mas.similarity`, `hyperalignment`)."""
        rows = self.latents.reshape(-1, self.width).double().numpy()
        return rows.astype(dtype) if dtype is not None else rows

    def rows(self, trials: Any = None, steps: Any = None) -> np.ndarray:
        """(n, d) float64 latents of these (trial, step) rows (every row when both are None)."""
        if trials is None and steps is None:
            return np.asarray(self)
        trials = torch.as_tensor(np.asarray(trials), dtype=torch.long)
        steps = torch.zeros_like(trials) if steps is None else torch.as_tensor(np.asarray(steps), dtype=torch.long)
        return self.latents[trials, steps].double().numpy()

    def inputs(self, trials: Any) -> torch.Tensor:
        """(n, T) long: trial indices repeated along time — the recording's base or source inputs in a
        `llm_mas.CounterfactualTensors` (positions then index the recorded time axis)."""
        trials = torch.as_tensor(np.asarray(trials), dtype=torch.long).reshape(-1)
        bad = torch.nonzero((trials < 0) | (trials >= self.n_trials)).flatten()[:6].tolist()
        if bad:
            raise DataError(f"recording {self.name!r}: trial indices at rows {bad} lie outside 0..{self.n_trials - 1}")
        return trials[:, None].expand(-1, self.n_steps).contiguous()

    def natural(self, keys: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
        """The pool CL matches in: latents (M, d) and states (M, len(keys)) of every row that has all of
        `keys` (no negative value)."""
        missing = [k for k in keys if k not in self.states]
        if missing or not keys:
            raise DataError(f"recording {self.name!r}: no state(s) {missing or 'given'}; it records "
                            f"{sorted(self.states) or 'no states'} (RecordedSystem(states={{name: (N, T) ints}}))")
        states = torch.stack([self.states[k] for k in keys], -1).reshape(-1, len(keys))
        keep = (states >= 0).all(1)
        return self.latents.reshape(-1, self.width)[keep], states[keep].numpy()

    def module(self) -> RecordingModule:
        return RecordingModule(self)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """``directory/recording.safetensors``: ``latents`` and ``state.<name>`` tensors, the name in metadata."""
        from .files import atomic_save_tensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(directory / TENSOR_FILE, {"latents": self.latents, **{f"state.{k}": v for k, v in
                                                                                   self.states.items()}},
                            metadata={"name": self.name})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RecordedSystem:
        from safetensors import safe_open

        path = Path(directory) / TENSOR_FILE
        if not path.is_file():
            raise DataError(f"{str(path)!r} does not exist; write a recording with RecordedSystem(...).save(DIR)")
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                name = (f.metadata() or {}).get("name", Path(directory).name)
        except Exception as e:  # safetensors' own error type
            raise DataError(f"{str(path)!r} is not a readable safetensors file ({e})") from None
        if "latents" not in tensors:
            raise DataError(f"{str(path)!r} holds no 'latents' tensor")
        return cls(tensors["latents"], {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}, name)


class RecordingModule(nn.Module):
    """A recording as a module for the tensor runner: inputs (B, T) trial indices (`RecordedSystem.inputs`)
    -> the recorded latents (B, T, d), read out at the hook point ``latents``. It has no behaviour: a
    direction into it is CL-trained and CL-scored."""

    def __init__(self, recording: RecordedSystem):
        super().__init__()
        self.recording = recording
        self.register_buffer("table", recording.latents, persistent=False)
        self.latents = HookPoint()

    def forward(self, trials: torch.Tensor) -> torch.Tensor:
        if trials.dim() != 2 or trials.is_floating_point():
            raise DataError(f"recording {self.recording.name!r}: inputs have shape {tuple(trials.shape)} and dtype "
                            f"{trials.dtype}; give trial indices (N, T) long (RecordedSystem.inputs(trials))")
        t = torch.arange(trials.shape[1], device=trials.device)
        return self.latents(self.table[trials, t[None, :]], t)
