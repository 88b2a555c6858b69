"""Supervised fine-tuning: the weighted next-token NLL (replies at weight 1, prompt tokens at
``data.prompt_loss_weight``), logits only for weighted targets, a chunk of rows at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tunelab.data.collate import Batch, collate, pack
from tunelab.data.records import Example
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import DataError, Problem
from tunelab.models.device import HEAD_CHUNK

if TYPE_CHECKING:  # torch and the loss are imported where used: `tunelab plan` reads neither
    import torch

#: Record formats SFT cannot learn from, and why (with the objective that fits them).
REFUSED = {
    "preference": "a preference pair (prompt, chosen, rejected) cannot be trained with "
    "train.objective=sft: the rejected answer would be dropped silently. Preference pairs "
    "need a preference objective (train.objective=dpo, simpo or orpo), or keep "
    "only the chosen answers as an alpaca/chat file",
    "kto": "a KTO record (with kto_tag) cannot be trained with train.objective=sft: answers "
    "tagged false would be learned as good ones. KTO records need train.objective=kto, "
    "or keep only the kto_tag true records, without the tag",
}


class SFT:
    name = "sft"
    uses_reference = False
    reports_perplexity = True  # its loss is an NLL per token
    can_pack = True

    def __init__(self, chunk: int = HEAD_CHUNK):
        self.chunk = chunk
        self.reference = None
        self.pack = False  # set by the plan (train.packing)
        self.pad_to: int | None = None  # pad widths to a multiple of this (set by the plan)

    def prepare(self, train, val, cfg) -> list[str]:
        return []

    def ref_rows(self, example: TokenizedExample) -> list:
        return []

    def pop_stats(self) -> dict[str, float]:
        return {}

    def check_data(self, examples: Sequence[Example]) -> None:
        for e in examples:
            if e.format in REFUSED:
                raise DataError(Problem(e.source.file, e.source.line, "format", REFUSED[e.format]))

    def collate(self, examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
        seqs = [t.seq for t in examples]
        if self.pack:
            return pack(seqs, pad_id, self.pad_to)
        return collate(seqs, pad_id, pad_to_multiple_of=self.pad_to)

    def weight(self, batch: Batch) -> float:
        from tunelab.models.nll import target_weights

        return float(target_weights(batch.loss_weights).sum())

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        from tunelab.models.nll import causal_lm_nll_sum

        return causal_lm_nll_sum(
            model, batch.input_ids, batch.model_mask, batch.position_ids,
            batch.loss_weights, self.chunk, (batch.cu_seqlens, batch.max_len),
        )  # fmt: skip
