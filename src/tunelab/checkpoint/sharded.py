"""Sharded checkpoints: the model and optimizer of an FSDP run, with ``torch.distributed.checkpoint``.

Under FSDP no rank holds the whole model, so every rank writes its own shards into one folder
(on a file system all ranks see) and rank 0 writes the plan of the whole (``.metadata``)::

    step-000100/
      sharded/              DCP: __0_0.distcp, __1_0.distcp, ... and .metadata —
                            every parameter and AdamW state, by its name in the model
      rng.pt, trainer_state.json, manifest.json   as for any checkpoint (rank 0)

The folder is made atomic the usual way (:class:`~tunelab.checkpoint.manager.CheckpointManager`:
a temporary folder renamed when complete; rank 0 tells the other ranks where it is). DCP
stores tensors by name with their global shapes, so a sharded checkpoint loads on any number
of processes — with FSDP on another number (each rank reads its new shards) or on one process
into the plain model (resharding is DCP's). DCP reads ``.metadata`` with ``pickle``: a
checkpoint is trusted data (its manifest is verified before a resume reads it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.checkpoint.state import CheckpointError

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch

SHARDED_FOLDER = "sharded"


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDED_FOLDER).is_dir()


def save_sharded(folder: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Every rank's shards of ``model`` (and ``optimizer``'s state) into ``folder/sharded``: a
    collective — every rank calls it with the same folder."""
    import torch.distributed.checkpoint as dcp

    if optimizer is not None and not optimizer.state:  # before the first step: nothing to keep
        optimizer = None  # (and asking DCP for it would make a first AdamW step, lr 0, to fill it)
    dcp.save(_state(model, optimizer), checkpoint_id=Path(folder) / SHARDED_FOLDER)


def load_sharded(folder: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Put a sharded checkpoint's weights (and optimizer state, when ``optimizer`` is given)
    into ``model``, sharded or not, on however many processes this run has."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    where = Path(folder) / SHARDED_FOLDER
    try:
        if optimizer is not None and not _has_optimizer(where):  # saved before the first step
            optimizer = None
        state = _state(model, optimizer)
        with warnings.catch_warnings():  # one process: "assuming ... a single process" is the point
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=where)
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip
    except (RuntimeError, ValueError, KeyError, AssertionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: does not fit this run ({first[:300]})") from e


def gather_weights(model: torch.nn.Module) -> dict:
    """The whole state dict of a sharded model, gathered into CPU memory on rank 0 (empty on
    the others): a collective, for writing final/."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _has_optimizer(where: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
    return any(key.startswith("optim.") for key in keys)


def _state(model: torch.nn.Module, optimizer) -> dict:
    """{"model": ..., "optim": ...} keyed by parameter names: each rank's shards (DTensors)
    and whole tensors, the optimizer's state by the names of its parameters."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}
