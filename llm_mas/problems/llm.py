"""Stepwise MAS between Hugging Face causal LMs (method.md §2-3, §6-7, §10).

    llm-mas mas recipes/configs/llm_tiny.yaml                  # after `python recipes/llm_mas_smoke.py --prepare-only`
    llm-mas mas recipes/configs/llm_deepseek.yaml              # one GPU (see the preset's first line)
    accelerate launch --multi_gpu --num_processes N ... -m llm_mas.llm.distributed CONFIG.yaml   # N GPUs

``build_llm_problem(config)`` (called by ``llm_mas.mas.build_problem`` for ``kind: hf`` models) returns an
``LLMProblem`` that ``MASTrainer`` trains. Data path, per model i:

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
- Data parallelism: pass a ``Shard`` (``llm_mas.llm.distributed``): the loss then covers this process's
  rows of each batch (scaled so the average of the processes' gradients is the full batch's gradient) and
  evaluation gathers every process's pairs, so all processes see identical records.

``site: hidden`` (the task-model default of ``ModelConfig``) means the LLM default, ``embeddings``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..alignments import AlignmentMap
from ..backends.base import Edit
from ..errors import ConfigError
from ..interchange import intervene, stitch, variable_blocks
from ..sites import Site
from .record import IGNORE_INDEX, Recording, StepwisePairs

BACKENDS = ("torch", "nnsight", "tlens")
DEFAULT_SITE = "embeddings"
VALID_FRACTION = 0.2        # recordings are split 80/20 (reference: lang_mas.py)
SPLIT_SEED = 741            # the reference's split seed
MIN_PREFIX = MIN_SUFFIX = 10  # i ~ U[10, L - 10)
SPLIT_IDS = {"train": 0, "valid": 1}


class Shard:
    """This process's part of a data-parallel run: rows ``rank::world`` of every batch.

    ``gather(obj)`` returns the list of every process's ``obj`` (rank order); single process: ``[obj]``.
    """

    def __init__(self, rank: int = 0, world: int = 1, gather: Callable[[Any], list] | None = None):
        if not 0 <= rank < world:
            raise ConfigError(f"shard rank {rank} must lie in 0..{world - 1} (world size {world})")
        if world > 1 and gather is None:
            raise ConfigError("a shard of a multi-process run needs a gather function (see llm_mas.llm.distributed)")
        self.rank, self.world = rank, world
        self._gather = gather

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self.rank::self.world]

    def gather(self, obj: Any) -> list:
        return [obj] if self.world == 1 else self._gather(obj)


@dataclass
class LLMEntry:
    """One resolved model taking part in LLM MAS (``problem.models[i]``)."""

    name: str
    model: Any               # what the backend runs: the HF model, or a HookedTransformer for ``tlens``
    tokenizer: Any
    backend: Any             # llm_mas.backends Backend
    site: Site
    width: int
    device: torch.device
    dtype: torch.dtype
    recording: Recording
    splits: dict[str, Recording]
    latents: dict[str, torch.Tensor]   # split -> (N_split, L, d) on `device`, model dtype


@dataclass
class Direction:
    """The pairs of one (source, target) direction on one split, tensors on the target's device."""

    source: int
    target: int
    trained: bool
    target_ids: torch.Tensor    # (P, L) long
    mask: torch.Tensor          # (P, L) bool, positions 0..i
    labels: torch.Tensor        # (P, L) long, IGNORE_INDEX before i
    source_rows: torch.Tensor   # (P,) rows of the source's cache of this split (on the source's device)
    index: torch.Tensor         # (P,) the step i (CPU)

    def __len__(self) -> int:
        return int(self.target_ids.shape[0])


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


