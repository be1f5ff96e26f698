"""Stepwise MAS between Hugging Face causal LMs (docs/method.md).

    llm-mas mas llm_tiny         # after `python -m recipes.llm_mas_smoke --prepare-only`
    llm-mas mas llm_deepseek         # one GPU (see the preset's first line)
    accelerate launch --multi_gpu --num_processes N ... -m llm_mas.distributed CONFIG.yaml   # N GPUs

``build_llm_problem(config)`` (the runner's builder for ``kind: hf`` models) returns an ``LLMProblem`` that
``MASTrainer`` trains. Data path, per model i:

    load_causal_lm(name, dtype, device, adapter) → load_recording(recording, model) (verified: weights
    fingerprint + >= 99.5 % of its predictions reproduced) → Recording.split(0.2, seed=741) → train / valid
    → latents at the site (default ``embeddings``) of the model on its own recorded sequences, collected
    ONCE per split and cached on the model's device, (N, L, d) in the model's dtype.

For every ordered direction (s, t), s = t included, ``stepwise_pairs`` draws ``data.n_train`` (``n_valid``)
pairs with an index i ~ U[10, L-10): the target runs on its own tokens at 0..i and the source's tokens after
i, its latents at positions 0..i are replaced by

    h_t' = A_t⁻¹((1 − m) ⊙ A_t(h_t) + m ⊙ A_s(h_s))        (m: the first k aligned coordinates)

with h_s from the source's cache (same positions, moved to the target's device per batch), and it must emit
the source model's greedy predictions at positions >= i (teacher forced).

- Loss: cross-entropy over positions >= i, averaged over the tokens of each direction, then over the
  trained directions.
- Token IIA: argmax of the intervened target == the source's prediction, over positions >= i (micro-averaged
  over tokens); trial IIA: all of those tokens right. Per direction, bootstrap 95 % CIs (over pairs).
- Every model runs on its own device (``models.i.device``, default the run's ``device``) through its own
  backend (``models.i.backend``: ``torch`` forward hooks, ``nnsight`` tracing, or ``tlens`` hook points of
  an offline ``HookedTransformer`` conversion). Alignments live on the run's ``device``; their evaluated
  matrices are copied to each target's device once per forward pass. Interventions run in float32 and are
  cast back to the model's dtype.
- Steps start at the site (``models.i.skip_below_site``, default true): at a ``layer{l}`` site of a torch or
  nnsight model, nothing below the site depends on the alignments. On a pair's counterfactual input (the
  target's tokens up to i, the source's after) the output of layer l is the same at every step: at the
  positions after i as well, since they read only unedited layers 0..l. So a step takes that output from a
  per-pair cache, writes the intervened values at positions 0..i, runs layers l+1..
  (`llm_mas.backends.resume.LayerResume`, checked against the full forward once per model) and the head on
  the scored positions' span only. Same losses, gradients and records as the full forward up to float
  rounding. Where it cannot apply (the ``embeddings`` site: nothing below it; the ``tlens`` backend's
  converted model; a model whose layers fail the check) the run logs why and runs the whole model, as with
  ``skip_below_site: false``.
- The site cache (config section ``site_cache``): a pair's layer-l output is computed without a graph the
  first time a batch reads the pair. Places are given up front, train pairs of the trained directions
  first (read at every epoch), then the valid pairs: in memory on the target's device up to
  ``site_cache_bytes`` (``site_cache.memory_mib``, 2 GiB) in all, then in files up to ``site_disk_bytes``
  (``site_cache.disk_mib``) in all, written once and read back (through the OS page cache) at each later
  read; pairs beyond both are recomputed, layers 0..l only, at every read. The run logs per model how many
  pairs sit where. Disk is off by default: a run at the paper's scale would write gigabytes (10 000 pairs ×
  4 directions at d = 1536, L = 64 in bf16: 7.3 GiB), and where they may go (a /tmp in memory would only
  move the memory) is the user's call. The files live in a fresh ``llm_mas-site-cache-*`` directory under
  ``site_cache_dir`` (``site_cache.dir``; default the system's temporary directory), removed when the problem
  is garbage-collected or the process exits. A killed process leaves it behind; the next run that spills
  under the same directory on the same host removes it (each directory names its owning process) and logs it.
- Data parallelism: pass a ``Shard`` (``llm_mas.distributed``): the loss then covers this process's
  rows of each batch (scaled so the average of the processes' gradients is the full batch's gradient) and
  evaluation gathers every process's pairs, so all processes see identical records.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..alignments import AlignmentMap
from ..backends import get_backend
from ..backends.base import Edit
from ..backends.resume import LayerResume, site_layer
from ..errors import ConfigError, DataError, InterventionError
from ..files import left_by_dead_process, this_process
from ..llm.loading import load_causal_lm, parse_device, parse_dtype
from ..llm.record import IGNORE_INDEX, Recording, StepwisePairs, load_recording, stepwise_pairs
from ..sites import Site
from .base import DirectionPairs, ModelEntry, PairScores, ProblemBase, Shard

VALID_FRACTION = 0.2        # recordings are split 80/20
SPLIT_SEED = 741            # the seed of that split
MIN_PREFIX = MIN_SUFFIX = 10  # i ~ U[10, L - 10)
SPLIT_IDS = {"train": 0, "valid": 1}
# layer-l outputs of the pairs' counterfactual inputs kept in memory for steps that start at the site (all
# directions and splits of one process together); pairs beyond it go to disk up to the disk budget (default
# none: module docstring), the rest are recomputed (layers 0..l, no graph) at every step
SITE_CACHE_BYTES = 2 << 30
SITE_DISK_BYTES = 0


@dataclass
class LLMModelEntry(ModelEntry):
    """One resolved HF model taking part in LLM MAS (``problem.models[i]``); ``model`` is what the backend
    runs: the HF model, or a HookedTransformer for ``tlens``."""

    tokenizer: Any
    backend: Any             # llm_mas.backends Backend
    device: torch.device
    dtype: torch.dtype
    recording: Recording
    splits: dict[str, Recording]
    latents: dict[str, torch.Tensor]   # split -> (N_split, L, d) on `device`, model dtype


@dataclass
class LLMPairs(DirectionPairs):
    """The stepwise pairs of one (source, target) direction on one split, tensors on the target's device."""

    target_ids: torch.Tensor    # (P, L) long
    mask: torch.Tensor          # (P, L) bool, positions 0..i
    labels: torch.Tensor        # (P, L) long, IGNORE_INDEX before i
    source_rows: torch.Tensor   # (P,) rows of the source's cache of this split (on the source's device)
    index: torch.Tensor         # (P,) the step i (CPU)

    def __len__(self) -> int:
        return int(self.target_ids.shape[0])


