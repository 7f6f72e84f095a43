"""``train(cfg)``: the training loop (importable; the CLI only parses and calls it)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from ..models import create_model
from ..regularization import JacobianSchedule, jacobian_penalty, spectral_radius
from . import checkpoint as _ck
from ._denormal import set_flush_denormal
from .config import TrainConfig, dump_config
from .convergence import convergence_summary
from .tasks import Task, make_task

logger = logging.getLogger("deepeq")

BASE_FIELDS = [
    "step", "loss", "task_loss", "jac_penalty", "fpc_loss", "lr", "grad_norm", "fwd_nfe", "bwd_nfe",
    "fwd_res_max", "fwd_res_mean", "fwd_converged", "bwd_res_max", "bwd_converged", "bwd_fallbacks",
    "cache_hits", "skipped",
]  # fmt: skip
MONITOR_FIELDS = ["jac_fro", "spectral_radius"]


def fields(task: Task) -> list[str]:
    """The metrics.csv columns of a task's runs."""
    return [*BASE_FIELDS, task.throughput, *task.eval_fields, *MONITOR_FIELDS]


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


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class LossGuard:
    """Warns once when the training loss explodes: the mean task loss of the last ``window``
    steps above ``ratio`` times the run's first loss (before any update; ``ratio = 0``: off).
    Its state survives a resume (it is saved in the checkpoint)."""

    def __init__(self, ratio: float, window: int = 10, start: float | None = None):
        self.ratio, self.window, self.start = ratio, window, start
        self.recent: list[float] = []
        self.exploded_at: int | None = None

    def update(self, step: int, loss: float) -> str | None:
        """Record the step's loss; returns the warning the first time the loss has exploded."""
        if not self.ratio or not math.isfinite(loss):
            return None
        if self.start is None:
            self.start = loss
            return None
        self.recent = [*self.recent, loss][-self.window :]
        now = sum(self.recent) / len(self.recent)
        if (
            self.exploded_at is None
            and len(self.recent) == self.window
            and now > self.ratio * abs(self.start)
        ):
            self.exploded_at = step
            return (
                f"step {step}: the training loss exploded: mean {now:.4g} over the last "
                f"{self.window} steps against {self.start:.4g} at the first step "
                f"(> max_loss_ratio = {self.ratio:g}x). The run goes on, but its result is "
                f"probably useless: lower optim.lr, enable optim.clip, or add Jacobian "
                f"regularisation (jac.weight); max_loss_ratio = 0 silences this check."
            )
        return None


