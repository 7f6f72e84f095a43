"""The optimiser and the learning-rate schedule of a training config (the schedule is a pure
function of the step, so a resumed run continues it exactly)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

#: optim.name -> the optimiser built from the parameters and the config's [optim] table
OPTIMIZERS = {
    "adam": lambda p, o: torch.optim.Adam(p, lr=o.lr, weight_decay=o.weight_decay),
    "adamw": lambda p, o: torch.optim.AdamW(p, lr=o.lr, weight_decay=o.weight_decay),
    "radam": lambda p, o: torch.optim.RAdam(p, lr=o.lr, weight_decay=o.weight_decay),
    "sgd": lambda p, o: torch.optim.SGD(
        p, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    ),
}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optim.name {o.name!r}; expected one of {sorted(OPTIMIZERS)}.")
    return OPTIMIZERS[o.name](params, o)


def _cosine(o, t: float) -> float:
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


#: optim.schedule -> the factor after warm-up at progress t (0 -> 1 over the remaining steps)
SCHEDULES = {"cosine": _cosine, "constant": lambda o, t: 1.0}


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine (to min_lr_ratio) or constant."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule not in SCHEDULES:
        raise ValueError(f"Unknown optim.schedule {o.schedule!r}; expected 'cosine' or 'constant'.")
    t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return SCHEDULES[o.schedule](o, t)
