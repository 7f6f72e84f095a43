"""What the training loop, evaluation and analysis need of a model with an equilibrium core.

Every registered DEQ family (sequence models and MDEQ) derives from ``EquilibriumModel``: it
holds its layer ``f`` and its config (``config.solve``: the ``SolveSpec`` whose policy solves
f), and its ``core`` (``deepeq.models._core``) says whether it solves at all; code outside
``deepeq.models`` asks ``equilibrium_layer(model)`` (the solve policy, or None) instead of
probing attributes. Explicit twins (``core="tied"`` / ``"untied"``) are the same classes."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .._solution import Solution
from .._types import State
from ..nn.cache import FixedPointCache
from ..nn.deq import SolvePolicy
from ._core import Core
from ._solve import SolveSpec


class EquilibriumModel(nn.Module):
    """A model whose core may be the equilibrium of its layer ``f``, solved by the policy of
    ``config.solve`` (``core``: a ``Core`` chosen once from ``config.core``).

    The protocol: ``f``, ``config.solve``, ``core``, ``equilibrium`` (the solve policy, None
    for the explicit twins); ``fp_cache`` (a ``deepeq.nn.FixedPointCache`` the training loop
    attaches, or None); ``with_solve(spec)`` (a twin sharing every weight, solved by another
    spec); ``set_pretraining(on)`` (shallow-pretraining switch; a no-op where the model has
    none); ``equilibrium_problem(batch, generator, length, inputs)`` (``(f, args, z0)`` of one
    input batch, for the analysis studies)."""

    #: set by every constructor from ``config.core``
    core: Core
    #: the per-example fixed-point cache the training solves use (``cache_keys``), if any
    fp_cache: FixedPointCache | None = None
    #: whether an input's length is free (sequence positions) or fixed by the config (images)
    variable_length: bool = True

    @property
    def equilibrium(self) -> SolvePolicy | None:
        """The policy the forward solves f with; None for the explicit twins."""
        return self.config.solve.policy if self.core.solves else None

    def solve_equilibrium(
        self, x: Any, z0: State, cache_keys: Tensor | None = None
    ) -> tuple[State, Solution]:
        """``z* = f(z*, x)`` from ``z0`` by ``config.solve`` in this model's mode (training or
        eval), with the fixed-point cache when one is attached and ``cache_keys`` are given."""
        return self.config.solve.solve(
            self.f, x, z0, training=self.training, cache=self.fp_cache, cache_keys=cache_keys
        )

    def with_solve(self, solve: SolveSpec) -> EquilibriumModel:
        """A twin of this model solved by ``solve``: a shallow copy whose ``config.solve`` is
        ``solve``; it shares every parameter, submodule and hook (their train/eval mode too);
        this model is left as it was. Derive the spec with ``dataclasses.replace``::

            twin = model.with_solve(dataclasses.replace(model.config.solve, eval_max_steps=60))

        Raises:
            ValueError: the model has no equilibrium core (an explicit twin).
        """
        if self.equilibrium is None:
            raise ValueError(
                f"{type(self).__name__} (core {self.config.core!r}) has no equilibrium layer to "
                f"solve with another spec; use a model with core 'deq'."
            )
        if not isinstance(solve, SolveSpec):
            raise TypeError(f"with_solve takes a SolveSpec; got {type(solve).__name__}.")
        twin = copy.copy(self)
        twin.config = dataclasses.replace(self.config, solve=solve)
        return twin

    def set_pretraining(self, on: bool) -> None:
        """Shallow-pretraining switch (sequence models); models without one ignore it."""

    def equilibrium_problem(
        self, batch: int, generator: torch.Generator, length: int = 0, inputs: Tensor | None = None
    ) -> tuple[nn.Module, tuple, Any]:
        """``(f, args, z0)``: the equilibrium problem of one input batch (random inputs drawn
        from ``generator`` unless ``inputs`` are given), such that ``z* = f(z*, *args)``."""
        raise NotImplementedError


def equilibrium_layer(model: nn.Module) -> SolvePolicy | None:
    """The policy that solves the model's equilibrium (solvers, backward, causality,
    correction), or None (an explicit twin, a baseline, another module)."""
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