def evaluate(model, task: Task, splits: tuple[str, ...] | None = None) -> dict:
    """The task's evaluation metrics (default: its final splits, e.g. valid and test)."""
    return task.evaluate(model, splits or task.final_splits)


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, until_step: int | None = None
) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the final metrics.

    The run directory ``cfg.out_dir`` receives ``config.toml`` (resolved), ``git.txt``,
    ``metrics.csv`` (one row per step; test metrics every ``eval_every``), TensorBoard events,
    and ``checkpoints/latest.pt`` / ``best.pt`` (atomic writes). ``resume=True`` continues from
    ``latest.pt``; on CPU the continued run is bit-identical to an uninterrupted one.
    ``until_step`` stops (with a checkpoint) once that step is reached, for time-boxed runs;
    ``--resume`` later continues the same schedule.

    With ``cfg.flush_denormal`` (default) subnormal floats are flushed to zero for the duration
    of the call, on the calling thread and on torch's intra-op worker threads
    (``deepeq.train._denormal.set_flush_denormal``; reset to torch's default, off, on return).
    """
    if cfg.threads:  # before the flush, which sets every thread of the pool
        torch.set_num_threads(cfg.threads)
    with flush_denormal(cfg.flush_denormal):
        return _train(cfg, resume=resume, progress=progress, until_step=until_step)


@contextlib.contextmanager
def flush_denormal(on: bool):
    """Subnormal floats computed as zero inside the block when ``on`` (and the CPU supports it),
    then torch's default (off) again."""
    flush = on and set_flush_denormal(True)  # False where unsupported
    try:
        yield
    finally:
        if flush:
            set_flush_denormal(False)


def _train(cfg: TrainConfig, *, resume: bool, progress: bool, until_step: int | None) -> dict:
    out = Path(cfg.out_dir)
    ckdir = out / "checkpoints"
    rank, world, created = _setup_distributed(cfg)
    main = rank == 0  # only rank 0 writes logs and checkpoints
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})."
        )
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    model = create_model(cfg.model.name, **task.model_kwargs(), **cfg.model.overrides).to(
        cfg.device
    )
    net = model
    cols = fields(task)
    cache = _make_cache(cfg, model, rank)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(cfg.device).index or 0] if cfg.device.startswith("cuda") else None
        net = DistributedDataParallel(model, device_ids=ids)
    opt = make_optimizer(cfg, model.parameters())
    j = cfg.jac
    jac = JacobianSchedule(
        weight=j.weight,
        final_weight=j.final_weight,
        ramp_start=j.ramp_start,
        ramp_end=j.ramp_end,
        probability=j.probability,
        seed=cfg.seed,
    )
    pretrain_steps = getattr(getattr(model, "config", None), "pretrain_steps", 0)
    step, best, skipped_in_row, skipped_total, state = 0, math.inf, 0, 0, None
    guard = LossGuard(cfg.max_loss_ratio)
    latest = ckdir / "latest.pt"
    if resume:
        if not latest.exists():
            raise FileNotFoundError(
                f"--resume: no checkpoint at {latest}; start the run without --resume."
            )
        ck = _ck.load(
            latest, required=("model", "optimizer", "step", "best", "rng", "skipped_total")
        )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best = ck["step"], ck["best"]
        skipped_in_row, skipped_total = ck["skipped_in_row"], ck["skipped_total"]
        torch.set_rng_state(ck["rng"])
        state = _to(ck.get("state"), cfg.device)
        guard = LossGuard(cfg.max_loss_ratio, start=ck.get("loss_start"))
        guard.recent, guard.exploded_at = (
            list(ck.get("loss_recent", [])),
            ck.get("loss_exploded_at"),
        )
        logger.info("resumed %s at step %d", out, step)
    elif (out / "metrics.csv").exists():
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another out_dir."
        )
    if world > 1:
        torch.distributed.barrier()  # every rank checked the directory before rank 0 writes
    writer, bar = None, None
    if main:
        ckdir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.toml")
        (out / "git.txt").write_text(git_commit() + "\n")
        _truncate_rows(out / "metrics.csv", upto=step, cols=cols)
        writer = _tensorboard(out)
        bar = _progress(cfg.steps, step, progress)
    t_last, metrics = time.perf_counter(), {}
    stop = cfg.steps if until_step is None else min(cfg.steps, until_step)
    while step < stop:
        if hasattr(model, "set_pretraining"):
            model.set_pretraining(step < pretrain_steps)
        for group in opt.param_groups:  # the schedule is a pure function of the step: exact resume
            group["lr"] = cfg.optim.lr * lr_factor(cfg, step)
        xb, yb, fresh = task.train_batch(step, rank, world)  # this process's share
        xb, yb = xb.to(cfg.device), yb.to(cfg.device)
        keys, hits0 = None, 0
        if cache is not None:
            keys, hits0 = task.batch_keys(step, rank, world), cache.hits
        task_loss, state, sols = task.loss(net, xb, yb, None if fresh else state, keys)
        loss = task_loss
        fpc = correction_loss(model, sols, yb)
        if fpc is not None:
            loss = loss + fpc
        w = jac(step)
        pen = None
        if max(j.weight, j.final_weight or 0.0) > 0 and sols and sols[0].fz is None:
            # checked on the first step, not only on the (random, scheduled) regularised ones
            raise ValueError(
                f"jac.weight = {j.weight:g} needs f(z*) tracked at the equilibrium, which only the "
                f"implicit backward records; this model's backward does not (e.g. "
                f"model.overrides.backward = 'phantom' or 'reversible'). Set model.overrides.backward = "
                f"'implicit' or jac.weight = 0."
            )
        if w > 0 and sols:
            pen = sum(
                jacobian_penalty(s.fz, s.z_leaf, num_samples=j.num_samples) for s in sols
            ) / len(sols)
            loss = loss + w * pen
        row = {"step": step + 1}
        if cache is not None:
            row["cache_hits"] = (cache.hits - hits0) / max(1, keys.numel() * max(1, len(sols)))
        monitor = (
            j.monitor_every
            and (step + 1) % j.monitor_every == 0
            and sols
            and sols[0].fz is not None
        )
        if monitor:  # before backward, which frees the tracked graph
            s0 = sols[0]
            row["jac_fro"] = math.sqrt(jacobian_penalty(s0.fz, s0.z_leaf, num_samples=2).item())
            row["spectral_radius"] = spectral_radius(s0.fz, s0.z_leaf, num_iters=10).mean().item()
        bad = not torch.isfinite(loss).item() or any(s.status.name == "NONFINITE" for s in sols)
        if world > 1:  # every rank must skip together, or the gradient all-reduce would hang
            flag = torch.tensor(float(bad), device=cfg.device)
            torch.distributed.all_reduce(flag)
            bad = bool(flag.item() > 0)
        reason = "non-finite loss or solve" if bad else ""
        if not bad:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.optim.clip if cfg.optim.clip > 0 else float("inf")
            )
            row["grad_norm"] = gn.item()
            # A finite loss can still have an inf/NaN gradient (e.g. a backward solve or an
            # overflow in f's backward); the all-reduced gradient is the same on every rank.
            if math.isfinite(row["grad_norm"]):
                opt.step()
            else:
                opt.zero_grad(set_to_none=True)
                bad, reason = True, "non-finite gradient (finite loss)"
        if bad:
            skipped_in_row += 1
            skipped_total += 1
            logger.warning(
                "step %d: %s; step skipped (%d in a row)", step + 1, reason, skipped_in_row
            )
        else:
            skipped_in_row = 0
        step += 1
        now = time.perf_counter()
        row.update(
            loss=loss.item(), task_loss=task_loss.item(), jac_penalty=None if pen is None else pen.item(),
            fpc_loss=None if fpc is None else fpc.item(),
            lr=opt.param_groups[0]["lr"], skipped=skipped_total,
        )  # fmt: skip
        n_items = xb.numel() if task.throughput == "tokens_per_s" else xb.shape[0]
        row[task.throughput] = n_items * world / max(now - t_last, 1e-9)
        t_last = now
        if sols:
            row.update(
                fwd_nfe=sum(s.stats.nfe for s in sols),
                fwd_res_max=max(s.stats.rel_residual.max().item() for s in sols),
                fwd_res_mean=sum(s.stats.rel_residual.mean().item() for s in sols) / len(sols),
                fwd_converged=sum(s.stats.converged.float().mean().item() for s in sols)
                / len(sols),
            )
            if not bad and sols[0].backward is not None and sols[0].backward.calls:
                b = [s.backward for s in sols]
                row.update(
                    bwd_nfe=sum(x.nfe for x in b),
                    bwd_fallbacks=sum(int(x.fallback.sum()) for x in b),
                )
                if all(x.rel_residual is not None for x in b):  # None: no backward iterations
                    row.update(
                        bwd_res_max=max(x.rel_residual.max().item() for x in b),
                        bwd_converged=sum(x.converged.float().mean().item() for x in b) / len(b),
                    )
        if math.isfinite(row["task_loss"]):
            warning = guard.update(step, row["task_loss"])
            if warning and main:
                logger.warning(warning)
        if skipped_in_row >= cfg.max_nonfinite:
            if main:
                _append_row(out / "metrics.csv", row, cols)  # the stop step's row is kept
            raise FloatingPointError(
                f"{skipped_in_row} consecutive steps were skipped (last at step {step}: {reason});"
                f" stopping. Lower optim.lr, enable optim.clip, add Jacobian regularisation "
                f"(jac.weight) or weight norm; then {_ck.describe_latest(latest)}."
            )
        if not main:
            continue
        if step % cfg.eval_every == 0 or step == cfg.steps:
            splits = task.final_splits if step == cfg.steps else task.periodic_splits
            row.update({k: v for k, v in task.evaluate(model, splits).items() if k in cols})
            if row[task.select] < best:
                best = row[task.select]
                _check_parameters(model, step, latest)
                _ck.save(
                    {"model": model.state_dict(), "step": step, task.select: best},
                    ckdir / "best.pt",
                )
        _append_row(out / "metrics.csv", row, cols)
        if writer is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    writer.add_scalar(k, v, step)
        if step % cfg.ckpt_every == 0 or step == stop:
            _check_parameters(model, step, latest)
            _ck.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "best": best,
                 "skipped_in_row": skipped_in_row, "skipped_total": skipped_total,
                 "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg),
                 "state": _to(state, "cpu"), "loss_start": guard.start, "loss_recent": guard.recent,
                 "loss_exploded_at": guard.exploded_at},
                latest,
            )  # fmt: skip
        if bar is not None:
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(
                    {
                        k: f"{row[k]:.3g}"
                        for k in ("loss", "fwd_nfe", "bwd_nfe", "fwd_res_max", task.throughput)
                        if row.get(k) is not None
                    }
                )
        metrics = row
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        torch.distributed.barrier()
        if created:
            torch.distributed.destroy_process_group()
    import json

    if not metrics and (out / "final.json").exists():
        # resumed a run that had already finished: nothing ran, keep its record (whose peak
        # memory is the training process's, not this one's)
        if main:
            logger.info("%s was already complete at step %d; final.json kept", out, step)
        return json.loads((out / "final.json").read_text())
    final = {k: v for k, v in metrics.items() if v is not None}
    final[f"best_{task.select}"] = best
    if guard.exploded_at is not None:
        final["loss_exploded_at"] = guard.exploded_at
    final["parameters"] = sum(p.numel() for p in model.parameters())
    final.update(_peak_memory(cfg.device))
    if main:
        with (out / "metrics.csv").open() as fh:
            final.update(convergence_summary(list(csv.DictReader(fh)), task.steps_per_epoch))
        (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
    return final


def _make_cache(cfg: TrainConfig, model, rank: int):
    """The run's fixed-point cache (``cfg.fp_cache``), attached to the model's DEQ; None if off."""
    if not cfg.fp_cache:
        return None
    from ..nn.cache import FixedPointCache

    if not hasattr(model, "deq"):
        raise ValueError(
            f"fp_cache = true needs an equilibrium model; {cfg.model.name} has no DEQ core. Use a "
            f"deq_* or mdeq_* model, or fp_cache = false."
        )
    path = None
    if cfg.fp_cache_path:
        path = cfg.fp_cache_path + (f".rank{rank}" if rank else "")
    cache = FixedPointCache(cfg.fp_cache_mib * 2**20, dtype=cfg.fp_cache_dtype, path=path)
    model.deq.cache = cache
    return cache


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
    fpc = model.deq.correction
    losses = []
    for z in states:
        idx = None if isinstance(z, tuple) else fpc.sample(z.shape[1])
        if idx is None:
            losses.append(model.head_loss(z, targets).mean())
        else:  # a random subset of the positions (dim 1), fresh for each iterate
            idx = idx.to(z.device)
            losses.append(model.head_loss(z[:, idx], targets[:, idx]).mean())
    return fpc.loss(losses)


def _check_parameters(model: torch.nn.Module, step: int, latest: Path) -> None:
    """Never checkpoint inf/nan weights: raise instead, naming the last good checkpoint."""
    bad = _ck.parameters_finite(model)
    if bad:
        raise FloatingPointError(
            f"step {step}: {len(bad)} parameter tensors hold inf/nan (first: {bad[:4]}); this "
            f"state is not checkpointed. Lower optim.lr or enable optim.clip; then "
            f"{_ck.describe_latest(latest)}."
        )


def _to(state: Any, device: str) -> Any:
    """Move a model memory (tensor, tuple/list of tensors or None) to ``device``."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, list | tuple):
        return type(state)(_to(s, device) for s in state)
    return state


def _peak_memory(device: str) -> dict:
    """Peak resident memory of this process (MiB) and, on CUDA, the allocator's peak."""
    out = {}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mib"] = rss / (2**20 if sys.platform == "darwin" else 2**10)
    except ImportError:  # pragma: no cover - Windows
        pass
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group). Under ``torchrun``
    (WORLD_SIZE > 1) the group is initialised with gloo on CPU and NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _truncate_rows(path: Path, upto: int, cols: list[str]) -> None:
    """Drop logged rows after the checkpoint's step (a crash after the last checkpoint
    leaves rows that the resumed run will write again)."""
    if not path.exists():
        return
    with path.open() as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= upto]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows)


