"""The backend protocol and the `Edit` value shared by every backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..sites import Site

# fn(latents (n, d), which (n,)) -> new latents (n, d).
# `which` indexes the edited entries in row-major order of `mask` (0 .. mask.sum()-1), so a caller can
# prepare per-entry data (e.g. source latents) once and the hook picks the rows it is handed.
EditFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Edit:
    """Replace the latents at ``site`` where ``mask`` (B, T) is True by ``fn(latents, which)``."""

    site: Site
    mask: torch.Tensor  # (B, T) bool
    fn: EditFn
    fired: int = field(default=0, init=False)  # entries edited so far (checked after the run)

    @property
    def n_entries(self) -> int:
        return int(self.mask.sum())


def edit_entry_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) long: the entry number of every True of `mask` in row-major order, -1 elsewhere."""
    flat = mask.reshape(-1).long()
    idx = torch.cumsum(flat, 0) - 1
    return torch.where(flat.bool(), idx, torch.full_like(idx, -1)).view_as(mask)


def apply_edit_to_chunk(edit: Edit, x: torch.Tensor, positions: torch.Tensor | None,
                        entry_index: torch.Tensor) -> torch.Tensor:
    """Apply `edit` to a chunk x (B, T_chunk, d) covering absolute `positions` (T_chunk,).

    Returns a new tensor (never edits in place: the original may be needed by autograd).
    """
    B, Tc = x.shape[0], x.shape[1]
    if B != edit.mask.shape[0]:
        from ..errors import InterventionError

        raise InterventionError(f"edit at {edit.site} has batch {edit.mask.shape[0]} but the latent has batch {B}")
    if positions is None:
        if Tc != edit.mask.shape[1]:
            from ..errors import InterventionError

            raise InterventionError(
                f"edit at {edit.site}: latent covers {Tc} positions but the edit mask has {edit.mask.shape[1]}; "
                "the module does not report positions, so the mask width must equal the sequence length")
        positions = torch.arange(Tc, device=x.device)
    in_range = positions < edit.mask.shape[1]
    if not bool(in_range.all()):
        positions = positions[in_range]
        if positions.numel() == 0:
            return x
    sub = edit.mask[:, positions]  # (B, Tc')
    if not bool(sub.any()):
        return x
    rows, cols = sub.nonzero(as_tuple=True)
    which = entry_index[rows, positions[cols]]
    new_vals = edit.fn(x[rows, cols], which)  # (n, d)
    if new_vals.shape[-1] != x.shape[-1]:
        from ..errors import InterventionError

        raise InterventionError(
            f"edit at {edit.site} returned width {new_vals.shape[-1]} but the latent has width {x.shape[-1]}")
    edit.fired += rows.numel()
    out = x.clone()
    out[rows, cols] = new_vals.to(out.dtype)
    return out


class Backend(Protocol):
    """What the trainer and the recipes need from a model-access layer."""

    name: str

    def resolve(self, model: Any, site: Site | str) -> Site:
        """Resolve aliases and check that the site exists (SiteError listing close names if not)."""

    def collect(self, model: Any, inputs: Mapping[str, torch.Tensor], sites: Sequence[Site | str],
                ) -> dict[str, torch.Tensor]:
        """Run the model once; return {str(site): latents (B, T, d)} for every site."""

    def patch(self, model: Any, inputs: Mapping[str, torch.Tensor], edits: Sequence[Edit]) -> Any:
        """Run the model with `edits` applied inside the forward pass; return its logits (B, T, V).

        Raises InterventionError if any edit did not fire on every entry of its mask.
        """
