"""Everything an exact resume needs besides the model weights.

A checkpoint folder holds, next to the weights:

    optimizer.pt        optimizer.state_dict()
    scheduler.pt        scheduler.state_dict()
    scaler.pt           the fp16 loss scaler's state_dict() (fp16 runs only)
    rng.pt              Python, NumPy, torch CPU and CUDA random states (capture_rng)
    trainer_state.json  what the loop needs to continue: step, epoch, position in the epoch,
                        best metric, NaN skips, fingerprint... (stored as given)

Every ``.pt`` file holds only tensors and plain Python values, so all of them load with
``torch.load(..., weights_only=True)``: a checkpoint cannot run code when loaded. (NumPy's
state is stored as a tensor for that reason.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tunelab.errors import TunelabError

if TYPE_CHECKING:  # torch is imported where it is used: `tunelab plan` reads none
    import torch

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"


class CheckpointError(TunelabError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit this run."""


# ---- random number generators ------------------------------------------------------------


def capture_rng() -> dict:
    """The state of every global random generator a training step may draw from."""
    import torch

    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what :func:`capture_rng` returned. CUDA states are restored for the devices
    present in both (a CPU checkpoint on a GPU machine leaves CUDA alone)."""
    import torch

    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples all the way down."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


# ---- optimizer, scheduler, scaler, trainer state ------------------------------------------


def save_state(
    folder: Path,
    *,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict,
    scaler: Any | None = None,
) -> None:
    """Write the resume state into ``folder`` (normally the temporary folder that
    :meth:`CheckpointManager.save` hands to its ``write``, which makes the whole set atomic).
    ``optimizer`` None: its state is elsewhere (a sharded checkpoint's, checkpoint/sharded.py)."""
    import torch

    folder = Path(folder)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), folder / SCHEDULER_FILE)
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / SCALER_FILE)
    torch.save(capture_rng(), folder / RNG_FILE)
    text = json.dumps(trainer_state, indent=2, ensure_ascii=False) + "\n"
    (folder / TRAINER_STATE_FILE).write_text(text, encoding="utf-8")


def load_state(
    folder: Path,
    *,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: Any | None = None,
) -> dict:
    """Restore what :func:`save_state` wrote (random states included) and return the trainer
    state. Every file is read before anything is changed, so a missing or corrupt file raises
    :class:`CheckpointError` naming it and leaves the objects as they were.

    Create the scheduler before calling this (its constructor sets the optimizer's learning
    rate; the saved optimizer and scheduler state then put back the saved one)."""
    folder = Path(folder)
    trainer_state = read_trainer_state(folder / TRAINER_STATE_FILE)
    optimizer_state = _load_pt(folder / OPTIMIZER_FILE) if optimizer is not None else None
    scheduler_state = _load_pt(folder / SCHEDULER_FILE) if scheduler is not None else None
    scaler_state = _load_pt(folder / SCALER_FILE) if scaler is not None else None
    rng_state = _load_pt(folder / RNG_FILE)

    if optimizer is not None:
        _apply(folder / OPTIMIZER_FILE, optimizer.load_state_dict, optimizer_state)
    if scheduler is not None:
        _apply(folder / SCHEDULER_FILE, scheduler.load_state_dict, scheduler_state)
    if scaler is not None:
        _apply(folder / SCALER_FILE, scaler.load_state_dict, scaler_state)
    _apply(folder / RNG_FILE, restore_rng, rng_state)
    return trainer_state


def _load_pt(path: Path) -> Any:
    import torch

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({first_line})") from e


def read_trainer_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(state).__name__}")
    return state


def _apply(path: Path, load: Any, state: Any) -> None:
    try:
        load(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{path}: does not fit this run ({e})") from e


# ---- fingerprints ------------------------------------------------------------------------


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """One line per identity field that differs between a checkpoint and the current run.

    Nested dicts are compared field by field (``method.r``); values are compared after a JSON
    round trip, since the saved side came from JSON (a tuple equals the list it became)."""
    old, new = _flatten(_jsonable(saved)), _flatten(_jsonable(current))
    lines = []
    for key in [*old, *(k for k in new if k not in old)]:
        if key not in new:
            lines.append(
                f"{key}: checkpoint was trained with {_show(old[key])}, the config now gives none"
            )
        elif key not in old:
            lines.append(f"{key}: checkpoint has no value, the config now gives {_show(new[key])}")
        elif old[key] != new[key]:
            lines.append(
                f"{key}: checkpoint was trained with {_show(old[key])}, "
                f"the config now gives {_show(new[key])}"
            )
    return lines


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
