"""The optimiser and the learning-rate schedule of a training config (the schedule is a pure
function of the step, so a resumed run continues it exactly)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "radam":
        return torch.optim.RAdam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(
        f"Unknown optim.name {o.name!r}; expected one of ['adam', 'adamw', 'radam', 'sgd']."
    )


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine (to min_lr_ratio) or constant."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule != "cosine":
        raise ValueError(f"Unknown optim.schedule {o.schedule!r}; expected 'cosine' or 'constant'.")
    t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
