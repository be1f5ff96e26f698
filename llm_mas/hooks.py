"""Hook points: named identity modules that task models call on their latents.

A model calls ``hook(x, positions)`` with ``x`` of shape (B, T_chunk, d) and ``positions`` the absolute
sequence positions of that chunk (LongTensor (T_chunk,)). Forward hooks registered on the hook point see
both, so an edit can be applied at exactly the right time step — also inside a recurrence, where the
model calls the hook once per step, and inside KV-cached decoding.

``edit_steps`` (bool (T,), or None) is set by a patching backend for the duration of a patch. A recurrent
model reads it to run fused kernels over stretches with no edit and to step one position at a time only
where an edit must happen inside the recurrence.
"""

from __future__ import annotations

import torch
from torch import nn


class HookPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.edit_steps: torch.Tensor | None = None  # (T,) bool while a patch is active

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return x

    def steps_to_break(self, length: int) -> torch.Tensor | None:
        """Bool (length,) of steps at which an edit is pending, or None when nothing edits this point."""
        if self.edit_steps is None:
            return None
        steps = self.edit_steps
        if steps.numel() < length:
            steps = torch.cat([steps, steps.new_zeros(length - steps.numel())])
        return steps[:length]