class LLMProblem:
    """Stepwise LLM MAS pairs, cached source latents, loss and IIA for ``MASTrainer`` (module docstring)."""

    stepwise = True

    def __init__(self, models: Sequence[LLMEntry], k: int, *, train_directions: Sequence[tuple[int, int]] | None = None,
                 n_train: int = 10_000, n_valid: int = 1_000, seed: int = 0, intervention: str = "interchange",
                 eval_batch_size: int = 16, shard: Shard | None = None):
        if intervention not in ("interchange", "stitch"):
            raise ConfigError(f"intervention {intervention!r} must be 'interchange' or 'stitch'")
        if eval_batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {eval_batch_size}")
        self.models = list(models)
        n = len(self.models)
        self.k = k
        self.variables = ["full"]
        self.all_variables = ["full"]
        self.blocks = variable_blocks(self.variables, k, min(m.width for m in self.models))
        self.block = self.blocks["full"]
        self.intervention = intervention
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.n_train, self.n_valid = n_train, n_valid
        self.shard = shard or Shard()
        self.directions = [(s, t) for s in range(n) for t in range(n)]
        self.train_directions = set(map(tuple, train_directions)) if train_directions is not None else set(
            self.directions)
        bad = sorted(d for d in self.train_directions if d not in self.directions)
        if bad:
            raise ConfigError(f"train directions {bad} name models outside 0..{n - 1}")
        self.latent_stats = [self._stats(m.latents["train"]) for m in self.models]
        self.splits = {split: [self._direction(s, t, split, size) for s, t in self.directions]
                       for split, size in (("train", n_train), ("valid", n_valid))}

    # ------------------------------------------------------------------ data
    @staticmethod
    def _stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature (mean, std) over every recorded position, float32 on the CPU."""
        x = latents.reshape(-1, latents.shape[-1]).float()  # (N·L, d)
        return x.mean(0).cpu(), x.std(0).clamp(min=1e-6).cpu()

    def _direction(self, s: int, t: int, split: str, n_pairs: int) -> Direction:
        from .record import stepwise_pairs

        seed = int(np.random.SeedSequence([self.seed, SPLIT_IDS[split], s, t]).generate_state(1)[0])
        source, target = self.models[s], self.models[t]
        pairs: StepwisePairs = stepwise_pairs(source.splits[split], target.splits[split], n_pairs, seed=seed,
                                              min_prefix=MIN_PREFIX, min_suffix=MIN_SUFFIX)
        dev = target.device
        return Direction(s, t, (s, t) in self.train_directions, pairs.target_ids.to(dev), pairs.mask.to(dev),
                         pairs.labels.to(dev), pairs.source_rows.to(source.device), pairs.index)

    # ------------------------------------------------------------------ one patched run per target
    def _edit(self, direction: Direction, split: str, rows: torch.Tensor, full_mask: torch.Tensor,
              target_map: AlignmentMap, source_map: AlignmentMap) -> Edit:
        """The Edit replacing the target's latents at this direction's rows (placed inside `full_mask`)."""
        source, target = self.models[direction.source], self.models[direction.target]
        r, c = direction.mask[rows].nonzero(as_tuple=True)            # entries in row-major order
        source_rows = direction.source_rows[rows.to(source.device)]
        h_source = source.latents[split][source_rows[r.to(source.device)], c.to(source.device)]  # (entries, d_s)
        h_source = h_source.to(target.device, torch.float32)
        block = self.block
        if self.intervention == "stitch":
            def fn(h, which):
                return stitch(target_map, source_map, h_source[which], block)
        else:
            def fn(h, which):
                return intervene(target_map, source_map, h.float(), h_source[which], block)  # (n, d_t)
        return Edit(site=target.site, mask=full_mask, fn=fn)

    def _run(self, maps: Sequence[AlignmentMap], directions: Sequence[Direction], split: str,
             rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the (shared) target of `directions` once on their concatenated rows → logits (R, L, V), labels."""
        target = self.models[directions[0].target]
        dev = target.device
        rows = rows.to(dev)
        moved = {i: _map_to(maps[i], dev) for i in {d.source for d in directions} | {directions[0].target}}
        inputs = torch.cat([d.target_ids[rows] for d in directions])   # (R, L)
        labels = torch.cat([d.labels[rows] for d in directions])       # (R, L)
        R, L = inputs.shape
        edits = []
        for j, d in enumerate(directions):
            full = torch.zeros(R, L, dtype=torch.bool, device=dev)
            full[j * len(rows):(j + 1) * len(rows)] = d.mask[rows]
            edits.append(self._edit(d, split, rows, full, moved[d.target], moved[d.source]))
        feed = {"input_ids": inputs} if target.backend.name == "tlens" else {"input_ids": inputs, "use_cache": False}
        logits = target.backend.patch(target.model, feed, edits)      # (R, L, V)
        return logits, labels

    def _groups(self, directions: Sequence[Direction]) -> list[list[Direction]]:
        groups: dict[int, list[Direction]] = {}
        for d in directions:
            groups.setdefault(d.target, []).append(d)
        return list(groups.values())

    # ------------------------------------------------------------------ trainer interface
    def loss(self, maps: Sequence[AlignmentMap], batch_index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean over trained directions of the token-averaged CE on positions >= i of the rows `batch_index`.

        Under a shard this process computes its rows only, scaled by world / (tokens of the whole batch),
        so averaging the processes' gradients gives exactly the full batch's gradient.
        """
        trained = [d for d in self.splits["train"] if d.trained]
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

    @property
    def _loss_device(self) -> torch.device:
        return self.models[0].device

    def evaluate(self, maps: Sequence[AlignmentMap], split: str = "valid", with_ci: bool = False) -> list[dict]:
        """One record per direction (s, t): trial_iia, token_iia, loss (per token), n_pairs, trained, (+ CIs)."""
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
        records = []
        for d in directions:
            ok, n_tok, ce = merged[(d.source, d.target)]
            trial = (ok == n_tok).astype(float)                 # every scored token right
            rec = {"source": self.models[d.source].name, "target": self.models[d.target].name,
                   "source_index": d.source, "target_index": d.target, "variable": "full",
                   "trained": d.trained, "trial_iia": float(trial.mean()),
                   "token_iia": float(ok.sum() / max(n_tok.sum(), 1)), "loss": float(ce.sum() / max(n_tok.sum(), 1)),
                   "n_pairs": int(len(trial)), "n_tokens": int(n_tok.sum())}
            if with_ci:
                from ..numeric import _ratio_ci
                from ..stats import bootstrap_ci

                rec["trial_iia_ci"] = list(bootstrap_ci(trial, seed=self.seed))
                rec["token_iia_ci"] = list(_ratio_ci(ok, n_tok, self.seed))
            records.append(rec)
        return records

    @staticmethod
    def _merge(parts: list[dict], directions: Sequence[Direction]) -> dict[tuple[int, int], tuple]:
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
def check_llm_config(config) -> None:
    """Every problem of an LLM MAS config at once (ConfigError), before any weights load."""
    from ..sites import Site as _Site
    from .loading import DTYPES

    p = []
    if list(config.variables) != ["full"]:
        p.append(f"variables: LLM MAS has one variable, 'full' (the model's behaviour); got {config.variables}")
    if config.null_subspace:
        p.append("null_subspace: not implemented for LLM MAS; set null_subspace: false")
    if not config.data.stepwise:
        p.append("data.stepwise: LLM MAS is stepwise (positions 0..i receive the source's subspace); "
                 "set data.stepwise: true")
    for i, m in enumerate(config.models):
        if m.backend not in BACKENDS:
            p.append(f"models.{i}.backend: unknown backend {m.backend!r}; valid choices: {', '.join(BACKENDS)}")
        if m.dtype not in DTYPES:
            p.append(f"models.{i}.dtype: unknown dtype {m.dtype!r}; valid choices: {', '.join(DTYPES)}")
        if m.recording is None:
            p.append(f"models.{i}.recording: an HF model needs a recording directory; make one with "
                     f"`llm-mas record --model {m.name} --texts TEXTS --out DIR`")
        elif not (Path(m.recording) / "recording.safetensors").is_file():
            p.append(f"models.{i}.recording: {m.recording!r} holds no recording.safetensors; make it with "
                     f"`llm-mas record --model {m.name} --texts TEXTS --out {m.recording}`")
        if m.variable_map:
            p.append(f"models.{i}.variable_map: LLM MAS has no task variables to map; remove it")
        if m.adapter is not None and m.backend == "tlens":
            p.append(f"models.{i}.adapter: the tlens backend needs merged weights; point name at the merged model "
                     "(`llm-mas finetune ... --merge` writes OUT/merged) and record that model")
        try:
            _Site.parse(m.site)
        except ConfigError as e:
            p.append(f"models.{i}.site: {e}")
    if p:
        raise ConfigError(p)


def _load_entry(m, index: int, device: str, log) -> tuple[Any, Any, Any, Recording]:
    """(backend model, tokenizer, backend, verified recording) of one ModelConfig."""
    from ..backends import get_backend
    from .loading import load_causal_lm
    from .record import load_recording

    hf_model, tokenizer = load_causal_lm(m.name, dtype=m.dtype, device=device, adapter=m.adapter)
    recording = load_recording(m.recording, hf_model, tokenizer)
    backend = get_backend(m.backend)
    model = hf_model
    if m.backend == "tlens":
        from ..backends.tlens_backend import to_hooked_transformer

        model = to_hooked_transformer(hf_model, tokenizer)
        del hf_model
    log(f"models.{index}: {m.name} ({m.dtype}, {device}, backend {m.backend}); recording {m.recording} "
        f"({len(recording)} sequences of {recording.total_len} tokens, verified)")
    return model, tokenizer, backend, recording


def collect_latents(backend, model, site: Site, ids: torch.Tensor, device: torch.device,
                    batch_size: int) -> torch.Tensor:
    """(N, L) token ids → (N, L, d) latents at `site`, detached, on `device` (in chunks of `batch_size`)."""
    out = []
    feed_extra = {} if backend.name == "tlens" else {"use_cache": False}
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

    config: ``llm_mas.mas.MASConfig`` whose models all have ``kind: hf``.
    shard:  this process's part of a data-parallel run (``llm_mas.llm.distributed``); None = one process.
    Identical model entries (same name, adapter, dtype, device, backend) share one loaded model.
    """
    from .loading import parse_device, parse_dtype

    log = log or (lambda s: None)
    check_llm_config(config)
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
        site_text = m.site
        if m.site == "hidden":
            site_text = DEFAULT_SITE
            log(f"models.{i}.site: 'hidden' (the task-model default) means {DEFAULT_SITE!r} for an HF model")
        site = backend.resolve(model, site_text)
        train, valid = recording.split(VALID_FRACTION, seed=SPLIT_SEED)
        splits = {"train": train, "valid": valid}
        cache_key = (*key, str(site))
        if cache_key not in latents_cache:
            latents_cache[cache_key] = {name: collect_latents(backend, model, site, rec.ids, torch.device(device),
                                                              config.eval.batch_size) for name, rec in splits.items()}
        latents = latents_cache[cache_key]
        width = int(latents["train"].shape[-1])
        entries.append(LLMEntry(name=names[i], model=model, tokenizer=tokenizer, backend=backend,
                                site=site, width=width, device=torch.device(device),
                                dtype=latents["train"].dtype if m.dtype == "auto" else parse_dtype(m.dtype),
                                recording=recording, splits=splits, latents=latents))
    widths = [e.width for e in entries]
    k = config.k if config.k is not None else min(widths) // 2
    if not 1 <= k <= min(widths):
        raise ConfigError(f"k={k} must lie in 1..{min(widths)} (the smallest latent width among the models)")
    return LLMProblem(entries, k, train_directions=config.train_directions(), n_train=config.data.n_train,
                      n_valid=config.data.n_valid, seed=config.seed, intervention=config.intervention,
                      eval_batch_size=config.eval.batch_size, shard=shard)
