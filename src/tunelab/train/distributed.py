"""Several processes, one run: data parallelism on ``torch.distributed``, launched by torchrun.

    torchrun --nproc-per-node N -m tunelab train run.yaml      (tunelab train --nproc N)

Every process (rank) builds the same run plan from the same config and data, holds the whole
model, and runs its share of each optimizer step's micro-batches: micro-batch ``i`` of a step
goes to rank ``i mod N``. Every rank divides by the *whole step's* loss weight (computed from
the shared plan, so it is the very number one process divides by), so each rank's gradient is
its share of the one-big-batch gradient, and one all-reduce (a sum, not a mean) of the trained
parameters' gradients gives every rank that gradient exactly — the same optimizer step as one
process (RELIABILITY 1), whatever ``N``.
Clipping, the NaN guard and early stopping see the same numbers on every rank, so every rank
decides the same. Rank 0 alone writes the run folder (logs, checkpoints, plots, final/) —
under fsdp every rank writes its own shards into rank 0's checkpoint folder.

Why not ``torch.nn.parallel.DistributedDataParallel``: its reducer averages gradients over the
ranks (the per-rank mean, wrong when ranks hold different loss weights) and needs every forward
to pass through its wrapper, while the fused LM head (models/nll.py) calls the decoder and the
head apart. One flat all-reduce per step costs what DDP's buckets cost without the overlap with
the backward pass, which matters little for adapters (a few MiB) — docs/distributed.md.

Full fine-tuning is sharded instead (``fsdp``, FSDP2's ``fully_shard`` on each decoder layer,
:func:`shard`): each rank keeps 1/N of every layer's weights, gradients and AdamW state, the
layers' gradients are reduce-scattered as sums, every rank makes as many forward passes as the
busiest (:func:`passes`), the norm is clipped over the shards (:func:`clip_gradients`) and the
checkpoints are sharded (checkpoint/sharded.py).

Backends: gloo on a CPU, NCCL on CUDA. Every collective has a timeout
(``train.distributed_timeout_s``), so a rank that dies cannot leave the others waiting forever;
torchrun then stops the job and names the failed rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError
from tunelab.train.guards import TrainingStopped

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch


@dataclass(frozen=True)
class World:
    """Which process this is: ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run folder and talks to the user."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    @property
    def joined(self) -> bool:
        """Several processes in a started process group: collectives can run."""
        import torch

        return self.several and torch.distributed.is_initialized()

    def part(self, items: list) -> list:
        """This rank's share of ``items``: every ``size``-th one from ``rank`` on."""
        return items[self.rank :: self.size] if self.several else items

    def mine(self, step: list[list[int]]) -> list[list[int]]:
        """This rank's share of an optimizer step's micro-batches: every ``size``-th one from
        ``rank`` on — or, when the step has fewer micro-batches than ranks, every ``size``-th
        row of each (a rank may be left with none: it adds zeros to the gradient)."""
        if not self.several:
            return step
        if len(step) >= self.size:
            return self.part(step)
        return [rows for rows in map(self.part, step) if rows]

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks, in float64 (a step's loss for the log)."""
        import torch

        if not self.several:
            return value
        out = torch.tensor(value, dtype=torch.float64, device=_device())
        _collective(torch.distributed.all_reduce, out)
        return float(out)

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (a small picklable value: a folder name, a decision).
        Without a process group (``--dry-run`` under torchrun) each rank keeps its own."""
        import torch

        if not self.joined:
            return obj
        box = [obj if self.main else None]
        _collective(torch.distributed.broadcast_object_list, box, src=0, device=_device())
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (small and picklable), in rank order, on every rank."""
        import torch

        if not self.joined:
            return [obj]
        out = [None] * self.size
        _collective(torch.distributed.all_gather_object, out, obj)
        return out

    def wait(self) -> None:
        """Every rank gets here before any goes on."""
        import torch

        if self.several:
            _collective(torch.distributed.barrier)


ONE = World()


def _collective(op, *args, **kwargs):
    """A collective; when another rank is gone (its connection reset, or the timeout passed),
    a clear stop instead of the backend's traceback."""
    import torch

    try:
        return op(*args, **kwargs)
    except (RuntimeError, torch.distributed.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingStopped(
            f"rank {torch.distributed.get_rank()}: another process of this job stopped or did not "
            f"answer within train.distributed_timeout_s ({first[:200]}); the job stops, the last "
            "complete checkpoint is intact"
        ) from None


def _device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, the CPU under gloo."""
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_from_env() -> World:
    """This process's place, as torchrun sets it (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE); one process when they are absent."""
    env = os.environ
    try:
        return World(
            rank=int(env.get("RANK", 0)), size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"torchrun's environment is not readable ({e})") from None


def start(world: World, device_type: str, timeout_s: int) -> None:
    """Join the process group (gloo on a CPU, NCCL on CUDA), once; the CPU's cores shared out
    between the processes on this machine. One process: nothing to do."""
    import torch

    if not world.several or torch.distributed.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    torch.distributed.init_process_group(
        backend, timeout=datetime.timedelta(seconds=timeout_s), rank=world.rank,
        world_size=world.size,
    )  # fmt: skip


def stop() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def choose_distributed(setting: str, world: World, method) -> tuple[str, str]:
    """(none | ddp | fsdp, why) for ``train.distributed`` in a job of ``world.size`` processes
    training with ``method`` (a :class:`~tunelab.models.methods.base.Method`); a setting that
    cannot hold is refused here, before any weights load. auto: fsdp for full fine-tuning (its
    parameters, gradients and AdamW state are what fills a device), ddp for adapters and frozen
    layers (small gradients: replicate)."""
    if setting == "fsdp" and not method.shardable:
        raise ConfigError(
            f"train.distributed: 'fsdp' shards full fine-tuning (method.name=full); with "
            f"method.name={method.name} each process holds the model and the trained part is small: "
            "use ddp (or auto)"
        )
    if not world.several:
        if setting in ("ddp", "fsdp"):
            return (
                "none",
                f"distributed: {setting} asked for, but this is one process (start it with torchrun)",
            )
        return "none", ""
    if setting == "none":
        raise ConfigError(
            f"train.distributed: 'none' but torchrun started {world.size} processes; set "
            "train.distributed=auto (or ddp), or run one process"
        )
    if setting == "fsdp" or (setting == "auto" and method.shardable):
        return "fsdp", (
            f"distributed: fsdp over {world.size} processes (each decoder layer's parameters, "
            f"gradients and AdamW state sharded {world.size} ways; embedding and head replicated)"
        )
    what = "full fine-tuning: every process holds the model and its AdamW state" if method.trains_base \
        else "each process holds the model; the trained parameters' gradients are summed"  # fmt: skip
    return "ddp", f"distributed: ddp over {world.size} processes ({what})"


def shard(model: torch.nn.Module, world: World) -> int:
    """FSDP2: shard each decoder layer of ``model`` over the ranks (``fully_shard``); return
    how many. A layer's parameters are gathered for its forward and backward and dropped
    after; its gradients are reduce-scattered as **sums** (FSDP averages by default, the
    per-rank mean), so every rank holds its shard of the one-process gradient. The embedding,
    the final norm and the head stay whole on every rank (the fused head calls them outside
    any FSDP unit; their gradients go through :func:`sum_gradients`)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(lm.get_decoder(), "layers", None) if hasattr(lm, "get_decoder") else None
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise TrainingStopped(
            "train.distributed=fsdp: this model's decoder layers were not found; use "
            "train.distributed=ddp"
        )
    mesh = init_device_mesh(_device().type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        layer.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        layer.set_gradient_divide_factor(1.0)
    return len(layers)


def is_sharded(tensor) -> bool:
    """A DTensor: a parameter (or gradient) this rank holds a shard of (FSDP)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def passes(step: list[list[int]], world: World) -> int:
    """How many forward passes the busiest rank makes in an optimizer step: under FSDP every
    rank must make as many (each one gathers every layer, a collective), so a rank with fewer
    micro-batches makes the rest with a loss weighted zero."""
    return max(len(World(r, world.size).mine(step)) for r in range(world.size))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, world: World) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of sharded (DTensor) and whole gradients:
    the norm over the whole model (each rank's shards' squares summed over the ranks, plus the
    whole gradients' once), the same on every rank; the gradients scaled the same way."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]

    def squares(tensors):
        return sum(
            (t.detach().double().pow(2).sum() for t in tensors),
            torch.zeros((), dtype=torch.float64),
        )

    shards = squares(local).to(_device())
    if world.joined:
        _collective(torch.distributed.all_reduce, shards)
    norm = float((shards.cpu() + squares(whole)).sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in [*local, *whole]:
            g.mul_(coef)
    return norm


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum the gradients of ``params`` over the ranks in one flat all-reduce (a rank that ran
    no micro-batch this step contributes zeros)."""
    import torch

    params = [p for p in params if not is_sharded(p)]  # FSDP reduce-scatters its own
    if not world.several or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(_device())
    _collective(torch.distributed.all_reduce, flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(p.device, g.dtype)
        offset += n


def same_parameters(params: list[torch.nn.Parameter], world: World) -> None:
    """Every rank starts from rank 0's trained parameters (as DDP does at construction); a
    sharded parameter's shards are each rank's own (they come from the same weights)."""
    import torch

    if not world.several:
        return
    with torch.no_grad():
        for p in params:
            if is_sharded(p):
                continue
            buf = p.data.to(_device())
            _collective(torch.distributed.broadcast, buf, src=0)
            p.data.copy_(buf)
