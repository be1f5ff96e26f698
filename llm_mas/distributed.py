"""Data-parallel LLM MAS: ``accelerate launch`` (or ``torchrun``) runs one process per GPU.

Every process loads every model and recording, builds the same pairs (seeded) and holds a replica of the
alignments (initialised identically, then broadcast from rank 0 to be sure). Each training step, process r
computes the loss on rows ``r::N`` of the step's batch (of every micro-batch under ``train.grad_accum``),
scaled so that the *average* of the processes' gradients is exactly the full batch's gradient; gradients
are averaged with one all-reduce before the optimiser step, so the replicas stay identical. Evaluation
splits the validation pairs the same way and gathers every process's per-pair results, so all processes
compute identical records (and take identical early-stopping decisions). This module only sets up the
processes (accelerate) and hands ``llm_mas.run.run`` this process's ``Shard`` with the collectives; only
rank 0 writes the run directory — the same files as ``llm-mas mas``.

Commands (a GPU per process; ``models.i.device`` must be unset: each process puts every model on its own
GPU). N GPUs on one machine::

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m llm_mas.distributed llm_deepseek

    torchrun --standalone --nproc_per_node N -m llm_mas.distributed llm_deepseek

``train.batch_size`` stays the global batch (rows per optimiser step over all processes), so results do not
depend on N. One process (``python -m llm_mas.distributed CONFIG``) gives the same run as
``llm-mas mas CONFIG``. Two CPU processes (gloo; what the tests run; note that ``accelerate launch --cpu
--num_processes 2`` silently starts ONE process)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        --main_process_port 29511 -m llm_mas.distributed CONFIG.yaml device=cpu

Precision comes from ``models.i.dtype`` (e.g. bfloat16); accelerate's ``--mixed_precision`` must be ``no``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, MASError
from .presets import resolve_preset
from .problems import Shard
from .results import MASResult
from .run import run
from .run_config import MASConfig, load_mas_config


def average_gradients(module) -> None:
    """All-reduce the gradients of ``module``'s trainable parameters and divide by the world size.

    A parameter without a gradient on some process (no rows there) counts as a zero gradient; one without a
    gradient on every process keeps ``grad = None`` (as in a single process, so Adam skips it).
    """
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
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in module.state_dict().values():  # state_dict tensors share storage with the module
        dist.broadcast(tensor.data, src)


def _gather_objects(obj: Any) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _accelerator(config):
    """An ``Accelerator`` for this process; checks that the launcher really started WORLD_SIZE processes."""
    from accelerate import Accelerator  # heavy: only when launching

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


def run_distributed(config: MASConfig, log: Callable[[str], None] = print) -> MASResult | None:
    """``llm_mas.run.run`` data-parallel over the launched processes (HF models).

    Returns the ``MASResult`` on rank 0 and None on the other ranks. Every process must call it.
    """
    if config.kind != "hf":
        raise ConfigError("models: data-parallel MAS runs HF models only (kind: hf); run task models with "
                          "`llm-mas mas`")
    acc = _accelerator(config)
    world, rank = acc.num_processes, acc.process_index
    if world > 1:
        pinned = [f"models.{i}.device={m.device!r}" for i, m in enumerate(config.models) if m.device is not None]
        if pinned:
            raise ConfigError(f"{', '.join(pinned)}: a data-parallel run puts every model on its process's device "
                              f"({acc.device} on rank {rank}); remove models.i.device")
    # cpu (accelerate says cpu:0 under MULTI_CPU), or this process's cuda:<local rank>
    device = "cpu" if acc.device.type == "cpu" else f"{acc.device.type}:{acc.device.index or 0}"
    config = dataclasses.replace(config, device=device)
    shard = Shard(rank, world, _gather_objects if world > 1 else None, barrier=_barrier, broadcast=broadcast_module,
                  average_gradients=average_gradients)
    result = run(config, shard=shard, log=log,
                 command=_command(world, Path(config.out_dir) / config.name / "config.yaml"))
    acc.wait_for_everyone()
    return result


def _command(world: int, resolved_config: Path) -> str:
    """The command that reruns (resumes) this run from its resolved config (the config.yaml header)."""
    if world == 1:
        return f"python -m llm_mas.distributed {resolved_config}"
    return (f"accelerate launch --multi_gpu --num_processes {world} --num_machines 1 --mixed_precision no "
            f"--dynamo_backend no -m llm_mas.distributed {resolved_config}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m llm_mas.distributed CONFIG.yaml [key.sub=value ...]`` (under a launcher for N > 1)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llm_mas.distributed",
                                     description="Data-parallel LLM MAS (see the module docstring).")
    parser.add_argument("config", help="a preset name (llm-mas list-presets) or YAML file, e.g. llm_deepseek")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=2")
    args = parser.parse_args(argv)
    try:
        config = load_mas_config(resolve_preset(args.config), args.overrides)
        result = run_distributed(config)
    except MASError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is not None:
        for var in result.variables:
            print(f"\ntrial IIA ({var}), rows = source, columns = target:\n{result.table(var)}")
        print(f"\nwrote {result.run_dir}/")


if __name__ == "__main__":
    main()