class _SpillDir:
    """A fresh directory for one problem's spilled site outputs, made on first use (``tempfile.mkdtemp`` under
    `parent`, None: the system's temporary directory) and removed with everything in it when this object is
    garbage-collected or the process exits (whichever comes first).

    A killed process cannot remove its directory, so each directory names its owner (an ``owner`` file: host
    and process id, ``llm_mas.files.this_process``), and making a new one removes the directories beside it
    whose owner ran on this host and is no longer running (said in `log`). A directory without a readable
    owner, or owned on another host or by a live process, is left alone."""

    PREFIX = "llm_mas-site-cache-"
    OWNER = "owner"

    def __init__(self, parent: str | None, log: Callable[[str], None] | None = None):
        self.parent = None if parent is None else os.path.expanduser(parent)
        self.path: Path | None = None
        self._files = 0
        self._log = log or (lambda s: None)

    def _reclaim(self) -> list[Path]:
        """Remove the directories beside this one that a process of this host left behind when it died."""
        removed = []
        for other in sorted(self.path.parent.glob(self.PREFIX + "*")):
            if other == self.path or not other.is_dir():
                continue
            try:
                owner = json.loads((other / self.OWNER).read_text())
            except (OSError, ValueError):
                continue
            if left_by_dead_process(owner):
                shutil.rmtree(other, ignore_errors=True)
                removed.append(other)
        return removed

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled CPU tensor backed by a new file of this directory (written through, read back by
        mapping: the OS page cache, not the process, holds what is read)."""
        if self.path is None:
            if self.parent is not None:
                Path(self.parent).mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=self.PREFIX, dir=self.parent))
            weakref.finalize(self, shutil.rmtree, str(self.path), ignore_errors=True)
            (self.path / self.OWNER).write_text(json.dumps(this_process()))
            removed = self._reclaim()
            if removed:
                self._log(f"site_cache: removed {len(removed)} spill director{'y' if len(removed) == 1 else 'ies'} "
                          f"left by processes of this host no longer running: {', '.join(map(str, removed))}")
        numel = math.prod(shape)
        file = self.path / f"{self._files}.bin"
        self._files += 1
        with open(file, "xb") as f:          # a new file: nothing is overwritten
            f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        return torch.from_file(str(file), shared=True, size=numel, dtype=dtype).view(shape)


class _SiteCache:
    """The target's layer-l output on one direction's counterfactual inputs of one split, filled as pairs are
    first read: pairs 0..memory-1 in memory (on the model's device), the next `disk` pairs in a file of
    `spill` (read back to the model's device), the rest recomputed (layers 0..l, no graph) at every read."""

    def __init__(self, n_pairs: int, memory: int, disk: int = 0, spill: _SpillDir | None = None):
        self.memory, self.disk, self.spill = memory, disk, spill
        self.values: torch.Tensor | None = None   # (memory, L, d) on the model's device, allocated on first use
        self.spilled: torch.Tensor | None = None  # (disk, L, d) file-backed, on the CPU, made on first use
        self.filled = torch.zeros(n_pairs, dtype=torch.bool)

    @property
    def recomputed(self) -> int:
        return len(self.filled) - self.memory - self.disk

    def _store(self, todo: torch.Tensor, fresh: torch.Tensor) -> None:
        """Keep the layer-l outputs `fresh` (n, L, d) of pairs `todo` (n,) (CPU, each within memory + disk)."""
        to_memory = todo < self.memory
        if bool(to_memory.any()):
            if self.values is None:
                self.values = fresh.new_empty(self.memory, *fresh.shape[1:])
            self.values[todo[to_memory].to(fresh.device)] = fresh[to_memory.to(fresh.device)]
        if not bool(to_memory.all()):
            if self.spilled is None:
                self.spilled = self.spill.tensor((self.disk, *fresh.shape[1:]), fresh.dtype)
            self.spilled[todo[~to_memory] - self.memory] = fresh[(~to_memory).to(fresh.device)].cpu()
        self.filled[todo] = True

    def rows(self, resume: LayerResume, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), L, d) layer-l output on ids[rows] (`ids` (P, L) on the model's device), no graph."""
        rows_cpu = rows.cpu()
        in_memory = rows_cpu < self.memory
        kept = rows_cpu < self.memory + self.disk
        todo = rows_cpu[kept & ~self.filled[rows_cpu]].unique()
        if len(todo):
            self._store(todo, resume.collect(ids[todo.to(ids.device)]))                   # (n, L, d)
        if bool(in_memory.all()):
            return self.values[rows_cpu.to(self.values.device)]
        parts = []                                                    # (which rows, their values)
        if bool(in_memory.any()):
            parts.append((in_memory, self.values[rows_cpu[in_memory].to(self.values.device)]))
        on_disk = kept & ~in_memory
        if bool(on_disk.any()):
            parts.append((on_disk, self.spilled[rows_cpu[on_disk] - self.memory].to(ids.device)))
        if not bool(kept.all()):                                      # pairs beyond both budgets
            parts.append((~kept, resume.collect(ids[rows_cpu[~kept].to(ids.device)])))
        if len(parts) == 1:
            return parts[0][1]
        out = parts[0][1].new_empty(len(rows_cpu), *parts[0][1].shape[1:])
        for which, values in parts:
            out[which.to(out.device)] = values
        return out


def _map_to(amap: AlignmentMap, device: torch.device) -> AlignmentMap:
    """The same (differentiable) map with its tensors on ``device``."""
    tensors = [amap.weight, amap.inverse_weight, amap.bias, amap.mean, amap.std]
    if all(t is None or t.device == device for t in tensors):
        return amap
    weight, inverse_weight, bias, mean, std = (None if t is None else t.to(device) for t in tensors)
    return AlignmentMap(amap.kind, amap.d, amap.dim_out, weight=weight, inverse_weight=inverse_weight, bias=bias,
                        mean=mean, std=std, keeps_complement=amap.keeps_complement)


def _row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R, L, V) logits, (R, L) labels -> (R,) sum of the float32 cross-entropy over each row's scored tokens.

    Only scored positions (labels != IGNORE_INDEX) are upcast and normalised: with a 150k vocabulary the
    logits of the unscored prefix would otherwise double the memory of the loss.
    """
    scored = labels != IGNORE_INDEX                                       # (R, L)
    row = scored.nonzero(as_tuple=True)[0]                                # (n_scored,)
    per_token = F.cross_entropy(logits[scored].float(), labels[scored], reduction="none")  # (n_scored,)
    return torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, row, per_token)


class LLMProblem(ProblemBase):
    """Stepwise LLM MAS pairs, cached source latents, loss and IIA for ``MASTrainer`` (module docstring)."""

    supported_interventions = ("interchange", "stitch")

    def __init__(self, models: Sequence[LLMModelEntry], k: int, *,
                 train_directions: Sequence[tuple[int, int]] | None = None, n_train: int = 10_000,
                 n_valid: int = 1_000, seed: int = 0, intervention: str = "interchange", eval_batch_size: int = 16,
                 shard: Shard | None = None, skip_below_site: bool | Sequence[bool] = True,
                 site_cache_bytes: int = SITE_CACHE_BYTES, site_disk_bytes: int = SITE_DISK_BYTES,
                 site_cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None):
        """skip_below_site: per model (or one value for all), whether steps on it as a target start at its
        site (module docstring); site_cache_bytes: the memory the cached site outputs may take in all (they live
        on their target's device, in its dtype); site_disk_bytes: the disk the outputs of pairs beyond that
        may take in all (0: none, they are recomputed at every read), in a fresh directory under
        site_cache_dir (None: the system's temporary directory) removed with the problem."""
        super().__init__(models, ["full"], k, stepwise=True, train_directions=train_directions,
                         intervention=intervention, n_train=n_train, n_valid=n_valid, seed=seed,
                         eval_batch_size=eval_batch_size)
        self.block = self.blocks["full"]
        self.shard = shard or Shard()
        self.latent_stats = [self._stats(m.latents["train"]) for m in self.models]
        self.splits = {split: [self._direction(s, t, split, size) for s, t in self.directions]
                       for split, size in (("train", n_train), ("valid", n_valid))}
        flags = [skip_below_site] * len(self.models) if isinstance(skip_below_site, bool) else list(skip_below_site)
        if len(flags) != len(self.models):
            raise ConfigError(f"skip_below_site lists {len(flags)} values for {len(self.models)} models; give one "
                              "per model or one bool")
        problems = [f"{name} must be >= 0, got {value}" for name, value in
                    (("site_cache_bytes", site_cache_bytes), ("site_disk_bytes", site_disk_bytes)) if value < 0]
        if site_cache_dir is not None:
            problems += [f"site_cache_dir: {p}" for p in site_cache_dir_problems(site_cache_dir)]
        if problems:
            raise ConfigError(problems)
        say = log or (lambda s: None)
        self._spill = _SpillDir(None if site_cache_dir is None else str(site_cache_dir), say)
        self.resumes: list[LayerResume | None] = []
        for i, on in enumerate(flags):
            self.resumes.append(self._layer_resume(i, on, say))
        self._site_caches: dict[tuple[str, int], _SiteCache] = {}
        self.site_cache_pairs = self._plan_site_caches(int(site_cache_bytes), int(site_disk_bytes))
        for i, counts in enumerate(self.site_cache_pairs):
            if counts is not None:
                say(self._site_cache_line(i, counts))

    # ------------------------------------------------------------------ steps that start at the site
    def _layer_resume(self, index: int, on: bool, log: Callable[[str], None]) -> LayerResume | None:
        """The model's `LayerResume` at its site when steps can start there; else None, saying why in `log`."""
        entry = self.models[index]
        if not on:
            return None
        why = None
        if entry.backend.name not in ("torch", "nnsight"):
            why = f"the {entry.backend.name} backend runs its own model code"
        else:
            try:
                layer = site_layer(entry.model, entry.site.module, entry.site.io, entry.site.index)
                shared = [r for r, m in zip(self.resumes, self.models)
                          if r is not None and m.model is entry.model and r.layer == layer]
                resume = shared[0] if shared else LayerResume(entry.model, layer)
            except InterventionError as e:
                why = str(e)
        if why is not None:
            log(f"models.{index}: steps run the whole model ({why})")
            return None
        log(f"models.{index}: steps start at its site, decoder layer {layer} (its output on each pair is cached; "
            f"layers {layer + 1}.. run per step)")
        return resume

    def _plan_site_caches(self, memory_bytes: int, disk_bytes: int) -> list[dict[str, int] | None]:
        """Give each direction and split whose target starts at its site its pairs' places: memory first,
        then disk, in the order train (trained directions: read at every epoch) then valid (every direction);
        pairs beyond both budgets are recomputed; the train pairs of untrained directions (never read) get no
        place. Per model (None where steps run the whole model): pairs read in memory, on disk and recomputed."""
        counts: list[dict[str, int] | None] = [None if r is None else {"memory": 0, "disk": 0, "recomputed": 0}
                                               for r in self.resumes]
        self._site_cache_mib = [{"memory": 0.0, "disk": 0.0} for _ in self.resumes]   # what the log line says
        order = [("train", d) for d in self.splits["train"] if d.trained] + [("valid", d) for d in self.splits["valid"]]
        planned = {id(d) for _, d in order}
        for split, d in order + [("train", d) for d in self.splits["train"] if id(d) not in planned]:
            if self.resumes[d.target] is None:
                continue
            entry = self.models[d.target]
            P, L = d.target_ids.shape
            row_bytes = L * entry.width * torch.empty((), dtype=entry.dtype).element_size()
            memory = min(P, memory_bytes // row_bytes) if id(d) in planned else 0
            disk = min(P - memory, disk_bytes // row_bytes) if id(d) in planned else 0
            memory_bytes -= memory * row_bytes
            disk_bytes -= disk * row_bytes
            cache = self._site_caches[(split, id(d))] = _SiteCache(P, memory, disk, self._spill)
            if id(d) in planned:
                for place, n in (("memory", memory), ("disk", disk), ("recomputed", cache.recomputed)):
                    counts[d.target][place] += n
                self._site_cache_mib[d.target]["memory"] += memory * row_bytes / 2**20
                self._site_cache_mib[d.target]["disk"] += disk * row_bytes / 2**20
        return counts

    def _site_cache_line(self, index: int, counts: dict[str, int]) -> str:
        """The log line saying where model `index`'s layer-l outputs are kept."""
        entry, mib = self.models[index], self._site_cache_mib[index]   # bytes as planned, direction by direction
        line = (f"models.{index}: site outputs of {sum(counts.values())} pairs: {counts['memory']} in memory "
                f"({mib['memory']:.1f} MiB on {entry.device}), {counts['disk']} on disk "
                f"({mib['disk']:.1f} MiB), {counts['recomputed']} recomputed at every read")
        if counts["recomputed"]:
            line += " (a larger site_cache.memory_mib or site_cache.disk_mib keeps them)"
        return line

    def _site_outputs(self, direction: LLMPairs, split: str, rows: torch.Tensor, resume: LayerResume
                      ) -> torch.Tensor:
        """(len(rows), L, d) the target's layer-l output on the direction's counterfactual inputs `rows`."""
        return self._site_caches[(split, id(direction))].rows(resume, direction.target_ids, rows)

    @property
    def cached_site_bytes(self) -> int:
        """Bytes the site outputs cached in memory take now (at most the `site_cache_bytes` given)."""
        return sum(c.values.numel() * c.values.element_size() for c in self._site_caches.values()
                   if c.values is not None)

    @property
    def spilled_site_bytes(self) -> int:
        """Bytes of the files holding site outputs on disk now (at most the `site_disk_bytes` given)."""
        return sum(c.spilled.numel() * c.spilled.element_size() for c in self._site_caches.values()
                   if c.spilled is not None)

    @property
    def site_spill_dir(self) -> Path | None:
        """The directory of this problem's spilled site outputs (None until the first is written)."""
        return self._spill.path

    # ------------------------------------------------------------------ data
    @staticmethod
    def _stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature (mean, std) over every recorded position, float32 on the CPU."""
        x = latents.reshape(-1, latents.shape[-1]).float()  # (N·L, d)
        return x.mean(0).cpu(), x.std(0).clamp(min=1e-6).cpu()

    def _direction(self, s: int, t: int, split: str, n_pairs: int) -> LLMPairs:
        seed = int(np.random.SeedSequence([self.seed, SPLIT_IDS[split], s, t]).generate_state(1)[0])
        source, target = self.models[s], self.models[t]
        pairs: StepwisePairs = stepwise_pairs(source.splits[split], target.splits[split], n_pairs, seed=seed,
                                              min_prefix=MIN_PREFIX, min_suffix=MIN_SUFFIX)
        dev = target.device
        return LLMPairs(s, t, "full", self.block, (s, t) in self.train_directions, pairs.target_ids.to(dev),
                        pairs.mask.to(dev), pairs.labels.to(dev), pairs.source_rows.to(source.device), pairs.index)

    # ------------------------------------------------------------------ one patched run per target
    def _edit(self, direction: LLMPairs, split: str, rows: torch.Tensor, full_mask: torch.Tensor,
              maps: dict[int, AlignmentMap]) -> Edit:
        """The Edit replacing the target's latents at this direction's rows (placed inside `full_mask`)."""
        return Edit(site=self.models[direction.target].site, mask=full_mask,
                    fn=self._edit_fn(direction, split, rows, maps))

    def _edit_fn(self, direction: LLMPairs, split: str, rows: torch.Tensor, maps: dict[int, AlignmentMap]):
        """fn(h (n, d), which (n,)) -> (n, d): the intervened latents of this direction's entries `which`
        (row-major over its mask at `rows`)."""
        source, target = self.models[direction.source], self.models[direction.target]
        r, c = direction.mask[rows].nonzero(as_tuple=True)            # entries in row-major order
        source_rows = direction.source_rows[rows.to(source.device)]
        h_source = source.latents[split][source_rows[r.to(source.device)], c.to(source.device)]  # (entries, d_s)
        h_source = h_source.to(target.device, torch.float32)
        intervention, block = self.intervention, direction.block
        s, t = direction.source, direction.target
        # interventions run in float32 (the model's dtype comes back through the backend)
        upcast = (lambda h: h.float()) if intervention.reads_target else (lambda h: h)

        def fn(h, which):
            return intervention(maps, upcast(h), h_source[which], s, t, block)  # (n, d_t)
        return fn

    def _run(self, maps: Sequence[AlignmentMap], directions: Sequence[LLMPairs], split: str,
             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the (shared) target of `directions` once on their concatenated rows → logits (R, L, V), labels."""
        target = self.models[directions[0].target]
        dev = target.device
        rows = rows.to(dev)
        moved = {i: _map_to(maps[i], dev) for i in {d.source for d in directions} | {directions[0].target}}
        inputs = torch.cat([d.target_ids[rows] for d in directions])   # (R, L)
        labels = torch.cat([d.labels[rows] for d in directions])       # (R, L)
        resume = self.resumes[directions[0].target]
        if resume is not None:
            return self._run_resumed(resume, moved, directions, split, rows, inputs, labels)
        R, L = inputs.shape
        edits = []
        for j, d in enumerate(directions):
            full = torch.zeros(R, L, dtype=torch.bool, device=dev)
            full[j * len(rows):(j + 1) * len(rows)] = d.mask[rows]
            edits.append(self._edit(d, split, rows, full, moved))
        feed = {"input_ids": inputs, **target.backend.feed_options}
        logits = target.backend.patch(target.model, feed, edits)      # (R, L, V)
        return logits, labels

    def _run_resumed(self, resume: LayerResume, maps: dict[int, AlignmentMap], directions: Sequence[LLMPairs],
                     split: str, rows: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_run` from the site: the cached layer-l outputs, the intervened values written at every direction's
        mask, layers l+1.. and the head on the positions from the rows' first scored one on.
        Returns logits (R, L', V) and labels (R, L') of the last L' positions (every scored one)."""
        hidden = torch.cat([self._site_outputs(d, split, rows, resume) for d in directions])   # (R, L, d)
        masks = [d.mask[rows] for d in directions]                                            # (r, L) each
        new = [self._edit_fn(d, split, rows, maps)(hidden[j * len(rows):(j + 1) * len(rows)][m],
                                                   torch.arange(int(m.sum()), device=m.device))
               for j, (d, m) in enumerate(zip(directions, masks))]                            # (n_j, d) each
        hidden[torch.cat(masks)] = torch.cat(new).to(hidden.dtype)  # row-major: directions' rows in order
        rows_cpu = rows.cpu()
        keep = inputs.shape[1] - min(int(d.index[rows_cpu].min()) for d in directions)  # positions >= min i
        return resume(hidden, inputs, keep_last=keep), labels[:, -keep:]

    # ------------------------------------------------------------------ trainer interface
    def loss(self, maps: Sequence[AlignmentMap], batch_index: torch.Tensor, directions=None
             ) -> tuple[torch.Tensor, dict]:
        """Mean over trained directions (`directions`: only these, a step's sampled budget) of the
        token-averaged CE on positions >= i of the rows `batch_index`.

        Under a shard this process computes its rows only, scaled by world / (tokens of the whole batch),
        so averaging the processes' gradients gives exactly the full batch's gradient.
        """
        trained = [d for d in self._only(self.splits["train"], directions) if d.trained]
        if not trained:
            raise ConfigError("no trained directions: set directions to include at least one [source, target]")
        rows = self.shard.rows(batch_index)
        total = None
        if len(rows):
            for group in self._groups(trained):
                logits, labels = self._run(maps, group, "train", rows)
                ce = _row_cross_entropy(logits, labels)                     # (R,) summed over scored tokens
                for j, d in enumerate(group):
                    # tokens scored in this direction over the WHOLE batch (every process's rows)
                    n_tokens = (d.labels[batch_index.to(d.labels.device)] != IGNORE_INDEX).sum().clamp(min=1)
                    part = ce[j * len(rows):(j + 1) * len(rows)].sum() * (self.shard.world / n_tokens)
                    part = part.to(self._loss_device)
                    total = part if total is None else total + part
        if total is None:  # no rows on this process: no contribution (the gradient sync fills in zeros)
            return torch.zeros((), device=self._loss_device, requires_grad=True), {}
        return total / len(trained), {}

    def direction_losses(self, maps: Sequence[AlignmentMap], batch_index: torch.Tensor
                         ) -> dict[tuple[int, int, str], float]:
        """Each trained direction's own token-averaged loss on this process's rows (asked by the trainer only
        when the total loss is not finite, to name the culprits)."""
        rows = self.shard.rows(batch_index)
        out = {}
        for d in self.splits["train"]:
            if d.trained and len(rows):
                logits, labels = self._run(maps, [d], "train", rows)
                n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
                out[(d.source, d.target, d.variable)] = float(_row_cross_entropy(logits, labels).sum() / n_tokens)
        return out

    @property
    def _loss_device(self) -> torch.device:
        return self.models[0].device

    def _pair_scores(self, maps: Sequence[AlignmentMap], split: str, with_ci: bool) -> dict[int, PairScores]:
        """Per direction: trial / correct / scored tokens per pair and the summed CE, over every process's rows."""
        directions = self.splits[split]
        local: dict[tuple[int, int], dict[str, list]] = {}
        for group in self._groups(directions):
            n = len(group[0])
            step = max(1, self.eval_batch_size // len(group))
            for lo in range(0, n, step):
                rows = self.shard.rows(torch.arange(lo, min(n, lo + step)))
                if not len(rows):
                    continue
                with torch.no_grad():
                    logits, labels = self._run(maps, group, split, rows)
                scored = labels != IGNORE_INDEX
                correct = (logits.argmax(-1) == labels) & scored                          # (R, L)
                ce = _row_cross_entropy(logits, labels)                                   # (R,)
                for j, d in enumerate(group):
                    seg = slice(j * len(rows), (j + 1) * len(rows))
                    acc = local.setdefault((d.source, d.target), {k: [] for k in ("rows", "ok", "n", "ce")})
                    acc["rows"].append(rows.cpu())
                    acc["ok"].append(correct[seg].sum(1).cpu())
                    acc["n"].append(scored[seg].sum(1).cpu())
                    acc["ce"].append(ce[seg].double().cpu())
        local = {key: {k: torch.cat(v) for k, v in acc.items()} for key, acc in local.items()}
        merged = self._merge(self.shard.gather(local), directions)
        out = {}
        for d in directions:
            ok, n_tok, ce = merged[(d.source, d.target)]
            out[id(d)] = PairScores(trial=(ok == n_tok).astype(float), correct=ok, scored=n_tok, loss_sum=ce.sum())
        return out

    def _extra_fields(self, maps, direction: LLMPairs, scores: PairScores, with_ci: bool) -> dict:
        return {"n_tokens": int(scores.scored.sum())}

    @staticmethod
    def _merge(parts: list[dict], directions: Sequence[LLMPairs]) -> dict[tuple[int, int], tuple]:
        """Per direction: (correct tokens, scored tokens, CE sum) per pair in pair order, from every process."""
        out = {}
        for d in directions:
            key = (d.source, d.target)
            n = len(d)
            ok, n_tok, ce = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
            seen = np.zeros(n, bool)
            for part in parts:
                if key in part:
                    r = part[key]["rows"].numpy()
                    ok[r], n_tok[r], ce[r], seen[r] = part[key]["ok"].numpy(), part[key]["n"].numpy(), \
                        part[key]["ce"].numpy(), True
            if not seen.all():
                raise ConfigError(f"evaluation covered {int(seen.sum())} of {n} pairs of direction {key}; "
                                   "every process must evaluate its shard")
            out[key] = (ok, n_tok, ce)
        return out


# ---------------------------------------------------------------------------------------------- building
def _load_entry(m, index: int, device: str, log) -> tuple[Any, Any, Any, Recording]:
    """(backend model, tokenizer, backend, verified recording) of one HF model entry of the config."""
    hf_model, tokenizer = load_causal_lm(m.name, dtype=m.dtype, device=device, adapter=m.adapter)
    for key, tensor in hf_model.state_dict().items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise DataError(f"models.{index} ({m.name}): tensor {key!r} has {bad} non-finite values after "
                                f"loading (dtype {m.dtype}); the checkpoint is corrupted or overflows this dtype: "
                                "restore it, or load it in float32")
    recording = load_recording(m.recording, hf_model, tokenizer)
    backend = get_backend(m.backend)
    model = backend.prepare(hf_model, tokenizer)  # the HF model itself, or a converted copy (tlens)
    del hf_model
    log(f"models.{index}: {m.name} ({m.dtype}, {device}, backend {m.backend}); recording {m.recording} "
        f"({len(recording)} sequences of {recording.total_len} tokens, verified)")
    if recording.meta.get("unknown_tokens"):  # recorded with allow_unknown_tokens: say so on every use
        log(f"models.{index}: recording {m.recording} was recorded with {recording.meta['unknown_tokens']} prompt "
            "tokens its tokenizer reads as the unknown token (allow_unknown_tokens)")
    return model, tokenizer, backend, recording


def collect_latents(backend, model, site: Site, ids: torch.Tensor, device: torch.device,
                    batch_size: int) -> torch.Tensor:
    """(N, L) token ids → (N, L, d) latents at `site`, detached, on `device` (in chunks of `batch_size`)."""
    out = []
    feed_extra = dict(backend.feed_options)
    with torch.no_grad():
        for lo in range(0, len(ids), batch_size):
            x = ids[lo:lo + batch_size].to(device)
            out.append(backend.collect(model, {"input_ids": x, **feed_extra}, [site])[str(site)].detach())
    return torch.cat(out)  # (N, L, d)


def display_names(models) -> list[str]:
    """Short distinct names for results: the shortest trailing part of each model's path (its adapter's when
    it has one) that tells the models apart, e.g. ``toxic-0/merged`` and ``nontoxic-0/merged``; a model
    listed twice gets ``#i`` (``tiny-a#0``, ``tiny-a#1``)."""
    keys = [str(m.adapter or m.name).rstrip("/") for m in models]
    parts = [Path(k).parts or (k,) for k in keys]
    depth = 1
    while depth < max(map(len, parts)) and len({p[-depth:] for p in parts}) < len(set(keys)):
        depth += 1
    names = ["/".join(p[-depth:]) for p in parts]
    if len(set(names)) != len(names):  # the same model twice (a model and its exact copy)
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def build_llm_problem(config, *, shard: Shard | None = None, log: Callable[[str], None] | None = None) -> LLMProblem:
    """Load the configured HF models and recordings and build the stepwise ``LLMProblem`` (module docstring).

    config: a run config (``llm_mas.run_config.MASConfig``) whose models all have ``kind: hf`` (checked when
            it was built: backends, dtypes, recordings, sites).
    shard:  this process's part of a data-parallel run (``llm_mas.distributed``); None = one process.
    Identical model entries (same name, adapter, dtype, device, backend) share one loaded model.
    """
    log = log or (lambda s: None)
    missing = [f"models.{i}.recording: {m.recording!r} holds no recording.safetensors; make it with "
               f"`llm-mas record --model {m.name} --texts TEXTS --out {m.recording}`"
               for i, m in enumerate(config.models) if not (Path(m.recording) / "recording.safetensors").is_file()]
    if missing:  # every missing recording at once, before any weights load
        raise ConfigError(missing)
    loaded: dict[tuple, tuple] = {}
    names = display_names(config.models)
    entries = []
    latents_cache: dict[tuple, dict[str, torch.Tensor]] = {}
    for i, m in enumerate(config.models):
        device = parse_device(m.device or config.device)
        key = (m.name, m.adapter, m.dtype, device, m.backend, m.recording)
        if key not in loaded:
            loaded[key] = _load_entry(m, i, device, log)
        else:
            log(f"models.{i}: the same model and recording as an earlier entry (shared, not loaded again)")
        model, tokenizer, backend, recording = loaded[key]
        site = backend.resolve(model, m.site)
        train, valid = recording.split(VALID_FRACTION, seed=SPLIT_SEED)
        splits = {"train": train, "valid": valid}
        cache_key = (*key, str(site))
        if cache_key not in latents_cache:
            latents_cache[cache_key] = {name: collect_latents(backend, model, site, rec.ids, torch.device(device),
                                                              config.eval.batch_size) for name, rec in splits.items()}
        latents = latents_cache[cache_key]
        for split, cached in latents.items():
            bad = int((~torch.isfinite(cached)).sum())
            if bad:
                raise DataError(f"models.{i} ({m.name}): {bad} non-finite values in its cached {split} latents at "
                                f"site {m.site!r}; the model overflows in dtype {m.dtype}: load it in float32 or "
                                "pick another site")
        width = int(latents["train"].shape[-1])
        entries.append(LLMModelEntry(name=names[i], model=model, site=site, width=width, tokenizer=tokenizer,
                                     backend=backend, device=torch.device(device),
                                dtype=latents["train"].dtype if m.dtype == "auto" else parse_dtype(m.dtype),
                                recording=recording, splits=splits, latents=latents))
    widths = [e.width for e in entries]
    k = config.k if config.k is not None else min(widths) // 2
    if not 1 <= k <= min(widths):
        raise ConfigError(f"k={k} must lie in 1..{min(widths)} (the smallest latent width among the models)")
    return LLMProblem(entries, k, train_directions=config.train_directions(), n_train=config.data.n_train,
                      n_valid=config.data.n_valid, seed=config.seed, intervention=config.intervention,
                      eval_batch_size=config.eval.batch_size, shard=shard,
                      skip_below_site=[m.skip_below_site for m in config.models],
                      site_cache_bytes=int(config.site_cache.memory_mib * 2**20),
                      site_disk_bytes=int(config.site_cache.disk_mib * 2**20), site_cache_dir=config.site_cache.dir,
                      log=log)


def site_cache_dir_problems(path: str | os.PathLike) -> list[str]:
    """What is wrong with `path` as the directory under which spilled site outputs go: it must be a writable
    directory, or not exist yet under a writable one (it is then made)."""
    where = Path(path).expanduser()
    if where.exists():
        if not where.is_dir():
            return [f"{str(path)!r} is not a directory; give a directory (the cache goes in a fresh subdirectory "
                    "of it) or leave it unset for the system's temporary directory"]
        if not os.access(where, os.W_OK | os.X_OK):
            return [f"{str(path)!r} is not writable by this user; give a writable directory or leave it unset for "
                    "the system's temporary directory"]
        return []
    parent = where.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [f"{str(path)!r} does not exist and cannot be made ({str(parent)!r} is not a writable directory); "
                "give a writable directory or leave it unset for the system's temporary directory"]
    return []


def hf_header_problems(config) -> list[str]:
    """Problems of HF model entries found without loading weights: missing recordings, k larger than the
    smallest hidden size (from each local directory's config.json)."""
    import json

    from ..llm.loading import resolve_model_location

    problems, widths = [], []
    for i, m in enumerate(config.models):
        if getattr(m, "kind", None) != "hf":  # a task model next to LMs (counterfactual runs): checked by name
            continue
        if m.recording is not None and not (Path(m.recording) / "recording.safetensors").is_file():
            problems.append(f"models.{i}.recording: {m.recording!r} holds no recording.safetensors; make it with "
                            f"`llm-mas record --model {m.name} --texts TEXTS --out {m.recording}`")
        try:
            location, local = resolve_model_location(m.name)
        except ConfigError as e:
            problems.append(f"models.{i}.name: {e}")
            continue
        if local:
            try:
                hf_config = json.loads((Path(location) / "config.json").read_text())
            except (OSError, ValueError):
                problems.append(f"models.{i}.name: {location!r} has no readable config.json; pass a directory "
                                "written by save_pretrained / `hf download`")
                continue
            width = hf_config.get("hidden_size") or hf_config.get("n_embd") or hf_config.get("d_model")
            if isinstance(width, int):
                widths.append(width)
    if widths and config.k is not None and config.k > min(widths):
        problems.append(f"k={config.k} is larger than the smallest hidden size among the models ({min(widths)}); "
                        f"use k <= {min(widths)}")
    return problems


def check_hf_models(config) -> tuple[list[str], list[str]]:
    """The hf kind's check: `hf_header_problems` (no data problems)."""
    return hf_header_problems(config), []
