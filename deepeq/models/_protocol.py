"""What the training loop, evaluation and analysis need of a model with an equilibrium layer.

Every registered DEQ family (sequence models and MDEQ) derives from ``EquilibriumModel``;
code outside ``deepeq.models`` asks ``equilibrium_layer(model)`` instead of probing attributes.
Explicit twins (``core="tied"`` / ``"untied"``) are the same classes with ``deq = None``."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.deq import DEQ
from ._solve import SolveSpec


class EquilibriumModel(nn.Module):
    """A model whose core may be an equilibrium layer ``deq`` (a ``deepeq.DEQ`` built from
    ``config.solve``; None for the explicit twins), with a layer ``f``.

    The protocol: ``deq``, ``f``, ``config.solve``; ``with_solve(spec)`` (a twin sharing every
    weight, solved by another spec); ``set_pretraining(on)`` (shallow-pretraining switch; a
    no-op where the model has none); ``equilibrium_problem(batch, generator, length, inputs)``
    (``(f, args, z0)`` of one input batch, for the analysis studies)."""

    # set by every constructor (``self.deq = ...`` or None): a class attribute would shadow
    # the submodule, which nn.Module keeps in ``_modules``. Weight-tied sequence twins keep the
    # layer their weights were saved with but do not solve with it: ``equilibrium`` is None.
    deq: DEQ | None
    #: whether an input's length is free (sequence positions) or fixed by the config (images)
    variable_length: bool = True

    @property
    def equilibrium(self) -> DEQ | None:
        """The equilibrium layer the forward solves with; None for the explicit twins."""
        return self.deq if getattr(self.config, "core", "deq") == "deq" else None

    def with_solve(self, solve: SolveSpec) -> EquilibriumModel:
        """A twin of this model whose equilibrium layer is built from ``solve``: it shares every
        parameter and submodule (their train/eval mode too), and ``config.solve`` is ``solve``;
        this model is left as it was. Derive the spec with ``dataclasses.replace``::

            twin = model.with_solve(dataclasses.replace(model.config.solve, eval_max_steps=60))

        Raises:
            ValueError: the model has no equilibrium layer (an explicit twin).
        """
        if self.equilibrium is None:
            raise ValueError(
                f"{type(self).__name__} (core {self.config.core!r}) has no equilibrium layer to "
                f"solve with another spec; use a model with core 'deq'."
            )
        if not isinstance(solve, SolveSpec):
            raise TypeError(f"with_solve takes a SolveSpec; got {type(solve).__name__}.")
        twin = copy.copy(self)
        twin._modules = dict(self._modules)  # its own module table: this model keeps its layer
        twin.config = dataclasses.replace(self.config, solve=solve)
        twin.deq = solve.build(self.f)
        twin.deq.train(self.training)
        return twin

    def set_pretraining(self, on: bool) -> None:
        """Shallow-pretraining switch (sequence models); models without one ignore it."""

    def equilibrium_problem(
        self, batch: int, generator: torch.Generator, length: int = 0, inputs: Tensor | None = None
    ) -> tuple[nn.Module, tuple, Any]:
        """``(f, args, z0)``: the equilibrium problem of one input batch (random inputs drawn
        from ``generator`` unless ``inputs`` are given), such that ``z* = f(z*, *args)``."""
        raise NotImplementedError


def equilibrium_layer(model: nn.Module) -> DEQ | None:
    """The model's equilibrium layer, or None (an explicit twin, a baseline, another module)."""
    return model.equilibrium if isinstance(model, EquilibriumModel) else None


def require_equilibrium(model: nn.Module, what: str) -> EquilibriumModel:
    """``model`` if it has an equilibrium layer; else a ValueError saying ``what`` needs one."""
    if equilibrium_layer(model) is None:
        name = type(model).__name__
        core = getattr(getattr(model, "config", None), "core", None)
        raise ValueError(
            f"{what} needs a DEQ model (an equilibrium layer); got {name}"
            + (f" with core {core!r}" if core else "")
            + ". Use a deq_* or mdeq_* model from deepeq.models.list_models()."
        )
    return model  # type: ignore[return-value]
