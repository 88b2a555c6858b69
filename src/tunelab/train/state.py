"""The loop's state: exactly what a checkpoint's ``trainer_state.json`` holds, and the outcome
the loop hands back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tunelab.checkpoint.state import CheckpointError


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # real (non-padding) tokens trained on
    nan_skips: int = 0  # steps skipped for a non-finite loss or gradient
    initial_eval_loss: float | None = None  # the untrained model's validation loss
    best_eval_loss: float | None = None  # the lowest validation loss so far (step 0 included)
    best_step: int | None = None
    evals_without_improvement: int = 0  # for early stopping
    fingerprint: dict = field(default_factory=dict)  # what a resume must agree with

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "trainer_state.json") -> TrainState:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "step" not in data:
            problem = f"unknown fields {unknown}" if unknown else "no 'step'"
            raise CheckpointError(f"{where}: not a tunelab trainer state ({problem})")
        return cls(**data)

    def observe_eval(self, loss: float | None) -> bool:
        """Record a validation loss at the current step; True when it is the best so far."""
        improved = loss is not None and (self.best_eval_loss is None or loss < self.best_eval_loss)
        if improved:
            self.best_eval_loss, self.best_step = loss, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return improved


@dataclass
class Outcome:
    steps: int
    train_loss: float | None  # the last finite step loss
    stopped_early: bool
    seconds: float  # in the loop, this process
    tokens: int  # trained on in this process
    steps_run: int  # optimizer steps this process ran (a resume runs only the missing ones)
    #: real tokens/s of this process's steps after its first (which carries compilation and
    #: warm-up), the median; None below three steps
    step_rate: float | None = None
