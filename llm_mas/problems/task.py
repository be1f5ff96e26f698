"""The intervention problem of the task models (GRU / LSTM / Transformer trained on a counting task).

Data path:  task → base sequences per model → `PairSet` per (source s, target t, variable v)
→ source latents collected once at the source's site (frozen models, fixed data)
→ target run patched at its site with  h' = A_t⁻¹((1−m)⊙A_t(h_t) + m⊙A_s(h_s))  → loss / IIA.

Speed (the models are frozen and the data fixed, so work that never changes is done once):
- source latents are cached per split;
- indywise at the recurrent state of a 1-layer RNN, the target's prefix is never re-run: its natural
  state just before the intervened token is cached, and the run starts at that token (one recurrent step
  at the edit, fused GRU/LSTM kernels for the rest). This gives the same numbers as running the whole
  counterfactual sequence (tested);
- all sources of one target share one forward pass (rows concatenated, one Edit per chunk);
- indywise at the last layer of a Transformer, nothing after the site but the head depends on the
  alignment: the edited latent is the target's cached natural latent at the intervened position, and the
  head's verdict on every other scored position of a pair (its natural output on the counterfactual
  sequence) is computed once per pair, the first time a batch reads it, and kept (a few numbers per
  pair). A step then runs the head on the edited positions only (``skip_frozen``; same losses and
  gradients as the full run, tested);
- indywise at a lower Transformer layer l (e.g. ``layer0`` of the 2-layer models), the step starts at the
  intervened layer p: layers <= l of the counterfactual sequence run without a graph (for l = 0 of a
  2-layer model block 0 at the positions after p only, the prefix's layer-0 latents being the cached
  ones), the edited latent takes position p, and blocks l+1.. run on positions p.. only, the last one's
  queries at the scored positions only (every scored label sits at or after p). Recomputed each step
  rather than cached: the counterfactual layer-l activations after p are ~13 positions x d per pair,
  ~1 GB in float32 for 75 Transformer directions x 2 000 pairs. Same losses, gradients and teacher-forced
  records as the full run (tested); the rollout evaluation runs the full model.

Metrics: trial IIA = every scored token right in an autoregressive rollout of the intervened target
(scored = task tokens after the intervention; other tokens given); token IIA = teacher-forced accuracy on
the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.base import Edit
from ..backends.torch_hooks import TorchHookBackend, get_module
from ..errors import ConfigError, DataError, MASError
from ..llm.record import IGNORE_INDEX
from ..models.registry import load_task_model, resolve_model_dir
from ..models.task_models import build_from_settings
from ..models.training import read_run_config
from ..recordings import cl_loss, match_states
from ..sites import resolve_site
from ..tasks import get_task, make_pairs
from .base import DirectionPairs, ModelEntry, PairScores, ProblemBase, Record, Shard

# Most rows (pairs of all the directions of a target together) one patched evaluation pass runs at once:
# bounds an evaluation's memory whatever eval.batch_size and the number of directions per target.
EVAL_ROWS_PER_PASS = 1024


@dataclass
class TaskModelEntry(ModelEntry):
    """A resolved task model taking part in a MAS run."""

    task: object            # llm_mas.tasks.Task
    variable_map: dict[str, str]


class LatentCache:
    """The natural latents of one model on one split's base sequences, held once per model.

    Packed: only the non-pad positions are kept, row after row ((tokens, d); pad positions are never
    read), and ``at(rows, cols)`` finds row r's position p at ``offsets[r] + p``. Every direction that
    reads this model (as a source, or as a target for its natural state) indexes into the same table.
    """

    def __init__(self, packed: torch.Tensor, lengths: torch.Tensor):
        self.packed = packed                                   # (tokens, d)
        self.lengths = lengths                                 # (N,) positions kept per row
        self.offsets = torch.cumsum(lengths, 0) - lengths      # (N,) first packed index of each row

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Latents (*shape, d) at (rows, cols) (broadcast to one shape; cols < the row's length)."""
        return self.packed[self.offsets[rows] + cols]

    def check(self, rows: np.ndarray, cols: np.ndarray, what: str) -> None:
        lengths = self.lengths.cpu().numpy()[rows]
        if ((cols < 0) | (cols >= lengths)).any():
            raise DataError(f"{what}: a position lies outside its base sequence (in its padding)")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.lengths, self.offsets))


@dataclass
class TaskBatch:
    """One chunk's rows of a run (B rows), built at batch time from the chunk's compact arrays."""

    input_ids: torch.Tensor         # (B, W) int64 inputs of the target run
    labels: torch.Tensor            # (B, W) next-token labels, IGNORE_INDEX where not scored
    free_mask: torch.Tensor         # (B, W) bool: rollout feeds the model's own prediction at these inputs
    edit_mask: torch.Tensor         # (B, W) bool: latents replaced
    source: torch.Tensor | None     # indywise: (B, d_s) source latent of each row; stepwise: None
    source_rows: torch.Tensor | None  # stepwise: (B,) row of the source base batch
    state0: torch.Tensor | None     # fast path: (B, d_t) target state before the intervened token


