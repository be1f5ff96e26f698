"""MAS on counterfactual tensors (`llm_mas.tasks.tensor_data.CounterfactualTensors`) for any torch modules.

    llm_mas.compare(models=[gru_a, gru_b], data=cf_tensors, site="rnn", k=8)

Each model is anything a model kind can load (``kind: module``: a user's ``nn.Module``; ``task``: a
shipped task model; ``hf``: a causal LM) with a `Backend` that collects and patches latents at its site.
For a direction (s, t), row r runs t on its base input; at its base positions the latent becomes

    h_t' = A_t⁻¹((1 − m) ⊙ A_t(h_t) + m ⊙ A_s(h_s))

with h_s model s's latent on its source input at the matching source position (collected once per split).
The output is scored by the dataset's scorer (cross-entropy and accuracy by default); loss: the scorer's
loss per scored label, averaged per direction, then over the trained directions. Token IIA: scored labels
right; trial IIA: every scored label of a row right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backends.base import Backend, Edit, model_output_logits
from ..errors import ConfigError, DataError
from ..recordings import RecordedSystem, cl_loss, cl_loss_per_row, match_states
from ..tasks.tensor_data import CounterfactualTensors, Scorer, inputs_to, take_rows
from .base import DirectionPairs, ModelEntry, PairScores, ProblemBase, Shard


@dataclass
class TensorModelEntry(ModelEntry):
    """A model of a tensor run: what runs, how latents are read and written, on which device."""

    backend: Backend
    device: torch.device


@dataclass
class TensorSplit:
    """One split of one model: its base inputs, labels, where it is intervened, its source latents."""

    base: Any                         # (n, ...) tensor or dict of tensors (CPU)
    labels: torch.Tensor              # (n, ...) on the model's device
    mask: torch.Tensor                # (n, T_latent) bool: intervened base positions
    slot: torch.Tensor                # (n, T_latent) long: the slot of each intervened position
    source_latents: torch.Tensor      # (n, P, d) float32: the model's latents on its source inputs at its slots
    source_used: torch.Tensor         # (n, P) bool: the slots a source position fills
    base_latents: torch.Tensor | None = None   # (n, d): a CL target's latent at its base position


@dataclass
class TensorPairs(DirectionPairs):
    """One (source, target, variable) on one split: every row of the split (the rows are shared by every
    direction: row r of model s's sources goes with row r of model t's bases)."""

    rows: torch.Tensor                # (n,) long: the split's rows in the dataset (what the data digest reads)
    split: str = "train"
    cl_latents: torch.Tensor | None = None    # CL: (n, d_t) recorded latents in the intended states
    cl_matched: torch.Tensor | None = None    # CL: (n,) bool, False where no recorded row has the intended state
    cl_wanted: np.ndarray | None = None       # CL: (n, n_keys) the intended states

    def __len__(self) -> int:
        return int(self.rows.numel())


@dataclass
class CLTarget:
    """A recorded (causally inaccessible) target: the states matched on, the pool of recorded latents in
    them (M, d) with their states (M, n_keys), and the mean latent of each recorded state (its decoder)."""

    keys: list[str]
    latents: torch.Tensor
    states: np.ndarray
    classes: list[tuple[int, ...]]
    centroids: torch.Tensor


def _batches(n: int, size: int) -> list[slice]:
    return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]


def split_rows(n: int, n_train: int, n_valid: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded shuffle; valid = the first min(n_valid, n // 5, >= 1) rows, train = up to n_train of the rest
    (the rule of the text datasets)."""
    if n < 2:
        raise DataError(f"a dataset needs at least 2 rows (train and valid), got {n}")
    order = torch.as_tensor(np.random.default_rng([seed, 741]).permutation(n))
    n_val = max(1, min(n_valid, n // 5))
    return {"train": order[n_val:n_val + n_train], "valid": order[:n_val]}


class TensorProblem(ProblemBase):
    """Pairs from counterfactual tensors, cached source latents, loss and IIA (module docstring)."""

    supported_interventions = ("interchange", "stitch")

    def __init__(self, models: Sequence[TensorModelEntry], data: CounterfactualTensors, k: int | None, *,
                 n_train: int = 10_000, n_valid: int = 1_000, train_directions=None, seed: int = 0,
                 intervention: str = "interchange", eval_batch_size: int = 256, variables: Sequence[str] = (),
                 cl_directions: Sequence[tuple[int, int]] = (), cl_epsilon: float = 0.0,
                 cl_match_on: Sequence[str] | None = None):
        data.validate(len(models))
        self.data = data
        self.data_digest = data.digest()
        self.scorer: Scorer = data.make_scorer()
        rows = split_rows(len(data), n_train, n_valid, seed)
        self.eval_batch_size = eval_batch_size
        variable = data.variable
        if variables and list(variables) != [variable]:
            raise ConfigError(f"variables: a tensor dataset has one variable, {variable!r} (its `variable`); got "
                              f"{list(variables)}")
        models = list(models)
        per_split = {split: [self._model_split(i, m, r) for i, m in enumerate(models)] for split, r in rows.items()}
        for i, m in enumerate(models):
            if m.width is None or m.width < 1:
                m.width = int(per_split["train"][i].source_latents.shape[-1])
        widths = [m.width for m in models]
        k = k if k is not None else min(widths) // 2
        if not 1 <= k <= min(widths):
            raise ConfigError(f"k={k} must lie in 1..{min(widths)} (the smallest latent width among the models)")
        super().__init__(models, [variable], k, train_directions=train_directions, intervention=intervention,
                         n_train=len(rows["train"]), n_valid=len(rows["valid"]), seed=seed,
                         eval_batch_size=eval_batch_size, cl_directions=cl_directions)
        self.per_split = per_split
        self.cl_epsilon = cl_epsilon
        self.cl_targets = self._cl_targets(cl_match_on)
        self.latent_stats = []
        for i in range(len(models)):
            split = per_split["train"][i]
            x = split.source_latents[split.source_used]                                   # (slots, d)
            self.latent_stats.append((x.mean(0).cpu(), x.std(0).clamp(min=1e-6).cpu()))
        self.splits = {split: [self._pairs(s, t, rows[split], split) for s, t in self.directions] for split in rows}
        for split in rows:
            self._attach_cl(split)

    def _pairs(self, s: int, t: int, rows: torch.Tensor, split: str) -> TensorPairs:
        trained = (s, t) in self.train_directions or (s, t) in self.cl_directions
        return TensorPairs(s, t, self.data.variable, self.blocks[self.data.variable], trained, rows, split)

    # ------------------------------------------------------------------ CL: recorded (inaccessible) targets
    def _cl_targets(self, match_on: Sequence[str] | None) -> dict[int, CLTarget]:
        """Per inaccessible target: its recording, the states matched on and the pool of natural latents."""
        out = {}
        for t in sorted({t for _, t in self.cl_directions}):
            recording = getattr(self.models[t].model, "recording", None)
            if not isinstance(recording, RecordedSystem):
                raise ConfigError(f"cl.inaccessible: model {t} ({self.models[t].name}) is not a recorded system; on "
                                  "counterfactual tensors a causally inaccessible model is a recording (kind "
                                  "'recorded': llm_mas.RecordedSystem), whose recorded states CL matches")
            keys = list(match_on) if match_on is not None else list(recording.states)
            missing = [k for k in keys if k not in recording.states]
            if missing or not keys:
                raise ConfigError(f"cl.match_on: recording {recording.name!r} (model {t}) has no state(s) "
                                  f"{missing or keys}; it records {sorted(recording.states) or 'no states'}")
            latents, states = recording.natural(keys)
            if not len(states):
                raise DataError(f"recording {recording.name!r}: no recorded row has every state {keys} (>= 0)")
            if self.data.positions("base_positions", self._model_index(t)).shape[1] != 1:
                raise DataError(f"cl: model {t} ({self.models[t].name}) is CL-trained: its base_positions must name "
                                "one position per row (N,)")
            labels = self.data.field_for("labels", self._model_index(t))
            labels = labels[:, None] if labels.dim() == 1 else labels
            if labels.shape[1] != len(keys) or labels.is_floating_point():
                raise DataError(f"labels (model {t}, {self.models[t].name}): a recorded target's labels are the "
                                f"intended states, integers (N, {len(keys)}) in the order {keys} (cl.match_on); got "
                                f"shape {tuple(labels.shape)} and dtype {labels.dtype}")
            dev = self.models[t].device
            codes = {tuple(x) for x in states.tolist()}
            classes = sorted(codes)
            index = {c: i for i, c in enumerate(classes)}
            which = torch.as_tensor([index[tuple(x)] for x in states.tolist()])
            centroids = torch.zeros(len(classes), latents.shape[1]).index_add_(0, which, latents)
            centroids /= torch.bincount(which, minlength=len(classes))[:, None].clamp(min=1)
            out[t] = CLTarget(keys=keys, latents=latents.to(dev), states=states, classes=classes,
                              centroids=centroids.to(dev))
        return out

    def _attach_cl(self, split: str) -> None:
        """For each CL item: the target's natural latent at the base position (h_t), and a recorded latent
        whose states equal the intended ones (the target's labels) — drawn once per split (seeded)."""
        rng = np.random.default_rng([self.seed, 742, list(self.per_split).index(split)])
        for item in self.splits[split]:
            if (item.source, item.target) not in self.cl_directions:
                continue
            t = item.target
            target = self.cl_targets[t]
            mine = self.per_split[split][t]
            labels = take_rows(self.data.field_for("labels", self._model_index(t)), item.rows)
            wanted = (labels[:, None] if labels.dim() == 1 else labels).numpy()
            pick, matched = match_states(target.states, wanted, rng)
            matched &= (wanted >= 0).all(1)
            dev = self.models[t].device
            pick_t = torch.as_tensor(pick, device=dev)
            item.cl_latents = target.latents[pick_t]
            item.cl_matched = torch.as_tensor(matched, device=dev)
            item.cl_wanted = wanted
            if mine.base_latents is None:
                pos = self.data.positions("base_positions", self._model_index(t))[item.rows][:, 0]
                with torch.no_grad():
                    h = torch.cat([self._collect(self.models[t], take_rows(mine.base, torch.arange(len(pos))[part]))
                                   for part in _batches(len(pos), self.eval_batch_size)])
                mine.base_latents = h[torch.arange(len(pos)), pos.to(h.device)].to(dev)      # (n, d)

    def _cl_hat(self, maps, item: TensorPairs, local: torch.Tensor) -> torch.Tensor:
        """ĥ (rows, d_t): the intervened latent of the recorded target at its base position, own space."""
        split_t = self.per_split[item.split][item.target]
        source = self.per_split[item.split][item.source]
        h_t = split_t.base_latents[local.to(split_t.base_latents.device)]
        h_s = source.source_latents[local.to(source.source_latents.device), 0].to(h_t.device)
        return self.intervention(maps, h_t, h_s, item.source, item.target, item.block)

    def _cl_loss(self, maps, item: TensorPairs, local: torch.Tensor) -> torch.Tensor:
        dev = item.cl_latents.device
        return cl_loss(self._cl_hat(maps, item, local), item.cl_latents[local.to(dev)], item.cl_matched[local.to(dev)])

    def add_split(self, name: str, rows: torch.Tensor) -> str:
        """Another evaluated split of these dataset rows (e.g. every row, to score trained alignments on new
        data: `llm_mas.evaluate`); returns its name."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        self.per_split[name] = [self._model_split(i, m, rows) for i, m in enumerate(self.models)]
        self.splits[name] = [self._pairs(s, t, rows, name) for s, t in self.directions]
        self._attach_cl(name)
        return name

    # ------------------------------------------------------------------ data
    def _model_index(self, i: int) -> int:
        """Which item of the per-model fields model i reads (0 when every field is shared)."""
        return i if self.data.n_models else 0

    def _model_split(self, i: int, entry: TensorModelEntry, rows: torch.Tensor) -> TensorSplit:
        j = self._model_index(i)
        data = self.data
        base = take_rows(data.field_for("base", j), rows)
        source = take_rows(data.field_for("source", j), rows)
        source_pos = data.positions("source_positions", j)[rows]
        base_pos = data.positions("base_positions", j)[rows]
        latents, length = [], None
        with torch.no_grad():
            for lo in range(0, len(rows), self.eval_batch_size):
                part = slice(lo, lo + self.eval_batch_size)
                h = self._collect(entry, take_rows(source, torch.arange(len(rows))[part]))     # (b, S, d)
                length = int(h.shape[1])
                p = source_pos[part].to(h.device)
                self._check_positions(p, length, rows[part], f"source_positions (model {i}, {entry.name})")
                picked = h.gather(1, p.clamp(min=0)[..., None].expand(-1, -1, h.shape[-1]))      # (b, P, d)
                latents.append(torch.where((p >= 0)[..., None], picked, torch.zeros_like(picked)).float())
            # the latent length of the base inputs (the edit mask's width): one small batch
            t_latent = int(self._collect(entry, take_rows(base, torch.arange(min(len(rows), 2)))).shape[1])
        self._check_positions(base_pos, t_latent, rows, f"base_positions (model {i}, {entry.name})")
        n = len(rows)
        mask = torch.zeros(n, t_latent, dtype=torch.bool)
        slot = torch.zeros(n, t_latent, dtype=torch.long)
        r, s = torch.nonzero(base_pos >= 0, as_tuple=True)
        mask[r, base_pos[r, s]] = True
        slot[r, base_pos[r, s]] = s
        dev = entry.device
        return TensorSplit(base=base, labels=take_rows(data.field_for("labels", j), rows).to(dev),
                           mask=mask.to(dev), slot=slot.to(dev), source_latents=torch.cat(latents).to(dev),
                           source_used=(source_pos >= 0).to(dev))

    @staticmethod
    def _check_positions(pos: torch.Tensor, length: int, rows: torch.Tensor, what: str) -> None:
        bad = torch.nonzero((pos >= length).any(1)).flatten()
        if len(bad):
            named = ", ".join(str(int(rows[b])) for b in bad[:6])
            raise DataError(f"{what}: rows {named} hold positions beyond the latent at the site, which has {length} "
                            "step(s); positions index the site's time axis (check the site, or the positions)")

    def _collect(self, entry: TensorModelEntry, inputs) -> torch.Tensor:
        inputs = inputs_to(inputs, entry.device)
        return entry.backend.collect(entry.model, inputs, [entry.site])[str(entry.site)].float()

    # ------------------------------------------------------------------ one patched run per target
    def _run(self, maps, items: Sequence[TensorPairs], local: torch.Tensor, split: str):
        """Run the shared target of `items` once on `local` rows of the split (repeated per item)
        → (loss (R,), correct (R,), scored (R,))."""
        t = items[0].target
        target = self.models[t]
        mine = self.per_split[split][t]
        dev = target.device
        local = local.to(dev)
        reps = len(items)
        rows_cpu = local.cpu().repeat(reps)
        inputs = inputs_to(take_rows(mine.base, rows_cpu), dev)
        labels = mine.labels[local].repeat(reps, *[1] * (mine.labels.dim() - 1))
        R = len(rows_cpu)
        edits = []
        for j, item in enumerate(items):
            source = self.per_split[split][item.source]
            full = torch.zeros(R, mine.mask.shape[1], dtype=torch.bool, device=dev)
            mask = mine.mask[local]
            full[j * len(local):(j + 1) * len(local)] = mask
            r, c = mask.nonzero(as_tuple=True)
            h_source = source.source_latents[local[r].to(source.source_latents.device),
                                             mine.slot[local][r, c].to(source.source_latents.device)].to(dev)
            edits.append(Edit(site=target.site, mask=full, fn=self._edit_fn(maps, item, h_source)))
        output = model_output_logits(target.backend.patch(target.model, inputs, edits))
        return self.scorer(output, labels)

    def _edit_fn(self, maps, item: TensorPairs, h_source: torch.Tensor):
        intervention, s, t, block = self.intervention, item.source, item.target, item.block
        return lambda h, which: intervention(maps, h.float(), h_source[which], s, t, block).to(h.dtype)

    # ------------------------------------------------------------------ trainer interface
    def loss(self, maps, batch_index: torch.Tensor, directions=None):
        """Mean over the behaviour-trained items of the scorer's loss per scored label on these training rows;
        with CL items (directions into a recording): (1 − ε)·that + ε·the mean CL loss (only the CL loss when
        no direction is behaviour-trained)."""
        items = self._only(self.splits["train"], directions)
        trained = [d for d in items if d.trained and d.cl_latents is None]
        cl_items = [d for d in items if d.cl_latents is not None]
        if not trained and not cl_items:
            raise ConfigError("no trained directions: set directions to include at least one [source, target]")
        info = {}
        l_cl = None
        if cl_items:
            l_cl = sum(self._cl_loss(maps, d, batch_index) for d in cl_items) / len(cl_items)
            info["loss_cl"] = float(l_cl.detach())
            if not trained:
                return l_cl, info
        total = 0.0
        b = len(batch_index)
        for group in self._groups(trained):
            loss, _, scored = self._run(maps, group, batch_index, "train")
            for j in range(len(group)):
                seg = slice(j * b, (j + 1) * b)
                total = total + (loss[seg].sum() / scored[seg].sum().clamp(min=1)).to(self.models[0].device)
        l_behaviour = total / len(trained)
        if l_cl is None:
            return l_behaviour, info
        return (1 - self.cl_epsilon) * l_behaviour + self.cl_epsilon * l_cl.to(l_behaviour.device), info

    def _pair_scores(self, maps, split: str, with_ci: bool) -> dict[int, PairScores]:
        out = {id(d): self._cl_scores(maps, d) for d in self.splits[split] if d.cl_latents is not None}
        for group in self._groups([d for d in self.splits[split] if d.cl_latents is None]):
            n = len(group[0])
            acc = {id(d): {"ok": [], "n": [], "loss": 0.0} for d in group}
            step = max(1, self.eval_batch_size // len(group))
            for lo in range(0, n, step):
                local = torch.arange(lo, min(n, lo + step))
                with torch.no_grad():
                    loss, correct, scored = self._run(maps, group, local, split)
                for j, d in enumerate(group):
                    seg = slice(j * len(local), (j + 1) * len(local))
                    acc[id(d)]["ok"].append(correct[seg].cpu())
                    acc[id(d)]["n"].append(scored[seg].cpu())
                    acc[id(d)]["loss"] += float(loss[seg].double().sum())
            for d in group:
                ok = torch.cat(acc[id(d)]["ok"]).double().numpy()
                n_tok = torch.cat(acc[id(d)]["n"]).double().numpy()
                out[id(d)] = PairScores(trial=(ok == n_tok).astype(float), correct=ok, scored=n_tok,
                                        loss_sum=acc[id(d)]["loss"])
        return out

    def _cl_scores(self, maps, item: TensorPairs) -> PairScores:
        """A CL item scored on its matched rows: right when the intervened latent's nearest recorded-state mean
        is the intended state (trial and token IIA alike); loss: the CL loss."""
        target = self.cl_targets[item.target]
        n = len(item)
        per, decoded = [], []
        with torch.no_grad():
            for part in _batches(n, self.eval_batch_size):
                local = torch.arange(part.start, part.stop)
                hat = self._cl_hat(maps, item, local)
                per.append(cl_loss_per_row(hat, item.cl_latents[local.to(hat.device)]).double().cpu())
                decoded.append(torch.cdist(hat.float(), target.centroids.to(hat.device)).argmin(1).cpu())
        classes = np.asarray(target.classes, dtype=np.int64)
        right = (classes[torch.cat(decoded).numpy()] == item.cl_wanted).all(1)
        matched = item.cl_matched.cpu().numpy()
        ok = right[matched].astype(float)
        return PairScores(trial=ok, correct=ok, scored=np.ones_like(ok),
                          loss_sum=float(torch.cat(per).numpy()[matched].sum()))

    def _extra_fields(self, maps, item, scores: PairScores, with_ci: bool) -> dict:
        if item.cl_latents is not None:
            return {"trained_by": "cl", "cl_unmatched": int((~item.cl_matched).sum()),
                    "cl_loss": float(scores.loss_sum / max(len(scores.trial), 1))}
        fields = {"n_tokens": int(scores.scored.sum())}
        if self.cl_directions:
            fields["trained_by"] = "behaviour" if item.trained else "none"
        return fields


# ---------------------------------------------------------------------------------------------- building
def build_tensor_problem(config, *, shard: Shard | None = None,
                         log: Callable[[str], None] | None = None) -> TensorProblem:
    """Load every model through its kind's loader (`llm_mas.problems.kinds`), read the tensors (a run's
    ``data.tensors`` object, or the directory ``data.dataset``), cache the source latents."""
    from ..llm.loading import parse_device
    from .kinds import entry_device, load_model, tensor_dataset

    log = log or (lambda s: None)
    if shard is not None and shard.world > 1:
        raise ConfigError("tensor-dataset runs are single-process; run them with `llm-mas mas` or compare()")
    data = tensor_dataset(config)
    data.validate(len(config.models))
    entries = []
    names = model_names(config)
    for i, m in enumerate(config.models):
        device = parse_device(entry_device(m, config.device))
        loaded = load_model(m, i, device, log)
        entries.append(TensorModelEntry(name=names[i], model=loaded.model, site=loaded.site, width=loaded.width or 0,
                                        backend=loaded.backend, device=torch.device(device)))
    log(f"tensor data: {len(data)} rows ({data.digest()}), scorer {data.make_scorer().name}")
    return TensorProblem(entries, data, config.k, n_train=config.data.n_train, n_valid=config.data.n_valid,
                         train_directions=config.train_directions(), seed=config.seed,
                         intervention=config.intervention, eval_batch_size=config.eval.batch_size,
                         variables=config.variables, cl_directions=config.cl_directions(),
                         cl_epsilon=config.cl.epsilon, cl_match_on=config.cl.match_on)


def model_names(config) -> list[str]:
    """Display names of a config's models, distinct (``#i`` appended to repeats)."""
    from pathlib import Path

    names = [Path(str(getattr(m, "adapter", None) or m.name).rstrip("/")).name
             + ("-untrained" if getattr(m, "untrained", False) else "") for m in config.models]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names
