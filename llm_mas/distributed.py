"""Data-parallel LLM MAS: ``accelerate launch`` (or ``torchrun``) runs one process per GPU.

Every process loads every model and recording, builds the same pairs (seeded) and holds a replica of the
alignments (initialised identically, then broadcast from rank 0 to be sure). Each training step, process r
computes the loss on rows ``r::N`` of the step's batch (of every micro-batch under ``train.grad_accum``),
scaled so that the *average* of the processes' gradients is exactly the full batch's gradient; gradients
are averaged with one all-reduce before the optimiser step, so the replicas stay identical. Evaluation
splits the validation pairs the same way and gathers every process's per-pair results, so all processes
compute identical records (and take identical early-stopping decisions). Only rank 0 writes the run
directory (``config.yaml``, ``results.json``, ``alignments.safetensors``, ``history.csv``, ``summary.json``,
``iia_matrix.png``, ``checkpoint.pt``) — the same files as ``llm-mas mas``.

Commands (a GPU per process; ``models.i.device`` must be unset: each process puts every model on its own
GPU). N GPUs on one machine::

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m llm_mas.llm.distributed recipes/configs/llm_deepseek.yaml

    torchrun --standalone --nproc_per_node N -m llm_mas.llm.distributed recipes/configs/llm_deepseek.yaml

``train.batch_size`` stays the global batch (rows per optimiser step over all processes), so results do not
depend on N. One process (``python -m llm_mas.llm.distributed CONFIG``) gives the same run as
``llm-mas mas CONFIG``. Two CPU processes (gloo; what the tests run; note that ``accelerate launch --cpu
--num_processes 2`` silently starts ONE process)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        --main_process_port 29511 -m llm_mas.llm.distributed CONFIG.yaml device=cpu

Precision comes from ``models.i.dtype`` (e.g. bfloat16); accelerate's ``--mixed_precision`` must be ``no``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def average_gradients(module) -> None:
    """All-reduce the gradients of ``module``'s trainable parameters and divide by the world size.

    A parameter without a gradient on some process (no rows there) counts as a zero gradient; one without a
    gradient on every process keeps ``grad = None`` (as in a single process, so Adam skips it).
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    active = [p for p, flag in zip(params, has_grad.tolist()) if flag > 0]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not active:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in active])  # one all-reduce for every parameter
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in active:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_module(module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from process ``src`` to every process (in place)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in module.state_dict().values():  # state_dict tensors share storage with the module
        dist.broadcast(tensor.data, src)


def _gather_objects(obj: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _accelerator(config):
    """An ``Accelerator`` for this process; checks that the launcher really started WORLD_SIZE processes."""
    import torch
    from accelerate import Accelerator

    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed != "no":
        raise ConfigError(f"accelerate mixed precision {mixed!r} is not used by MAS; launch with "
                          "--mixed_precision no and set models.i.dtype (e.g. bfloat16) instead")
    acc = Accelerator(cpu=config.device == "cpu" or not torch.cuda.is_available(), mixed_precision="no")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:  # every process would think it is alone and write the same files
        raise ConfigError(f"launched as {launched} processes (WORLD_SIZE) but accelerate set up "
                          f"{acc.num_processes} ({acc.distributed_type}); on CPU launch with `accelerate launch "
                          "--multi_gpu --num_processes N` (not --cpu) or torchrun")
    return acc


def run_mas_distributed(config, log: Callable[[str], None] = print):
    """``llm_mas.mas.run_mas`` for LLM configs, data-parallel over the launched processes.

    Returns the ``MASResult`` on rank 0 and None on the other ranks. Every process must call it.
    """
    import torch
    from safetensors.torch import save_file

    from ..config import save_config, to_dict
    from ..mas import _write_history, build_alignments
    from ..results import MASResult
    from ..trainer import MASTrainer, TrainerConfig
    from .mas import Shard, build_llm_problem

    problems = config.validate() + config.data.validate() + config.train.validate()
    if any(m.kind != "hf" for m in config.models):
        problems.append("models: data-parallel MAS runs HF models only (kind: hf); run task models with "
                        "`llm-mas mas`")
    if problems:
        raise ConfigError(problems)
    acc = _accelerator(config)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if world > 1:
        pinned = [f"models.{i}.device={m.device!r}" for i, m in enumerate(config.models) if m.device is not None]
        if pinned:
            raise ConfigError(f"{', '.join(pinned)}: a data-parallel run puts every model on its process's device "
                              f"({acc.device} on rank {rank}); remove models.i.device")
    # cpu (accelerate says cpu:0 under MULTI_CPU), or this process's cuda:<local rank>
    device = "cpu" if acc.device.type == "cpu" else f"{acc.device.type}:{acc.device.index or 0}"
    config = dataclasses.replace(config, device=device)
    say = log if main else (lambda s: None)
    torch.manual_seed(config.seed)
    run_dir = Path(config.out_dir) / config.name
    checkpoint = run_dir / "checkpoint.pt"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml", header=_command(world, run_dir / "config.yaml"))
    t0 = time.perf_counter()
    shard = Shard(rank, world, _gather_objects if world > 1 else None)
    problem = build_llm_problem(config, shard=shard, log=say)
    say(f"[{config.name}] {world} process(es); pairs built and latents cached in {time.perf_counter() - t0:.1f}s "
        f"({len(problem.models)} models, k={problem.k}, stepwise, device {device} per process)")
    alignments = build_alignments(config, problem)
    broadcast_module(alignments)
    train_cfg = TrainerConfig(**{**to_dict(config.train), "seed": config.seed})
    trainer = MASTrainer(alignments, problem, train_cfg, checkpoint_path=checkpoint if main else None,
                         progress=config.progress and main, log=say, sync_gradients=average_gradients)
    # Resume on every process from rank 0's checkpoint; the barrier keeps rank 0 from writing a new one
    # before every process has read (or not found) the old one.
    if config.resume and checkpoint.exists():
        trainer.load_state_dict(torch.load(checkpoint, weights_only=False, map_location=device))
        say(f"resumed from {checkpoint} at step {trainer.step}")
    _barrier()
    fit = trainer.fit(resume=False)
    with torch.no_grad():
        records = problem.evaluate(trainer.materialize(), split="valid", with_ci=True)  # collective
    result = None
    if main:
        for r in records:
            r["best_step"] = fit.best_step
        result = MASResult(models=[e.name for e in problem.models], variables=problem.all_variables,
                           records=records, run_dir=run_dir,
                           info={"stopped": fit.stopped, "best_step": fit.best_step, "steps": fit.steps,
                                 "processes": world})
        result.save(run_dir)
        save_file({f"model{i}.{k}": v.detach().cpu().contiguous() for i, a in enumerate(alignments)
                   for k, v in a.state_dict().items()}, str(run_dir / "alignments.safetensors"))
        _write_history(fit.history, run_dir / "history.csv")
        (run_dir / "summary.json").write_text(json.dumps(
            {"stopped": fit.stopped, "best_step": fit.best_step, "steps": fit.steps, "processes": world,
             "best_mean_valid_trial_iia": fit.best_score, "seconds": round(time.perf_counter() - t0, 1)},
            indent=1))
        result.plot(run_dir / "iia_matrix.png")
    acc.wait_for_everyone()
    return result


def _command(world: int, resolved_config: Path) -> str:
    """The command that reruns (resumes) this run from its resolved config (the config.yaml header)."""
    if world == 1:
        return f"python -m llm_mas.llm.distributed {resolved_config}"
    return (f"accelerate launch --multi_gpu --num_processes {world} --num_machines 1 --mixed_precision no "
            f"--dynamo_backend no -m llm_mas.llm.distributed {resolved_config}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m llm_mas.llm.distributed CONFIG.yaml [key.sub=value ...]`` (under a launcher for N > 1)."""
    import argparse

    from ..errors import MASError
    from ..mas import load_mas_config

    parser = argparse.ArgumentParser(prog="python -m llm_mas.llm.distributed",
                                     description="Data-parallel LLM MAS (see the module docstring).")
    parser.add_argument("config", help="a preset YAML, e.g. recipes/configs/llm_deepseek.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=2")
    args = parser.parse_args(argv)
    try:
        config = load_mas_config(args.config, args.overrides)
        result = run_mas_distributed(config)
    except MASError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is not None:
        for var in result.variables:
            print(f"\ntrial IIA ({var}), rows = source, columns = target:\n{result.table(var)}")
        print(f"\nwrote {result.run_dir}/")


if __name__ == "__main__":
    main()
