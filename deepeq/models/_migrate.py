"""Reading model weights saved by older layouts (one migration, at the load boundary)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: before the solve became a policy value, models held their layer f twice: as ``f`` and
#: inside the equilibrium module ``deq`` (``deq.f.*``, the same tensors)
_OLD_LAYER = "deq.f."


def migrate_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a model's ``state_dict``) in the current layout: the ``deq.f.*`` copies of
    ``f.*`` that models saved before their solve became a policy value are dropped (or renamed
    to ``f.*`` where that key is missing); a current state is returned unchanged."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith(_OLD_LAYER):
            new = key[len("deq.") :]
            if new in state:
                continue
            key = new
        out[key] = value
    return out
