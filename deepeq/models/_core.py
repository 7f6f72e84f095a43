"""A model's core, chosen once from its config's word ``core`` by ``make_core``: how the state
that feeds the head is computed from the input injection."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Core:
    """One way of computing a model's state.

    Args:
        name: the config's word (``core = "deq"`` in TOML).
        solves: the state is the equilibrium of one layer f, found and differentiated by the
            config's solve spec (``config.solve``); otherwise f is applied a fixed number of
            times (explicit).
        stacked: ``depth`` distinct layers (an untied stack) instead of one layer f.
    """

    name: str
    solves: bool
    stacked: bool


#: the equilibrium of one layer f (the DEQ)
EQUILIBRIUM = Core("deq", solves=True, stacked=False)
#: one layer f applied ``depth`` times (the explicit weight-tied twin)
TIED = Core("tied", solves=False, stacked=False)
#: ``depth`` distinct layers (the explicit untied twin)
UNTIED = Core("untied", solves=False, stacked=True)
CORES = (EQUILIBRIUM, TIED, UNTIED)


def make_core(name: str, allowed: tuple[Core, ...] = CORES) -> Core:
    """The core named ``name`` among ``allowed``.

    Raises:
        ValueError: ``name`` is not the name of one of ``allowed``.
    """
    for core in allowed:
        if core.name == name:
            return core
    words = [repr(c.name) for c in allowed]
    listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    raise ValueError(f"core must be {listed}; got {name!r}.")