@dataclass
class TaskPairs(DirectionPairs):
    """One (source, target, variable) dataset on one split: only what is unique to the direction.

    The counterfactual token ids, their scored mask and four index arrays into the per-model latent
    caches; the run's inputs, labels, masks and gathered latents are built per batch (``batch``).
    """

    fast: bool                      # prefix-skipping path (RNN recurrent state, indywise)
    stepwise: bool
    ids: torch.Tensor               # (n, L) counterfactual target sequence (uint8 where the vocabulary fits)
    scored: torch.Tensor            # (n, L) bool: the tokens the intervened target must get right
    target_index: torch.Tensor      # (n,) int32 row of the target base batch
    target_pos: torch.Tensor        # (n,) int32 intervened position (stepwise: positions 0..target_pos)
    source_index: torch.Tensor      # (n,) int32 row of the source base batch
    source_pos: torch.Tensor        # (n,) int32
    source_cache: LatentCache
    target_cache: LatentCache
    quantity: np.ndarray            # (n,) target N (for breakdowns)
    cl: bool = False                # trained by the counterfactual-latent loss instead of behaviour
    target_latents: torch.Tensor | None = None   # CL: (n, d_t) the target's natural latent at target_pos
    cl_latents: torch.Tensor | None = None       # CL: (n, d_t) matched natural latent of the intended state
    cl_matched: torch.Tensor | None = None       # CL: (n,) bool, False where no natural state matched
    cl_where: tuple[np.ndarray, np.ndarray] | None = None  # CL: (row, position) of each matched natural latent
    intended: dict[str, np.ndarray] | None = None          # CL: the causal state each intervention intends
    # every pair's counterfactual tokens 0..target_pos equal its base sequence's, so the target's natural
    # latent at target_pos is the cached one (what the head-only step at a last-layer site relies on)
    prefix_is_base: bool = False
    # no scored token at or before target_pos: every label the loss reads sits at or after the intervened
    # position (what the resumed step at a lower Transformer layer relies on; make_pairs always scores after)
    scored_after_pos: bool = False

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this direction holds itself (the shared latent caches not counted)."""
        own = [self.ids, self.scored, self.target_index, self.target_pos, self.source_index, self.source_pos,
               self.target_latents, self.cl_latents, self.cl_matched]
        return sum(t.numel() * t.element_size() for t in own if t is not None) + self.quantity.nbytes

    def source_latents(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, d_s) the source latent at source_pos of these rows (indywise)."""
        return self.source_cache.at(self.source_index[rows].long(), self.source_pos[rows].long())

    def batch(self, rows: torch.Tensor) -> TaskBatch:
        """The run tensors of these rows (B,): the same values the full-split tensors would hold, padded
        to the widest of these rows only (a run's buckets cut every row to the length it needs)."""
        ids = self.ids[rows].long()                                   # (B, L)
        scored = self.scored[rows]                                    # (B, L)
        pos_t = self.target_pos[rows].long()                          # (B,)
        B, L = ids.shape
        dev = ids.device
        if self.fast:
            # Start the target run AT the intervened token p (left-aligned), from its natural state at p-1.
            lengths = (ids != 0).sum(1)                               # (B,)
            width = max(int((lengths - pos_t).max()) if B else 1, 1)
            col = torch.arange(width, device=dev)
            absolute = (pos_t[:, None] + col[None, :]).clamp(max=L - 1)  # (B, W)
            valid = (pos_t[:, None] + col[None, :]) < lengths[:, None]
            inputs = torch.where(valid, ids.gather(1, absolute), torch.zeros_like(absolute))
            nxt = (absolute + 1).clamp(max=L - 1)
            label_ok = valid & ((pos_t[:, None] + col[None, :] + 1) < L) & scored.gather(1, nxt)
            labels = torch.where(label_ok, ids.gather(1, nxt), torch.full_like(nxt, IGNORE_INDEX))
            free = valid & scored.gather(1, absolute)
            edit_mask = torch.zeros(B, width, dtype=torch.bool, device=dev)
            edit_mask[:, 0] = True
            prev = (pos_t - 1).clamp(min=0)
            state0 = self.target_cache.at(self.target_index[rows].long(), prev)      # (B, d_t)
            state0 = torch.where((pos_t > 0)[:, None], state0, torch.zeros_like(state0))
            return TaskBatch(inputs, labels, free, edit_mask, self.source_latents(rows), None, state0)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(scored[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
        col = torch.arange(L, device=dev)
        if self.stepwise:
            edit_mask = col[None, :] <= pos_t[:, None]
            return TaskBatch(ids, labels, scored, edit_mask, None, self.source_index[rows].long(), None)
        edit_mask = col[None, :] == pos_t[:, None]
        return TaskBatch(ids, labels, scored, edit_mask, self.source_latents(rows), None, None)


@dataclass
class FrozenRest:
    """Per pair of one direction: the target head's natural verdict at every scored position except the
    intervened one (at a last-layer site those never depend on the alignment). Filled lazily."""

    ce: torch.Tensor        # (n,) sum of the cross-entropies
    ok: torch.Tensor        # (n,) tokens right
    count: torch.Tensor     # (n,) scored positions counted
    known: torch.Tensor     # (n,) bool: filled

    @classmethod
    def empty(cls, n: int, device) -> FrozenRest:
        return cls(torch.zeros(n, device=device), torch.zeros(n, device=device), torch.zeros(n, device=device),
                   torch.zeros(n, dtype=torch.bool, device=device))


def _rnn_state_site(entry: TaskModelEntry) -> bool:
    m = entry.model
    return (getattr(m, "arch", None) in ("gru", "lstm") and getattr(m, "n_layers", 0) == 1
            and entry.site.module == "hook_layers.0" and entry.site.io == "output")


class TaskModelProblem(ProblemBase):
    """Pairs, caches, loss and evaluation for MAS over task models."""

    def __init__(self, models: Sequence[TaskModelEntry], variables: Sequence[str], k: int, *,
                 null_subspace: bool = False, stepwise: bool = False,
                 train_directions: Sequence[tuple[int, int]] | None = None,
                 n_train: int = 10_000, n_valid: int = 1_000, seed: int = 0,
                 intervention: str = "interchange", eval_batch_size: int = 1000,
                 fast_path: bool = True, device: str = "cpu", progress: bool = True,
                 cl_directions: Sequence[tuple[int, int]] = (), cl_epsilon: float = 0.0,
                 cl_match_on: Sequence[str] | None = None, value_range: Sequence[int] | None = None,
                 eval_rows_per_pass: int = EVAL_ROWS_PER_PASS, skip_frozen: bool = True):
        super().__init__(models, variables, k, null_subspace=null_subspace, stepwise=stepwise,
                         train_directions=train_directions, cl_directions=cl_directions, intervention=intervention,
                         n_train=n_train, n_valid=n_valid, seed=seed, eval_batch_size=eval_batch_size)
        self.device = torch.device(device)
        if eval_rows_per_pass < 1:
            raise ConfigError(f"eval_rows_per_pass must be >= 1, got {eval_rows_per_pass}")
        self.eval_rows_per_pass = eval_rows_per_pass
        self.fast_path = fast_path
        # last-layer Transformer sites: run the head on the edited positions only (False: every target is
        # recomputed from its tokens each step, the reference the shortcut is tested against)
        self.skip_frozen = skip_frozen
        self._frozen_rest: dict[int, FrozenRest] = {}
        self.backend = TorchHookBackend()
        if self.cl_directions and stepwise:
            raise ConfigError("the counterfactual-latent (CL) loss is defined for indywise interventions only; "
                              "set data.stepwise=false or drop cl.directions")
        if not 0.0 <= cl_epsilon <= 1.0:
            raise ConfigError(f"cl epsilon {cl_epsilon} must be in [0, 1]")
        self.cl_epsilon = cl_epsilon
        self.cl_match_on = list(cl_match_on) if cl_match_on is not None else None
        for t_ in sorted({t for _, t in self.cl_directions}) if self.cl_match_on is not None else ():
            states = self.models[t_].task.state_variables
            bad = [v for v in self.cl_match_on if v not in states]
            if bad or not self.cl_match_on:
                raise ConfigError(f"cl match_on {self.cl_match_on}: {bad or 'empty list'} not state variables of "
                                  f"task {self.models[t_].task.name!r} (model {t_}); valid: {', '.join(states)}")
        # (lo, hi) is checked by make_pairs; full/null are refused here, before any latent is collected
        self.value_range = tuple(int(v) for v in value_range) if value_range is not None else None
        if self.value_range is not None and ({"full", "null"} & set(self.variables) or null_subspace):
            raise ConfigError("value_range restricts one named variable's values; it cannot apply to full or null "
                              "(list named variables only and turn null_subspace off)")
        self.progress = progress
        self.caches: dict[str, list[LatentCache]] = {}
        self.splits = {"train": self._build_split("train", n_train, 0),
                       "valid": self._build_split("valid", n_valid, 1)}

    # ------------------------------------------------------------------ data
    def _collect(self, entry: ModelEntry, ids: np.ndarray) -> LatentCache:
        """Natural latents at the entry's site on every non-pad position of `ids` (N, L), packed."""
        nonpad = ids != 0                                                       # (N, L)
        lengths = nonpad.sum(1)
        if not (nonpad == (np.arange(ids.shape[1])[None, :] < lengths[:, None])).all():
            raise DataError("base sequences must be right padded (a pad token before a real one)")
        out = []
        with torch.no_grad():
            for lo in range(0, len(ids), 2000):
                x = torch.as_tensor(ids[lo:lo + 2000], device=self.device)
                latents = self.backend.collect(entry.model, {"input_ids": x}, [entry.site])[str(entry.site)]
                out.append(latents[torch.as_tensor(nonpad[lo:lo + 2000], device=self.device)])  # (tokens, d)
        packed = torch.cat(out)                                                 # (tokens, d)
        bad = int((~torch.isfinite(packed)).sum())
        if bad:
            raise DataError(f"models.{self.models.index(entry)} ({entry.name}): {bad} non-finite latent values at "
                            f"site {entry.site} on its own base sequences; its weights are finite, so the model "
                            "overflows on this input: check the model (llm-mas eval-model) or choose another site")
        return LatentCache(packed, torch.as_tensor(lengths, device=self.device))

    def _variable_spec(self, s: int, t: int, v: str):
        if v in ("full", "null"):
            return v
        vt = self.models[t].variable_map.get(v, v)
        vs = self.models[s].variable_map.get(v, v)
        return vt if vt == vs else (vt, vs)

    def _build_split(self, split: str, n: int, split_id: int) -> list[TaskPairs]:
        rng = np.random.default_rng([self.seed, split_id])
        bases = [m.task.sample(n, rng) for m in self.models]
        caches = [self._collect(m, b.ids) for m, b in zip(self.models, bases)]   # one per model
        self.caches[split] = caches
        if split == "train":  # per-feature statistics for the optional standardisation wrapper
            self.latent_stats = []
            for cache in caches:
                x = cache.packed                                               # (non-pad positions, d)
                self.latent_stats.append((x.mean(0), x.std(0).clamp(min=1e-6)))
        chunks = []
        for s, t in self.directions:
            for v in self.all_variables:
                if v == "null" and s != t:
                    continue
                pairs = make_pairs(self.models[t].task, bases[t], self.models[s].task, bases[s],
                                   self._variable_spec(s, t, v), n, rng, stepwise=self.stepwise,
                                   value_range=self.value_range)
                chunk = self._make_chunk(s, t, v, pairs, bases[t], caches[s], caches[t])
                if (s, t) in self.cl_directions:
                    self._attach_cl(chunk, pairs, bases[t], caches[t], rng)
                chunks.append(chunk)
        return chunks

    def _attach_cl(self, chunk: TaskPairs, pairs, target_base, target_cache, rng) -> None:
        """Counterfactual latents: for each pair, a natural latent of the target (its own runs on this split)
        whose causal state equals the state the intervention intends; unmatched pairs are masked."""
        task = self.models[chunk.target].task
        keys = [v for v in task.state_variables if v in pairs.intended
                and (self.cl_match_on is None or v in self.cl_match_on)]
        states = task.states(target_base)                                   # {var: (N, L)}
        valid = task.valid_positions(target_base)                           # (N, L)
        rows, cols = np.nonzero(valid)
        natural = np.stack([states[v][rows, cols] for v in keys], 1)        # (M, n_keys)
        wanted = np.stack([pairs.intended[v] for v in keys], 1)             # (n, n_keys)
        pick, matched = match_states(natural, wanted, rng)
        dev = self.device
        chunk.cl = True
        chunk.cl_matched = torch.as_tensor(matched, device=dev)
        chunk.cl_where = (rows[pick], cols[pick])
        chunk.intended = {v: pairs.intended[v] for v in keys}
        target_cache.check(rows[pick], cols[pick], "CL latents")
        chunk.cl_latents = target_cache.at(torch.as_tensor(rows[pick], device=dev),
                                           torch.as_tensor(cols[pick], device=dev))      # (n, d_t)
        chunk.target_latents = target_cache.at(torch.as_tensor(pairs.target_index, device=dev),
                                               torch.as_tensor(pairs.target_pos, device=dev))   # (n, d_t)

    def _make_chunk(self, s, t, v, pairs, target_base, source_cache, target_cache) -> TaskPairs:
        dev = self.device
        trained = (s, t) in self.train_directions or (s, t) in self.cl_directions
        quantity = self.models[t].task.quantities(target_base)[pairs.target_index]
        fast = self.fast_path and not self.stepwise and _rnn_state_site(self.models[t])
        # every cache position a batch of this direction can read lies inside its base sequence
        source_cache.check(pairs.source_index, pairs.source_pos, f"direction {s}->{t}")
        if fast:
            target_cache.check(pairs.target_index, np.maximum(pairs.target_pos - 1, 0), f"direction {s}->{t}")
        small = torch.uint8 if len(self.models[t].task.vocab) <= 256 else torch.int64

        def index(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a.astype(np.int32), device=dev)                    # (n,)

        width = min(pairs.ids.shape[1], target_base.ids.shape[1])
        upto = np.arange(width)[None, :] <= pairs.target_pos[:, None]                      # (n, width)
        prefix_is_base = bool((pairs.target_pos < width).all() and (
            (pairs.ids[:, :width] == target_base.ids[pairs.target_index, :width]) | ~upto).all())
        scored = pairs.scored_mask()                                                        # (n, L)
        scored_after_pos = not (scored & (np.arange(scored.shape[1])[None, :] <= pairs.target_pos[:, None])).any()
        return TaskPairs(s, t, v, self.blocks[v], trained, fast, self.stepwise,
                         torch.as_tensor(pairs.ids, device=dev).to(small),              # (n, L)
                         torch.as_tensor(scored, device=dev),                           # (n, L)
                         index(pairs.target_index), index(pairs.target_pos), index(pairs.source_index),
                         index(pairs.source_pos), source_cache, target_cache, quantity,
                         prefix_is_base=prefix_is_base, scored_after_pos=scored_after_pos)

    # ------------------------------------------------------------------ one patched run per target
    def _edit_fn(self, chunk: TaskPairs, batch: TaskBatch, local: torch.Tensor, maps, mask: torch.Tensor):
        """Edit for `chunk`'s rows of a run: local (Rb,) = the row in `batch` of each run row (-1: another
        chunk's), mask (Rb, Wb) = the latents of this chunk to replace (row-major order = the hook's `which`)."""
        r, c = mask.nonzero(as_tuple=True)
        if batch.source_rows is not None:  # stepwise: the source latent at the same position, per entry
            src = chunk.source_cache.at(batch.source_rows[local[r]], c)             # (entries, d_s)
        else:                              # indywise: one entry per row
            src = batch.source[local[r]]                                            # (entries, d_s)
        intervention, source, target, block = self.intervention, chunk.source, chunk.target, chunk.block
        return lambda h, which: intervention(maps, h, src[which], source, target, block)

    # teacher-forced runs of a one-layer RNN target from the intervened token (``fast``) go through
    # `_run_recurrent` (no hooks; rows stop at their last scored label); False: the hooked run of `_run`,
    # the reference it is tested and benchmarked against
    direct_recurrent = True
    # a direct run that needs a gradient (training) and whose target has `continue_packed` (GRU, LSTM): the
    # buckets' steps and edits, then one packed run of every row up to its own last scored label (`_packed_run`);
    # False: the continuation per length bucket (the reference; evaluation keeps it, its records unchanged)
    packed_recurrent = True

    @staticmethod
    def _buckets(needed: torch.Tensor) -> list[torch.Tensor]:
        """Rows grouped by the length they need, so fused kernels do not run over padding."""
        if needed.numel() < 192:
            return [torch.arange(needed.numel(), device=needed.device)]
        order = torch.argsort(needed, stable=True)
        return list(order.chunk(3))

    @staticmethod
    def _concat(chunks: Sequence[TaskPairs], rows: Sequence[torch.Tensor]):
        """The batches of `chunks` on their `rows`, as one run: (batches, cat, chunk_of, local), where
        ``cat(field, pad)`` concatenates a (rows, W_i) field of every batch padded to the widest, chunk_of
        (R,) is each run row's chunk and local (R,) its row in that chunk's batch."""
        batches = [c.batch(r) for c, r in zip(chunks, rows)]
        width = max(int(b.input_ids.shape[1]) for b in batches)

        def cat(field: str, value):
            return torch.cat([F.pad(getattr(b, field), (0, width - getattr(b, field).shape[1]), value=value)
                              for b in batches])

        device = batches[0].input_ids.device
        chunk_of = torch.cat([torch.full((len(r),), i, device=device) for i, r in enumerate(rows)])
        local = torch.cat([torch.arange(len(r), device=device) for r in rows])            # (R,) batch row
        return batches, cat, chunk_of, local

    def _run(self, maps, chunks: Sequence[TaskPairs], rows: Sequence[torch.Tensor], rollout: bool,
             max_rows: int | None = None):
        """Run the target of `chunks` on their concatenated `rows` (rows of chunk i follow those of chunk i-1).

        Returns entry-level outputs at the scored positions only (the head never runs elsewhere):
        logits (n, V), labels (n,), and the concatenated-batch row of each entry (n,).
        max_rows: run each length bucket in consecutive slices of at most this many rows (evaluation: memory
        bounded whatever the number of rows). The buckets and their widths are those of the whole run and
        the entries come out in the same order, so slicing changes no number (tested).
        """
        if chunks[0].fast and not rollout and self.direct_recurrent:
            return self._run_recurrent(maps, chunks, rows, max_rows)
        model = self.models[chunks[0].target].model
        site = self.models[chunks[0].target].site
        batches, cat, chunk_of, local = self._concat(chunks, rows)
        inputs, labels = cat("input_ids", 0), cat("labels", IGNORE_INDEX)                      # (R, W)
        free, edit_mask = cat("free_mask", False), cat("edit_mask", False)
        state0 = torch.cat([b.state0 for b in batches]) if chunks[0].fast else None
        needed = (inputs != 0).sum(1)                                                      # (R,) real length
        out_logits, out_labels, out_rows = [], [], []
        buckets = self._buckets(needed)
        widths = [max(int(needed[bucket].max()), 1) for bucket in buckets]
        if max_rows is not None:
            # even slices (no small remainder: a few rows alone could take another matrix kernel)
            buckets, widths = zip(*[(piece, wb) for bucket, wb in zip(buckets, widths)
                                    for piece in bucket.tensor_split(max(1, -(-len(bucket) // max_rows)))])
        for bucket, wb in zip(buckets, widths):
            x, lab = inputs[bucket, :wb], labels[bucket, :wb]                              # (Rb, Wb)
            edits = []
            for i in chunk_of[bucket].unique().tolist():
                mask = edit_mask[bucket, :wb] & (chunk_of[bucket] == i)[:, None]
                bucket_local = torch.where(chunk_of[bucket] == i, local[bucket], -1)
                edits.append(Edit(site=site, mask=mask, fn=self._edit_fn(chunks[i], batches[i], bucket_local, maps,
                                                                         mask)))
            s0 = state0[bucket] if state0 is not None else None
            scored = lab != IGNORE_INDEX                                                         # (Rb, Wb)
            with self.backend.edits_installed(model, edits):
                if rollout:
                    _, logits = model.rollout(x, free[bucket, :wb], state=s0)               # (Rb, Wb, V)
                    logits = logits[scored]
                else:
                    feats = model.features(x, s0) if s0 is not None else model.features(x)  # (Rb, Wb, out)
                    logits = model.readout(feats[scored])                                  # (n_b, V)
            out_logits.append(logits)
            out_labels.append(lab[scored])
            out_rows.append(bucket[:, None].expand_as(scored)[scored])
        return torch.cat(out_logits), torch.cat(out_labels), torch.cat(out_rows)

    def _run_recurrent(self, maps, chunks: Sequence[TaskPairs], rows: Sequence[torch.Tensor],
                       max_rows: int | None):
        """`_run` (teacher forced) for a one-layer RNN target run from the intervened token (``fast``), with
        no hook: per length bucket, one recurrent step at the intervened token, each chunk's edit on its rows,
        the fused kernel from the edited latent up to the bucket's last scored label (nothing later reaches
        the loss), and the head once on every scored position (per slice when max_rows bounds memory).

        The hooked run's buckets, edits and entry order, op for op: the same logits, losses and gradients,
        bit for bit on one machine (tested); what is saved is the hooks' bookkeeping, the head's calls and
        the time steps past the last scored label. With a gradient (training) and a GRU or LSTM target
        (``packed_recurrent``), the continuation is one packed run instead (`_packed_run`): the same numbers up
        to rounding (tests/test_packed_recurrence.py)."""
        model = self.models[chunks[0].target].model
        batches, cat, chunk_of, local = self._concat(chunks, rows)
        inputs, labels = cat("input_ids", 0), cat("labels", IGNORE_INDEX)                      # (R, W)
        state0 = torch.cat([b.state0 for b in batches])                                         # (R, d_t)
        buckets = self._buckets((inputs != 0).sum(1))
        col = torch.arange(1, inputs.shape[1] + 1, device=inputs.device)
        last = torch.where(labels != IGNORE_INDEX, col, 0).amax(1)                              # (R,) 0: none
        def edited(bucket: torch.Tensor) -> torch.Tensor:
            """The bucket's latents (Rb, d_t) at the intervened token, each chunk's edit on its rows."""
            h = model.step(inputs[bucket, 0], state0[bucket])                                  # (Rb, d_t)
            which = chunk_of[bucket]
            for i in which.unique().tolist():
                mine = (which == i).nonzero(as_tuple=True)[0]                                   # (n_i,)
                c = chunks[i]
                new = self.intervention(maps, h[mine], batches[i].source[local[bucket][mine]], c.source, c.target,
                                        c.block)
                h = h.clone()
                h[mine] = new
            return h

        if (self.packed_recurrent and max_rows is None and torch.is_grad_enabled()
                and getattr(model, "packed_continuation", False)):
            # the edits stay per bucket: editing all rows at once sums the alignments' gradient in another
            # order, which moves a golden run's rollout trial (BENCHMARKS.md, "The 2-model GRU-GRU step")
            return self._packed_run(model, torch.cat([edited(bucket) for bucket in buckets]), torch.cat(list(buckets)),
                                    inputs, labels, last)
        widths = [max(int(last[bucket].max()), 1) for bucket in buckets]   # each bucket's last scored label
        if max_rows is not None:
            buckets, widths = zip(*[(piece, wb) for bucket, wb in zip(buckets, widths)
                                    for piece in bucket.tensor_split(max(1, -(-len(bucket) // max_rows)))])
        feats, out_labels, out_rows = [], [], []
        for bucket, wb in zip(buckets, widths):
            h = edited(bucket)
            f = model.latent_features(h).unsqueeze(1)                                            # (Rb, 1, out)
            if wb > 1:
                f = torch.cat([f, model.continue_from(h, inputs[bucket, 1:wb])], 1)            # (Rb, Wb, out)
            lab = labels[bucket, :wb]                                                            # (Rb, Wb)
            scored = lab != IGNORE_INDEX
            feats.append(f[scored])
            out_labels.append(lab[scored])
            out_rows.append(bucket[:, None].expand_as(scored)[scored])
        if max_rows is None:
            logits = model.readout(torch.cat(feats))                                             # (n, V)
        else:
            logits = torch.cat([model.readout(f) for f in feats])
        return logits, torch.cat(out_labels), torch.cat(out_rows)

    @staticmethod
    def _packed_run(model, h: torch.Tensor, order: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                    last: torch.Tensor):
        """The continuation of `_run_recurrent` as one packed run (`continue_packed`) from the edited latents h
        (R, d_t) of the run's rows `order` (R,) (bucket by bucket, edited per bucket as in the bucket run),
        every row continued up to its own last scored label, in one shrinking batch: no time step runs past a
        row's last label, and each time step costs one kernel call for every row instead of one per bucket.
        The entries come out in the bucket run's order (bucket by bucket, row by row, position by position),
        so the loss sums them in that order."""
        steps = (last[order] - 1).clamp_min(0)                                                   # (R,)
        by_length = torch.argsort(steps, descending=True, stable=True)
        rank = torch.empty_like(by_length)
        rank[by_length] = torch.arange(len(order), device=order.device)                          # (R,)
        packed = model.continue_packed(h[by_length], inputs[order[by_length], 1:], steps[by_length])  # (N, out)
        longest = int(steps.max()) if len(steps) else 0
        sizes = (steps[None, :] > torch.arange(longest, device=steps.device)[:, None]).sum(1)  # (S,) rows per step
        offsets = torch.cumsum(sizes, 0) - sizes                                                  # (S,)
        lab = labels[order]                                                                       # (R, W)
        scored = lab != IGNORE_INDEX
        row, col = scored.nonzero(as_tuple=True)                                                  # (n,) each
        # position 0 reads the edited latent itself; position t >= 1 the packed step t - 1
        index = torch.where(col == 0, row, len(order) + offsets[(col - 1).clamp(0, max(longest - 1, 0))]
                            + rank[row]) if longest else row
        feats = torch.cat([model.latent_features(h), packed])[index]                              # (n, out)
        return model.readout(feats), lab[scored], order[row]

    # ------------------------------------------------------------------ last-layer Transformer sites
    def _head_only(self, target: int) -> bool:
        """True when only the head follows the target's site (indywise, last Transformer layer's output):
        the run reduces to the head on the edited latents plus constants (``skip_frozen``)."""
        entry = self.models[target]
        model = entry.model
        return (self.skip_frozen and not self.stepwise and getattr(model, "arch", None) == "transformer"
                and entry.site.module == f"hook_layers.{model.n_layers - 1}" and entry.site.io == "output"
                and entry.site.index is None)

    def _head_only_group(self, group: Sequence[TaskPairs]) -> bool:
        """`_head_only` for the group's target, and every chunk's counterfactual prefix is its base's."""
        return self._head_only(group[0].target) and all(c.prefix_is_base for c in group)

    def _rest(self, chunk: TaskPairs, rows: torch.Tensor) -> FrozenRest:
        """The chunk's `FrozenRest`, filled for `rows` (a natural, unpatched run of the rows not seen yet)."""
        rest = self._frozen_rest.get(id(chunk))
        if rest is None:
            rest = self._frozen_rest[id(chunk)] = FrozenRest.empty(len(chunk), self.device)
        todo = rows[~rest.known[rows]].unique()
        model = self.models[chunk.target].model
        # by length, in slices of at most 256 rows: each slice runs at its own width (no padding to the longest)
        todo = todo[torch.argsort((chunk.ids[todo] != 0).sum(1), stable=True)]
        with torch.no_grad():
            for part in (todo.split(min(256, self.eval_rows_per_pass)) if len(todo) else ()):
                b = chunk.batch(part)
                width = max(int((b.input_ids != 0).sum(1).max()), 1)
                x, lab = b.input_ids[:, :width], b.labels[:, :width]                         # (P, W)
                scored = (lab != IGNORE_INDEX) & ~b.edit_mask[:, :width]                      # (P, W)
                logits = model.readout(model.features(x)[scored])                             # (m, V)
                which = torch.arange(len(part), device=x.device)[:, None].expand_as(scored)[scored]  # (m,)
                zeros = torch.zeros(len(part), device=x.device)
                rest.ce[part] = zeros.index_add(0, which, F.cross_entropy(logits, lab[scored], reduction="none"))
                rest.ok[part] = zeros.index_add(0, which, (logits.argmax(-1) == lab[scored]).float())
                rest.count[part] = torch.bincount(which, minlength=len(part)).float()
                rest.known[part] = True
        return rest

    def precompute_frozen(self, split: str = "train") -> None:
        """Fill every pair's `FrozenRest` of `split` now (otherwise each pair's is filled when first read)."""
        for chunk in self.splits[split]:
            if self._head_only_group([chunk]):
                self._rest(chunk, torch.arange(len(chunk), device=self.device))

    def _head_only_rows(self, maps, group: Sequence[TaskPairs], rows: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per run row (chunk after chunk, `rows` each): cross-entropy summed over the scored positions,
        tokens right, scored positions — the same numbers as the full patched run at a last-layer site.

        The edited latent at the intervened position p is the intervention applied to the target's cached
        natural latent there (the counterfactual sequence equals the base sequence up to p, so its latent
        at p is the cached one); its logits predict token p + 1. Every other scored position comes from
        the chunk's `FrozenRest`.
        """
        model = self.models[group[0].target].model
        edited, labels, take, rests = [], [], [], []
        for c in group:
            pos = c.target_pos[rows].long()                                                   # (B,)
            h = c.target_cache.at(c.target_index[rows].long(), pos)                           # (B, d_t)
            edited.append(self.intervention(maps, h, c.source_latents(rows), c.source, c.target, c.block))
            ids, scored = c.ids[rows].long(), c.scored[rows]                                  # (B, L)
            nxt = (pos + 1).clamp(max=ids.shape[1] - 1)[:, None]                              # (B, 1)
            take.append(((pos + 1) < ids.shape[1]) & scored.gather(1, nxt)[:, 0])             # (B,) p scored
            labels.append(ids.gather(1, nxt)[:, 0])
            rests.append(self._rest(c, rows))
        edited, labels, take = torch.cat(edited), torch.cat(labels), torch.cat(take)          # (R, d), (R,)
        logits = model.readout(edited[take])                                                  # (m, V)
        zeros = torch.zeros(len(take), device=edited.device)
        rest_ce = torch.cat([r.ce[rows] for r in rests])
        ce_rows = rest_ce.index_put((take,), rest_ce[take] + F.cross_entropy(logits, labels[take], reduction="none"))
        ok = zeros.index_put((take,), (logits.argmax(-1) == labels[take]).float())
        tok_ok = torch.cat([r.ok[rows] for r in rests]) + ok
        tok_n = torch.cat([r.count[rows] for r in rests]) + take.float()
        return ce_rows, tok_ok, tok_n

    # ------------------------------------------------------------------ lower Transformer layers
    def _resume_layer(self, target: int) -> int | None:
        """Layer l when a step at the target's site can start there (indywise, output of Transformer block l
        below the last one, ``skip_frozen``); None otherwise."""
        entry = self.models[target]
        model = entry.model
        if not (self.skip_frozen and not self.stepwise and getattr(model, "arch", None) == "transformer"
                and entry.site.io == "output" and entry.site.index is None and not model.training):
            return None
        layers = [f"hook_layers.{i}" for i in range(model.n_layers - 1)]
        return layers.index(entry.site.module) if entry.site.module in layers else None

    def _resume_group(self, group: Sequence[TaskPairs]) -> bool:
        """`_resume_layer` for the group's target, every chunk's counterfactual prefix is its base's (the
        target's cached latents hold the layer's output before the intervened token) and every scored
        label sits at or after the intervened position (nothing before it depends on the edit)."""
        return (self._resume_layer(group[0].target) is not None
                and all(c.prefix_is_base and c.scored_after_pos for c in group))

    def _frozen_rows(self, maps, group: Sequence[TaskPairs], rows: torch.Tensor, max_rows: int | None = None):
        """(ce, tokens right, scored positions) per run row by the group's shortcut: `_head_only_rows` at a
        last-layer site, `_resume_rows` at a lower one."""
        if self._resume_group(group):
            return self._resume_rows(maps, group, rows, max_rows=max_rows)
        return self._head_only_rows(maps, group, rows)

    def _frozen_group(self, group: Sequence[TaskPairs]) -> bool:
        """True when the group's target runs by a frozen-prefix shortcut (`_frozen_rows`)."""
        return self._head_only_group(group) or self._resume_group(group)

    def _resume_rows(self, maps, group: Sequence[TaskPairs], rows: torch.Tensor, max_rows: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per run row (chunk after chunk, `rows` each): cross-entropy summed over the scored positions,
        tokens right, scored positions — the full patched run's numbers when the site is the output of
        Transformer block l < L - 1 (indywise).

        Nothing at or below the site depends on the alignment, so it runs without a graph: the layer-l
        output of the counterfactual sequence after p (p the intervened token; for l = 0 of a 2-layer model
        block 0 at those positions only, from the embeddings; otherwise blocks 0..L-2 over the sequence)
        and, up to p, the target's cached latents (the counterfactual prefix is the base's). The edited
        latent (the intervention on the cached one at p) takes position p, and blocks l+1.. run on positions
        p.. only (keys and values before p are the frozen ones), the last block's queries at the scored
        positions only, all at or after p.
        max_rows: rows per pass at most (evaluation: memory bounded).
        """
        entry = self.models[group[0].target]
        model, layer = entry.model, self._resume_layer(group[0].target)
        depth, d = model.n_layers, model.d_model
        width = max(c.ids.shape[1] for c in group)
        ids = torch.cat([F.pad(c.ids[rows].long(), (0, width - c.ids.shape[1])) for c in group])     # (R, W)
        scored = torch.cat([F.pad(c.scored[rows], (0, width - c.scored.shape[1])) for c in group])   # (R, W)
        pos = torch.cat([c.target_pos[rows].long() for c in group])                                  # (R,)
        base_row = torch.cat([c.target_index[rows].long() for c in group])                           # (R,)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(scored[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
        cache = group[0].target_cache
        # the edited latent at p: the intervention on the cached natural latent there (the prefix is the base's)
        edited_all = torch.cat([
            self.intervention(maps, cache.at(c.target_index[rows].long(), c.target_pos[rows].long()),
                              c.source_latents(rows), c.source, c.target, c.block) for c in group])  # (R, d)
        lengths = (ids != 0).sum(1)                                                                  # (R,)
        R = len(ids)
        ce_rows, tok_ok, tok_n = (torch.zeros(R, device=ids.device) for _ in range(3))
        # grouped by the positions each row runs (p .. its end), ~128 rows or more each (at most 8 groups), so
        # no block runs over much padding
        steps_of = lengths - pos                                                                     # (R,)
        buckets = list(torch.argsort(steps_of, stable=True).chunk(min(8, max(1, R // 128))))
        if max_rows is not None:
            buckets = [piece for bucket in buckets
                       for piece in bucket.tensor_split(max(1, -(-len(bucket) // max_rows)))]
        for bucket in buckets:
            p = pos[bucket]                                                                          # (Rb,)
            steps = max(int((lengths[bucket] - p).max()), 1)
            before = max(int(p.max()), 1)                     # context positions: every row's prefix 0..p-1
            absolute = p[:, None] + torch.arange(steps, device=ids.device)[None, :]                  # (Rb, S)
            inside = absolute < lengths[bucket][:, None]
            lab = torch.where(inside, labels[bucket].gather(1, absolute.clamp(max=width - 1)),
                              torch.full_like(absolute, IGNORE_INDEX))                               # (Rb, S)
            take = lab != IGNORE_INDEX
            counts = take.sum(1)                                                                     # (Rb,)
            wanted = max(int(counts.max()), 1)
            # the last block's queries: each row's scored positions first, in order (the rest is padding)
            query = torch.argsort((~take).to(torch.uint8), dim=1, stable=True)[:, :wanted]          # (Rb, M)
            real = torch.arange(wanted, device=ids.device)[None, :] < counts[:, None]               # (Rb, M)
            x = ids[bucket]                                                                          # (Rb, W)
            with torch.no_grad():
                if layer == 0 and depth == 2:
                    # block 0 at positions p+1.. only (keys and values up to p from the embeddings); block 1's
                    # input before p is the target's cached layer-0 latents of the shared prefix
                    after = absolute[:, 1:].clamp(max=width - 1)                                     # (Rb, S-1)
                    natural = (model.blocks_from(0, model.embed(x.gather(1, after)), p + 1,
                                                 [model.embed(x[:, :before + 1])])
                               if steps > 1 else edited_all.new_zeros(len(bucket), 0, d))            # (Rb, S-1, d)
                    cols = torch.minimum(torch.arange(before, device=ids.device)[None, :], p[:, None])
                    contexts = [cache.at(base_row[bucket][:, None], cols)]                          # (Rb, P, d)
                else:  # blocks 0..L-2 over every position; deeper blocks' keys before p come from them
                    span = max(int(lengths[bucket].max()), 1)
                    outputs = model.block_outputs(x[:, :span], depth - 2)                           # (Rb, T, d) each
                    at = absolute[:, 1:].clamp(max=span - 1)[..., None].expand(-1, -1, d)
                    natural = outputs[layer].gather(1, at)                                           # (Rb, S-1, d)
                    contexts = [o[:, :before] for o in outputs[layer:]]
            # only position p carries the alignment's gradient into block l+1 (the rest is the natural run)
            feats = model.blocks_from(layer + 1, torch.cat([edited_all[bucket, None], natural], 1), p, contexts,
                                      query=query, frozen_after=1)                                   # (Rb, M, d)
            logits = model.readout(feats[real])                                                      # (m, V)
            target_ids = lab.gather(1, query)[real]                                                  # (m,)
            which = bucket[:, None].expand_as(real)[real]                                            # (m,)
            ce_rows = ce_rows.index_add(0, which, F.cross_entropy(logits, target_ids, reduction="none"))
            tok_ok = tok_ok.index_add(0, which, (logits.argmax(-1) == target_ids).float())
            tok_n = tok_n.index_add(0, which, torch.ones_like(which, dtype=tok_n.dtype))
        return ce_rows, tok_ok, tok_n

    # ------------------------------------------------------------------ trainer interface
    def loss(self, maps, batch_index: torch.Tensor, directions=None):
        """(1 − ε)·L_behaviour + ε·L_CL over the trained chunks (either term alone when the other is empty);
        `directions`: only the chunks of these directions (a step's sampled budget)."""
        chunks = self._only(self.splits["train"], directions)
        behaviour = [c for c in chunks if c.trained and not c.cl]
        cl_chunks = [c for c in chunks if c.cl]
        if not behaviour and not cl_chunks:
            raise ConfigError("no trained directions: set directions to include at least one (source, target)")
        rows = batch_index.to(self.device)
        info: dict[str, float] = {}
        l_behaviour = None
        if behaviour:
            total = 0.0
            for group in self._groups(behaviour):
                if self._frozen_group(group):
                    ce_rows, _, n_rows = self._frozen_rows(maps, group, rows)           # (G·B,) each
                    sums = ce_rows.view(len(group), -1).sum(1)
                    counts = n_rows.view(len(group), -1).sum(1).clamp(min=1)
                    total = total + (sums / counts).sum()
                    continue
                logits, labels, row = self._run(maps, group, [rows] * len(group), rollout=False)
                ce = F.cross_entropy(logits, labels, reduction="none")                  # (n,)
                chunk_of = torch.div(row, len(rows), rounding_mode="floor")             # (n,)
                sums = torch.zeros(len(group), device=ce.device).index_add(0, chunk_of, ce)
                counts = torch.bincount(chunk_of, minlength=len(group)).clamp(min=1)
                total = total + (sums / counts).sum()
            l_behaviour = total / len(behaviour)
            info["loss_behaviour"] = float(l_behaviour.detach())
        l_cl = None
        if cl_chunks:
            l_cl = sum(self.cl_loss(maps, c, rows) for c in cl_chunks) / len(cl_chunks)
            info["loss_cl"] = float(l_cl.detach())
        if l_behaviour is None:
            return l_cl, info
        if l_cl is None:
            return l_behaviour, info
        return (1 - self.cl_epsilon) * l_behaviour + self.cl_epsilon * l_cl, info

    def direction_losses(self, maps, batch_index: torch.Tensor) -> dict[tuple[int, int, str], float]:
        """Each trained (source, target, variable)'s own loss on these rows (the trainer asks only when the
        total loss is not finite, to name the culprits)."""
        rows = batch_index.to(self.device)
        out = {}
        for c in self.splits["train"]:
            if c.cl:
                out[(c.source, c.target, c.variable)] = float(self.cl_loss(maps, c, rows))
            elif c.trained:
                logits, labels, _ = self._run(maps, [c], [rows], rollout=False)
                out[(c.source, c.target, c.variable)] = float(F.cross_entropy(logits, labels))
        return out

    def intervened_latents(self, maps, chunk: TaskPairs, rows: torch.Tensor) -> torch.Tensor:
        """ĥ (rows, d_t): the intervened target latent at target_pos in the target's native space."""
        return self.intervention(maps, chunk.target_latents[rows], chunk.source_latents(rows), chunk.source,
                                 chunk.target, chunk.block)

    def cl_loss(self, maps, chunk: TaskPairs, rows: torch.Tensor) -> torch.Tensor:
        """L_CL = ½[(1 − cos(ĥ, h_cl)) + mean_d (ĥ − h_cl)²] over matched pairs."""
        h_hat = self.intervened_latents(maps, chunk, rows)
        h_cl = chunk.cl_latents[rows]
        return cl_loss(h_hat, h_cl, chunk.cl_matched[rows])

    def evaluate(self, maps, split: str = "valid", with_ci: bool = False, rollout: bool | None = None
                 ) -> list[Record]:
        """One record per (source, target, variable).

        rollout: run the autoregressive rollout (default: when with_ci, i.e. for reported results). The
        rollout feeds the model's own prediction exactly at the scored tokens, so its history equals the
        teacher-forced one up to the first error: "every scored token right" is the same event in both
        (tested). Frequent validation during training therefore uses the teacher-forced pass only.
        """
        return super().evaluate(maps, split, with_ci, rollout=with_ci if rollout is None else rollout)

    def _pair_scores(self, maps, split: str, with_ci: bool, rollout: bool = False) -> dict[int, PairScores]:
        out = {}
        for group in self._groups(self.splits[split]):
            per_chunk = {id(c): {"trial": [], "tok_ok": [], "tok_n": [], "loss": 0.0} for c in group}
            n = len(group[0])
            for lo in range(0, n, self.eval_batch_size):
                rows = torch.arange(lo, min(n, lo + self.eval_batch_size), device=self.device)
                R = len(rows) * len(group)
                with torch.no_grad():
                    if self._frozen_group(group):
                        ce_rows, tok_ok, tok_n = self._frozen_rows(maps, group, rows,
                                                                   max_rows=self.eval_rows_per_pass)  # (R,) each
                    else:
                        logits, labels, row = self._run(maps, group, [rows] * len(group), rollout=False,
                                                        max_rows=self.eval_rows_per_pass)
                        ok = logits.argmax(-1) == labels
                        tok_ok = torch.zeros(R, device=ok.device).index_add(0, row, ok.float())   # (R,)
                        tok_n = torch.bincount(row, minlength=R).float()
                        ce_rows = torch.zeros(R, device=ok.device).index_add(
                            0, row, F.cross_entropy(logits, labels, reduction="none"))
                    if rollout:
                        ro_logits, ro_labels, ro_row = self._run(maps, group, [rows] * len(group), rollout=True,
                                                                 max_rows=self.eval_rows_per_pass)
                        ro_ok = torch.zeros(R, device=tok_ok.device).index_add(
                            0, ro_row, (ro_logits.argmax(-1) == ro_labels).float())
                        trial = ro_ok == tok_n
                    else:
                        trial = tok_ok == tok_n
                for i, c in enumerate(group):
                    seg = slice(i * len(rows), (i + 1) * len(rows))
                    acc = per_chunk[id(c)]
                    acc["trial"].append(trial[seg].cpu())
                    acc["tok_ok"].append(tok_ok[seg].cpu())
                    acc["tok_n"].append(tok_n[seg].cpu())
                    acc["loss"] += float(ce_rows[seg].sum())
            for c in group:
                acc = per_chunk[id(c)]
                out[id(c)] = PairScores(trial=torch.cat(acc["trial"]).numpy().astype(float),
                                        correct=torch.cat(acc["tok_ok"]).numpy(),
                                        scored=torch.cat(acc["tok_n"]).numpy(), loss_sum=acc["loss"])
        return out

    def _extra_fields(self, maps, chunk: TaskPairs, scores: PairScores, with_ci: bool) -> dict:
        fields = {"trained_by": "cl" if chunk.cl else ("behaviour" if chunk.trained else "none")}
        if chunk.cl:
            fields["cl_unmatched"] = int((~chunk.cl_matched).sum())
            with torch.no_grad():
                fields["cl_loss"] = float(self.cl_loss(maps, chunk, torch.arange(len(chunk), device=self.device)))
        if with_ci:
            trial = scores.trial
            fields["trial_iia_by_quantity"] = {
                int(q): float(trial[chunk.quantity == q].mean()) for q in np.unique(chunk.quantity)}
        return fields


# ---------------------------------------------------------------------------------------------- building
def task_model_infos(config) -> tuple[list[str], list[dict | None]]:
    """(problems, manifest entries) of a run config's task models, without loading weights: unknown model
    names, and variables their tasks do not have. ``problems`` is empty when everything resolves."""
    problems, infos = [], []
    for i, m in enumerate(config.models):
        try:
            run_dir, entry = resolve_model_dir(m.name)
            info = entry or {"task": read_run_config(run_dir)["train"]["task"]}
        except ConfigError as e:
            problems.append(f"models.{i}.name: {e}")
            infos.append(None)
            continue
        infos.append(info)
        task = get_task(info["task"])
        for v in config.variables:
            own = m.variable_map.get(v, v)
            if own not in ("full", "null", *task.variables):
                problems.append(f"variables: {own!r} is not a variable of task {task.name!r} (models.{i}); valid: "
                                f"full, {', '.join(task.variables)}")
    return problems, infos


def build_task_problem(config, *, shard: Shard | None = None, log: Callable[[str], None] | None = None
                       ) -> TaskModelProblem:
    """Load the configured task models and build their `TaskModelProblem`.

    config: a run config (``llm_mas.run_config.MASConfig``) whose models all have ``kind: task``; their names
    and variables were checked when it was loaded. Task models run in one process (``shard`` must be None
    or a single-process shard).
    """
    if shard is not None and shard.world > 1:
        raise ConfigError("models: data-parallel MAS runs HF models only (kind: hf); run task models with "
                          "`llm-mas mas`")
    problems, _ = task_model_infos(config)
    if problems:
        raise ConfigError(problems)
    entries = []
    for i, m in enumerate(config.models):
        try:
            model = load_task_model(m.name).to(config.device)
        except DataError as e:
            raise DataError(f"models.{i} ({m.name}): {e}") from None
        if m.untrained:  # control: same architecture, fresh random weights (a new model; the loaded one is dropped)
            model = build_from_settings(model.config, seed=10_000 + config.seed * 7 + i)
            model.eval().requires_grad_(False).to(config.device)
        site = resolve_site(model, m.site)
        get_module(model, site)  # wrong path -> SiteError listing close names
        entries.append(TaskModelEntry(name=Path(m.name).name + ("-untrained" if m.untrained else ""), model=model,
                                      site=site, width=model.d_model, task=get_task(model.task_name),
                                      variable_map=dict(m.variable_map)))
    widths = [e.width for e in entries]
    k = config.k if config.k is not None else min(widths) // 2
    names = [e.name for e in entries]
    if len(set(names)) != len(names):  # the same model twice (e.g. a model and itself): keep names distinct
        for i, e in enumerate(entries):
            e.name = f"{e.name}#{i}"
    return TaskModelProblem(entries, config.variables, k, null_subspace=config.null_subspace,
                            stepwise=config.data.stepwise, train_directions=config.train_directions(),
                            n_train=config.data.n_train, n_valid=config.data.n_valid, seed=config.seed,
                            intervention=config.intervention, eval_batch_size=config.eval.batch_size,
                            device=config.device, progress=config.progress,
                            cl_directions=config.cl_directions(), cl_epsilon=config.cl.epsilon,
                            cl_match_on=config.cl.match_on, value_range=config.data.value_range)


def task_model_header_problems(config) -> tuple[list[str], list[str]]:
    """(config problems, data problems) of the task models found from their config.yaml and the header of
    their weights file, without loading any weights: the site exists in the architecture, k and the
    variable blocks fit the smallest latent width (d_model; LSTM: [h; c]), the manifest's architecture is
    the one config.yaml describes, and the weights file holds exactly that architecture's tensors."""
    from safetensors import safe_open

    from ..interventions import variable_blocks
    from ..models.training import check_fits

    problems, data_problems, widths = [], [], []
    for i, m in enumerate(config.models):
        try:
            run_dir, entry = resolve_model_dir(m.name)
            settings = dict(read_run_config(run_dir)["model"])
        except MASError as e:
            data_problems.append(f"models.{i} ({m.name}): {e}")
            continue
        arch = settings.get("arch")
        if entry is not None and entry.get("arch") not in (None, arch):
            data_problems.append(
                f"models.{i} ({m.name}): the manifest lists a {entry['arch']!r} model but "
                f"{str(run_dir / 'config.yaml')!r} describes a {arch!r} one; the directory holds another "
                "checkpoint: restore it, or rebuild the manifest with `python -m llm_mas.models.registry`")
            continue
        try:
            model = build_from_settings(settings)
        except (MASError, KeyError, TypeError) as e:
            data_problems.append(f"models.{i} ({m.name}): {str(run_dir / 'config.yaml')!r} does not describe a "
                                 f"task model ({e}); restore it or retrain with `llm-mas train-model`")
            continue
        widths.append(model.d_model)
        try:
            get_module(model, resolve_site(model, m.site))
        except MASError as e:
            problems.append(f"models.{i}.site: {e}")
        weights = run_dir / "model.safetensors"
        if not weights.exists():
            data_problems.append(f"models.{i} ({m.name}): {str(run_dir)!r} has no model.safetensors (training "
                                 "not finished?)")
            continue
        try:
            with safe_open(str(weights), "pt") as f:  # reads the header only
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            if weights.stat().st_size < _data_end(weights):
                raise ValueError("the file is shorter than its header says (truncated)")
        except Exception as e:  # safetensors raises its own error type
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            data_problems.append(f"models.{i} ({m.name}): {str(weights)!r} is not a readable safetensors file "
                                 f"({first}); the checkpoint is corrupted: retrain or restore it")
            continue
        try:
            check_fits(weights, model, shapes)
        except DataError as e:
            data_problems.append(f"models.{i} ({m.name}): {e}")
    if widths and not problems:
        d_min = min(widths)
        k = config.k if config.k is not None else d_min // 2
        if k > d_min:
            problems.append(f"k={k} is larger than the smallest latent width among the models ({d_min}); use "
                            f"k <= {d_min}")
        else:
            try:
                variable_blocks(config.variables, k, d_min, null=config.null_subspace)
            except ConfigError as e:
                problems.extend(f"k: {p}" for p in e.problems)
    return problems, data_problems


def _data_end(path: Path) -> int:
    """Where the last tensor of a safetensors file ends (8-byte header length + header + data)."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def check_task_models(config) -> tuple[list[str], list[str]]:
    """(config problems, data problems) of a config's task models, without loading weights (the task kind's
    check). A run of task models alone: names, variables of their tasks, sites, k, the checkpoints' headers.
    A run on counterfactual tensors: names and sites. (A counterfactual text/task run checks them when it
    builds its problem.)"""
    if config.kind == "task":
        problems, _ = task_model_infos(config)
        return (problems, []) if problems else task_model_header_problems(config)
    if config.kind != "tensors":
        return [], []
    problems: list[str] = []
    for i, m in enumerate(config.models):
        if getattr(m, "kind", None) != "task":
            continue
        try:
            run_dir, _ = resolve_model_dir(m.name)
        except ConfigError as e:
            problems.append(f"models.{i}.name: {e}")
            continue
        try:
            model = build_from_settings(read_run_config(run_dir)["model"])
            get_module(model, resolve_site(model, m.site))
        except MASError as e:  # before KeyError: a SiteError is one
            if not isinstance(e, DataError):
                problems.append(f"models.{i}.site: {e}")
        except (KeyError, TypeError):
            continue  # a broken checkpoint is named when the run loads it
    return problems, []
