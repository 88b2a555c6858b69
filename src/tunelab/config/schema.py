"""The configuration schema: every setting, its default and its meaning, in one place.

The YAML file, the dotted command-line overrides (``data.max_seq_len=512``) and validation all
come from these classes. Unknown keys are rejected (``extra="forbid"``). Later features add
sections (``method``, ``train``, ``eval``...) as new classes and fields on :class:`Config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RECORD_FIELDS = ("instruction", "input", "output", "system", "history", "messages", "prompt",
                 "chosen", "rejected", "kto_tag", "text")  # fmt: skip


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A catalog name, a Hugging Face model folder, a .gguf file, or a hub id.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer to use instead of the model's own.")


class DataConfig(Section):
    path: str | None = Field(
        None, description="Training data: a .jsonl, .json (array) or .csv file."
    )
    val_path: str | None = Field(
        None, description="Validation file; when unset, val_ratio of path is held out."
    )
    val_ratio: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share held out for validation when val_path is unset."
    )
    format: Literal["auto", "alpaca", "chat", "preference", "kto", "text"] = Field(
        "auto", description="Record format; auto detects it from each record's fields."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename fields: {our_name: name_in_your_file}, e.g. {instruction: question}.",
    )
    system_prompt: str | None = Field(None, description="System prompt for records that have none.")
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template replacing the tokenizer's (default: the tokenizer's own).",
    )
    train_on: Literal["all", "last"] = Field(
        "all", description="Train every assistant turn, or only the last."
    )
    prompt_loss_weight: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Loss weight of prompt tokens (system, user, template) relative to response tokens.",
    )  # fmt: skip
    max_seq_len: int = Field(1024, gt=0, description="Longest sequence in tokens.")
    truncation: Literal["drop", "truncate_prompt", "truncate", "error"] = Field(
        "drop", description="What to do with longer sequences."
    )
    dedup: bool = Field(False, description="Drop exact duplicate records before training.")
    seed: int = Field(42, description="Seed for the validation split and shuffling.")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        for ours in value:
            if ours not in RECORD_FIELDS:
                raise ValueError(
                    f"unknown record field {ours!r} (expected one of: {', '.join(RECORD_FIELDS)})"
                )
        return value


class Config(Section):
    """The whole configuration of a tunelab run."""

    name: str | None = Field(
        None, description="Run name (default: derived from the data and time)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
