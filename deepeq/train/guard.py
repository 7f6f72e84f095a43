"""The run's guards and what they remember: the count of skipped (non-finite) steps, which
stops a run after ``max_nonfinite`` in a row, and the exploding-loss warning (``LossGuard``).
Their state is one record, ``GuardState``, which ``latest.pt`` saves as one nested dict
(``"guard"``) and a resumed run continues."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class GuardState:
    """What the run's guards remember (saved in ``latest.pt`` as ``"guard"``)."""

    skipped_in_row: int = 0  # consecutive steps skipped (the run stops at max_nonfinite)
    skipped_total: int = 0  # steps skipped in the run (metrics.csv's ``skipped``)
    loss_start: float | None = None  # the task loss of the run's first step
    loss_recent: list[float] = field(default_factory=list)  # the last losses (LossGuard.window)
    loss_exploded_at: int | None = None  # the step the loss guard warned at (None: never)

    def count(self, applied: bool) -> None:
        """Record whether a step's update was applied (else it was skipped)."""
        self.skipped_in_row = 0 if applied else self.skipped_in_row + 1
        self.skipped_total += 0 if applied else 1

    def to_dict(self) -> dict:
        """Plain data for the checkpoint."""
        return {**dataclasses.asdict(self), "loss_recent": list(self.loss_recent)}

    @classmethod
    def from_checkpoint(cls, ck: dict) -> GuardState:
        """The record of a training checkpoint: its ``"guard"`` dict, or, in a checkpoint written
        before the record, the same fields at top level (where an older one lacks the loss
        guard's, they start empty)."""
        saved = ck.get("guard")
        if saved is None:
            saved = {f.name: ck[f.name] for f in dataclasses.fields(cls) if f.name in ck}
        state = cls(**saved)
        state.loss_recent = list(state.loss_recent or [])
        return state


class LossGuard:
    """Warns once when the training loss explodes: the mean task loss of the last ``window``
    steps above ``ratio`` times the run's first loss (before any update; ``ratio = 0``: off).
    It keeps its record in ``state`` (the run's ``GuardState``), so it survives a resume."""

    def __init__(self, ratio: float, state: GuardState, window: int = 10):
        self.ratio, self.state, self.window = ratio, state, window

    def update(self, step: int, loss: float) -> str | None:
        """Record the step's loss; returns the warning the first time the loss has exploded."""
        s = self.state
        if not self.ratio or not math.isfinite(loss):
            return None
        if s.loss_start is None:
            s.loss_start = loss
            return None
        s.loss_recent = [*s.loss_recent, loss][-self.window :]
        now = sum(s.loss_recent) / len(s.loss_recent)
        if (
            s.loss_exploded_at is None
            and len(s.loss_recent) == self.window
            and now > self.ratio * abs(s.loss_start)
        ):
            s.loss_exploded_at = step
            return (
                f"step {step}: the training loss exploded: mean {now:.4g} over the last "
                f"{self.window} steps against {s.loss_start:.4g} at the first step "
                f"(> max_loss_ratio = {self.ratio:g}x). The run goes on, but its result is "
                f"probably useless: lower optim.lr, enable optim.clip, or add Jacobian "
                f"regularisation (jac.weight); max_loss_ratio = 0 silences this check."
            )
        return None
