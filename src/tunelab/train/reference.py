"""The reference model of DPO and KTO, without a second copy of the weights where possible.

    precompute_ref true           one pass over the training and validation rows before the
                                  first step; the log-probabilities are cached in the run folder
                                  (reference_logps.json) and reused on resume
    LoRA / QLoRA, precompute false the model itself with its adapter disabled (peft's
                                  ``disable_adapter``): the base, no copy
    full / freeze, precompute false: a frozen copy of the model made before the first step

``precompute_ref: auto`` precomputes for full and freeze training (a frozen copy would double
the weights in memory) and uses the adapter-disabled base for LoRA (no copy, no file).

Reference log-probabilities are always those of the model *before* training: they are computed
after the method is applied (a LoRA adapter starts at zero, and is disabled anyway) and before a
resumed run restores its checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable

import torch

from tunelab.files import atomic_write_json
from tunelab.models.tokenizer import pad_id
from tunelab.train.objectives.pairs import collate_rows, score
from tunelab.train.plan import REFERENCE_FILE, RunPlan, precomputes


def setup_reference(plan: RunPlan, model: torch.nn.Module, log=print) -> None:
    """Give the objective its reference: precomputed values on every example, or a function."""
    objective = plan.objective
    if not objective.uses_reference:
        return
    if not precomputes(plan.cfg, plan.method):
        objective.reference = frozen_copy(model) if plan.method.trains_base else adapter_disabled
        return
    path = plan.run_dir / REFERENCE_FILE
    values = _read(path, plan)
    if values is None:
        log(f"reference: scoring {len(plan.train) + len(plan.val)} examples with the model "
            f"before training (cached in {REFERENCE_FILE})")  # fmt: skip
        values = {part: compute(plan, model, getattr(plan, part)) for part in ("train", "val")}
        atomic_write_json(path, {"fingerprint": _key(plan), **values})
    for part in ("train", "val"):
        for example, refs in zip(getattr(plan, part), values[part], strict=True):
            example.ref = tuple(refs)


def compute(plan: RunPlan, model: torch.nn.Module, examples: list) -> list[list[float]]:
    """The reference log-probability of every row ``objective.ref_rows`` names, per example."""
    objective, pad = plan.objective, pad_id(plan.tokenizer)
    size = plan.cfg.train.eval_batch_size or plan.cfg.train.micro_batch_size
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), _adapter_off(model), plan.autocast(model):
        for i in range(0, len(examples), size):
            chunk = examples[i : i + size]
            per = [objective.ref_rows(t) for t in chunk]
            rows = collate_rows([r for rs in per for r in rs], pad, None)
            logps = score(model, rows.to(plan.placement.device))[0].float().cpu().tolist()
            k = len(per[0])
            out += [logps[j * k : (j + 1) * k] for j in range(len(chunk))]
    model.train(was_training)
    return out


def adapter_disabled(model: torch.nn.Module, rows) -> torch.Tensor:
    """The reference of a LoRA run: the same model with its adapter switched off."""
    with _adapter_off(model):
        return score(model, rows)[0]


def frozen_copy(model: torch.nn.Module) -> Callable:
    """A reference that is a frozen copy of ``model`` as it is now."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)

    def reference(_model: torch.nn.Module, rows) -> torch.Tensor:
        return score(ref, rows)[0]

    reference.model = ref  # for tests and memory accounting
    return reference


def _adapter_off(model: torch.nn.Module):
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


def _key(plan: RunPlan) -> dict:
    fp = plan.fingerprint
    keys = (
        "model",
        "data.path",
        "data.val_path",
        "train.objective",
        "train.seed",
        "data.max_seq_len",
    )
    return {k: fp.get(k) for k in keys} | {"train": len(plan.train), "val": len(plan.val)}


def _read(path, plan: RunPlan) -> dict | None:
    """The cached values when they belong to this run's model, data and examples; else None
    (they are computed again, before any checkpoint is restored)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != _key(plan):
        return None
    if any(len(saved.get(p, ())) != len(getattr(plan, p)) for p in ("train", "val")):
        return None
    return saved