def _append_row(path: Path, row: dict, cols: list[str]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is in the train extra
        logger.info("tensorboard not installed: metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(out / "tb"))


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | None = None):
    """(cfg, model with the checkpoint's weights, task) of a run directory.

    ``device`` defaults to the run's own device, or the CPU when that is a GPU this machine lacks
    (a run trained on a GPU can be evaluated and analysed on a CPU)."""
    from .config import load_config

    run = Path(run_dir)
    if not (run / "config.toml").exists():
        raise FileNotFoundError(
            f"{run} is not a run directory (no config.toml); train one with `deepeq train`."
        )
    cfg = load_config(run / "config.toml")
    if device is None:
        device = (
            cfg.device if not cfg.device.startswith("cuda") or torch.cuda.is_available() else "cpu"
        )
    cfg = dataclasses.replace(cfg, device=device)
    ck_path = run / "checkpoints" / f"{checkpoint}.pt"
    if not ck_path.exists():
        raise FileNotFoundError(f"No checkpoint {ck_path}; train the run first (deepeq train ...).")
    task = make_task(cfg)
    model = create_model(cfg.model.name, **task.model_kwargs(), **cfg.model.overrides).to(device)
    model.load_state_dict(_ck.load(ck_path, map_location=device, required=("model",))["model"])
    return cfg, model, task
