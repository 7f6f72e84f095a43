"""One training step: the loss (task loss + fixed-point correction + Jacobian penalty), the
non-finite guard, backward, clipping and the optimiser update, returned as a ``StepResult``."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from .._solution import Solution, Status
from ..models._protocol import equilibrium_layer
from ..regularization import jacobian_penalty, spectral_radius, unconverged_mask
from .config import TrainConfig


class Skip(enum.Enum):
    """Why a step's update was not applied (its text is what the log says)."""

    NONFINITE = "non-finite loss or solve"
    NONFINITE_GRADIENT = "non-finite gradient (finite loss)"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StepResult:
    """What one training step did. ``skipped`` says why the update was not applied (None: it
    was); ``solutions`` are the step's equilibrium solves (empty for explicit models);
    ``monitor`` holds the ‖J‖_F estimate and spectral radius on monitored steps."""

    loss: float
    task_loss: float
    jac_penalty: float | None
    fpc_loss: float | None
    grad_norm: float | None
    skipped: Skip | None
    solutions: list[Solution] = field(default_factory=list)
    monitor: dict = field(default_factory=dict)
    jac_unconverged: float | None = None  # the penalty on the unconverged rows (None: none)

    @property
    def applied(self) -> bool:
        return self.skipped is None


def correction_loss(model, sols: list, targets: torch.Tensor) -> torch.Tensor | None:
    """Fixed-point correction: the model's training loss on each supervised iterate of the
    solves (``Solution.trajectory``), weighted by the DEQ's ``FixedPointCorrection``;
    with subsequence solving the chunks' j-th states are joined along time; with
    ``positions < 1`` each iterate's loss is the mean over a random subset of the positions.
    None when off."""
    if not sols or not sols[0].trajectory:
        return None
    n = min(len(s.trajectory) for s in sols)
    states = [
        sols[0].trajectory[j]
        if len(sols) == 1
        else torch.cat([s.trajectory[j] for s in sols], dim=1)
        for j in range(n)
    ]
    fpc = equilibrium_layer(model).correction
    losses = []
    for z in states:
        idx = None if isinstance(z, tuple) else fpc.sample(z.shape[1])
        if idx is None:
            losses.append(model.head_loss(z, targets).mean())
        else:  # a random subset of the positions (dim 1), fresh for each iterate
            idx = idx.to(z.device)
            losses.append(model.head_loss(z[:, idx], targets[:, idx]).mean())
    return fpc.loss(losses)


def unconverged_penalty(deq, sols, num_samples: int = 1):
    """``jacobian_penalty`` restricted to the rows of J_f at the outputs that missed the
    training solver's tolerance (``deepeq.unconverged_mask``) in ``deq``'s solves ``sols``,
    averaged over the solves that have any; None when every output met it."""
    terms = []
    for s in sols:
        if s.fz is None:
            continue
        mask = unconverged_mask(s, deq.solver.rtol, deq.solver.atol, causal=deq.causal)
        if mask is not None:
            terms.append(jacobian_penalty(s.fz, s.z_leaf, num_samples=num_samples, mask=mask))
    return sum(terms) / len(terms) if terms else None


def train_step(
    cfg: TrainConfig, model, net, task, opt, batch, state, *, step: int, jac_weight: float,
    cache_keys=None, world: int = 1,
) -> tuple[StepResult, object]:  # fmt: skip
    """Forward, loss, guard, backward and update for one batch ``(x, y, fresh)``; returns the
    result and the model memory to carry to the next step. ``net`` is ``model`` or its DDP
    wrapper; ``jac_weight`` the Jacobian penalty's weight at this step (0: none)."""
    x, y, fresh = batch
    task_loss, state, sols = task.loss(net, x, y, None if fresh else state, cache_keys)
    loss, fpc, pen, pen_u = _regularised_loss(cfg, model, task_loss, sols, y, jac_weight)
    monitor = _monitor(cfg, sols, step)  # before backward, which frees the tracked graph
    skipped, grad_norm = _update(cfg, model, opt, loss, sols, world)
    result = StepResult(
        loss=loss.item(),
        task_loss=task_loss.item(),
        jac_penalty=None if pen is None else pen.item(),
        jac_unconverged=None if pen_u is None else pen_u.item(),
        fpc_loss=None if fpc is None else fpc.item(),
        grad_norm=grad_norm,
        skipped=skipped,
        solutions=list(sols),
        monitor=monitor,
    )
    return result, state


def _regularised_loss(cfg: TrainConfig, model, task_loss, sols, targets, jac_weight: float):
    """``(loss, correction, penalty, unconverged penalty)``: the task loss plus fixed-point
    correction and the Jacobian penalties that are on (each term None when off)."""
    loss = task_loss
    fpc = correction_loss(model, sols, targets)
    if fpc is not None:
        loss = loss + fpc
    pen = None
    if jac_weight > 0 and sols:
        pen = sum(
            jacobian_penalty(s.fz, s.z_leaf, num_samples=cfg.jac.num_samples) for s in sols
        ) / len(sols)
        loss = loss + jac_weight * pen
    pen_u = None
    if cfg.jac.unconverged_weight > 0 and sols:
        pen_u = unconverged_penalty(equilibrium_layer(model), sols, cfg.jac.num_samples)
        if pen_u is not None:
            loss = loss + cfg.jac.unconverged_weight * pen_u
    return loss, fpc, pen, pen_u


def _monitor(cfg: TrainConfig, sols, step: int) -> dict:
    """Every ``jac.monitor_every`` steps: the ‖J‖_F estimate and spectral radius at the first
    solve's equilibrium (empty otherwise)."""
    every = cfg.jac.monitor_every
    if not (every and (step + 1) % every == 0 and sols and sols[0].fz is not None):
        return {}
    s0 = sols[0]
    return {
        "jac_fro": math.sqrt(jacobian_penalty(s0.fz, s0.z_leaf, num_samples=2).item()),
        "spectral_radius": spectral_radius(s0.fz, s0.z_leaf, num_iters=10).mean().item(),
    }


def _update(
    cfg: TrainConfig, model, opt, loss, sols, world: int
) -> tuple[Skip | None, float | None]:
    """The non-finite guard, backward, clipping and the optimiser step: ``(why the update was
    skipped or None, the gradient norm or None)``."""
    bad = not torch.isfinite(loss).item() or any(s.status is Status.NONFINITE for s in sols)
    if world > 1:  # every rank must skip together, or the gradient all-reduce would hang
        flag = torch.tensor(float(bad), device=cfg.device)
        torch.distributed.all_reduce(flag)
        bad = bool(flag.item() > 0)
    if bad:
        return Skip.NONFINITE, None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip = cfg.optim.clip if cfg.optim.clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    # A finite loss can still have an inf/NaN gradient (e.g. a backward solve or an
    # overflow in f's backward); the all-reduced gradient is the same on every rank.
    if not math.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        return Skip.NONFINITE_GRADIENT, grad_norm
    opt.step()
    return None, grad_norm
