"""Which samples the current call of f covers (for per-sample state kept inside f)."""

from __future__ import annotations

from contextvars import ContextVar

from torch import Tensor

_SAMPLE_INDEX: ContextVar[Tensor | None] = ContextVar("deepeq_sample_index", default=None)


def sample_index() -> Tensor | None:
    """The original batch positions of the rows f is being called on, or None for the full batch.

    The engine calls f only on samples that have not converged yet. A module inside f that keeps
    per-sample state drawn on the full batch (a dropout mask, a cache) must select the same rows:
    ``state if (idx := sample_index()) is None else state[idx]``. Outside a solve this is None.

    Returns:
        int64 tensor of shape ``(b,)`` on the device of z, or None.
    """
    return _SAMPLE_INDEX.get()
