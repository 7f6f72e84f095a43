"""``train(cfg)``: the training loop (importable; the CLI only parses and calls it).

The loop orchestrates; each concern lives in its own module: ``step`` (loss, penalty,
non-finite guard, backward, update -> ``StepResult``), ``metrics`` (solver statistics and the
run's logs), ``checkpoint`` (save, resume, load a run), ``optim`` (optimiser and schedule)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import create_model
from ..models._protocol import EquilibriumModel
from ..regularization import JacobianSchedule
from . import checkpoint as _ck
from ._denormal import set_flush_denormal
from .checkpoint import RunState
from .config import TrainConfig, dump_config
from .convergence import convergence_summary
from .guard import LossGuard
from .metrics import RunLog, append_row, fields, read_rows, solution_metrics
from .optim import lr_factor, make_optimizer
from .step import StepResult, train_step
from .tasks import Task, make_task

logger = logging.getLogger("deepeq")


def evaluate(model, task: Task, splits: tuple[str, ...] | None = None) -> dict:
    """The task's evaluation metrics (default: its final splits, e.g. valid and test)."""
    return task.evaluate(model, splits)


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, until_step: int | None = None
) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the final metrics.

    The run directory ``cfg.out_dir`` receives ``config.toml`` (resolved), ``git.txt``,
    ``metrics.csv`` (one row per step; test metrics every ``eval_every``), TensorBoard events,
    and ``checkpoints/latest.pt`` / ``best.pt`` (atomic writes). ``resume=True`` continues from
    ``latest.pt``; on CPU the continued run is bit-identical to an uninterrupted one.
    ``until_step`` stops (with a checkpoint) once that step is reached, for time-boxed runs;
    ``--resume`` later continues the same schedule. A directory without ``latest.pt`` (a run
    that stopped before its first checkpoint) starts again from step 0 under ``resume=True``.

    A checkpoint is written as ``*.pt.tmp`` and replaces ``latest.pt`` / ``best.pt`` once the
    next step, taken at its weights, was applied (the run's last one at once): a state the
    non-finite guard rejects never overwrites the last good checkpoint. A failed write under
    ``out_dir`` (disk full, read-only) raises ``checkpoint.WriteError`` naming the file.

    With ``cfg.flush_denormal`` (default) subnormal floats are flushed to zero for the duration
    of the call, on the calling thread and on torch's intra-op worker threads
    (``deepeq.train._denormal.set_flush_denormal``; reset to torch's default, off, on return).
    """
    if cfg.threads:  # before the flush, which sets every thread of the pool
        torch.set_num_threads(cfg.threads)
    try:
        # a write under out_dir that fails (disk full, read-only): one WriteError naming the file
        with flush_denormal(cfg.flush_denormal), _ck.writes_to(Path(cfg.out_dir)):
            return _train(cfg, resume=resume, progress=progress, until_step=until_step)
    except BaseException:
        if int(os.environ.get("RANK", "0") or 0) == 0:  # the process that writes checkpoints
            _ck.remove_stale(Path(cfg.out_dir) / "checkpoints")  # no *.pt.tmp left behind
        raise


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


#: where a run directory keeps its resumable checkpoint and its best weights
LATEST, BEST = Path("checkpoints/latest.pt"), Path("checkpoints/best.pt")


@dataclass
class _Run:
    """What the steps of one training run share (``_setup`` builds it)."""

    cfg: TrainConfig
    task: Task
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    jac: JacobianSchedule
    cache: Any  # the fixed-point cache (cfg.fp_cache), or None
    state: RunState
    guard: LossGuard
    rank: int
    world: int
    created: bool  # this process created the process group (and destroys it)
    stop: int  # the step this call trains up to (cfg.steps, or until_step)
    pretrain_steps: int | None  # shallow pretraining's steps; None: not an equilibrium model
    cols: list[str] = field(default_factory=list)  # the metrics.csv columns
    log: RunLog | None = None  # rank 0 only
    t_last: float = 0.0  # when the previous step ended (throughput)

    @property
    def main(self) -> bool:  # only rank 0 writes logs and checkpoints
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)


def _train(cfg: TrainConfig, *, resume: bool, progress: bool, until_step: int | None) -> dict:
    r = _setup(cfg, resume=resume, progress=progress, until_step=until_step)
    row: dict = {}
    while r.state.step < r.stop:
        result, row = _take_step(r)
        _stop_if_stuck(r, result, row)
        if r.main:
            _evaluate(r, row)
            r.log.write(row, r.state.step, cfg.log_every, r.task.throughput.column)
            _checkpoint(r)
    _close(r)
    return _finish(cfg, r.task, r.model, r.state, row, r.main)


def _setup(cfg: TrainConfig, *, resume: bool, progress: bool, until_step: int | None) -> _Run:
    """Processes, data, model, optimiser and the state to start from (``latest.pt`` with
    ``resume``); rank 0 also prepares the run directory and its logs."""
    rank, world, created = _setup_distributed(cfg)
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})."
        )
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    model = create_model(cfg.model.name, **task.model_kwargs(), **cfg.model.overrides)
    model = model.to(cfg.device)
    if rank == 0:
        task.report(model)  # data and model sizes; a vocabulary that dominates the model
    net = _distributed(model, cfg) if world > 1 else model
    cache = _make_cache(cfg, model, rank)
    opt = make_optimizer(cfg, model.parameters())
    jac = _jacobian_schedule(cfg)
    out = Path(cfg.out_dir)
    state = _start(out, out / LATEST, resume, model, opt, cfg.device)
    if world > 1:
        torch.distributed.barrier()  # every rank checked the directory before rank 0 writes
    pretrain = None  # shallow pretraining: equilibrium models only
    if isinstance(model, EquilibriumModel):
        pretrain = getattr(model.config, "pretrain_steps", 0)
    stop = cfg.steps if until_step is None else min(cfg.steps, until_step)
    r = _Run(
        cfg=cfg, task=task, model=model, net=net, opt=opt, jac=jac, cache=cache, state=state,
        guard=LossGuard(cfg.max_loss_ratio, state.guard), rank=rank, world=world,
        created=created, stop=stop, pretrain_steps=pretrain, cols=fields(task),
    )  # fmt: skip
    if r.main:
        r.log = _open_run_directory(r, progress)
    r.t_last = time.perf_counter()
    return r


def _jacobian_schedule(cfg: TrainConfig) -> JacobianSchedule:
    j = cfg.jac
    return JacobianSchedule(weight=j.weight, final_weight=j.final_weight, ramp_start=j.ramp_start,
                            ramp_end=j.ramp_end, probability=j.probability, seed=cfg.seed)  # fmt: skip


def _open_run_directory(r: _Run, progress: bool) -> RunLog:
    """Rank 0: the checkpoint directory without stale files, ``config.toml``, ``git.txt``, and
    the run's log (``metrics.csv`` cut back to the step the run starts from)."""
    ckdir = r.out / LATEST.parent
    ckdir.mkdir(parents=True, exist_ok=True)
    for p in _ck.remove_stale(ckdir):
        logger.info("removed %s (a checkpoint an interrupted run left unfinished)", p)
    dump_config(r.cfg, r.out / "config.toml")
    (r.out / "git.txt").write_text(git_commit() + "\n")
    return RunLog(r.out, r.cols, r.cfg.steps, r.state.step, progress)


def _take_step(r: _Run) -> tuple[StepResult, dict]:
    """One training step at the schedule's learning rate; returns its result and its
    ``metrics.csv`` row (before evaluation metrics). Commits the checkpoints left pending once
    a step taken at their weights was applied; updates the run guards."""
    cfg, run, step = r.cfg, r.state, r.state.step
    if r.pretrain_steps is not None:
        r.model.set_pretraining(step < r.pretrain_steps)
    for group in r.opt.param_groups:  # the schedule is a pure function of the step: exact resume
        group["lr"] = cfg.optim.lr * lr_factor(cfg, step)
    x, y, fresh = r.task.train_batch(step, r.rank, r.world)  # this process's share
    batch = (x.to(cfg.device), y.to(cfg.device), fresh)
    keys = r.task.batch_keys(step, r.rank, r.world) if r.cache is not None else None
    hits0 = r.cache.hits if r.cache is not None else 0
    result, run.memory = train_step(cfg, r.model, r.net, r.task, r.opt, batch, run.memory,
                                    step=step, jac_weight=r.jac(step), cache_keys=keys,
                                    world=r.world)  # fmt: skip
    run.step += 1
    if r.main and result.applied:  # a step at the checkpointed weights was applied: keep them
        _ck.commit_pending(r.out / BEST)
        _ck.commit_pending(r.out / LATEST)
    run.guard.count(result.applied)
    if not result.applied:
        logger.warning("step %d: %s; step skipped (%d in a row)", run.step, result.skipped,
                       run.guard.skipped_in_row)  # fmt: skip
    now = time.perf_counter()
    row = _row(result, run, r.task, r.opt, batch[0], r.world, now - r.t_last)
    if r.cache is not None:
        lookups = keys.numel() * max(1, len(result.solutions))
        row["cache_hits"] = (r.cache.hits - hits0) / max(1, lookups)
    r.t_last = now
    warning = r.guard.update(run.step, result.task_loss)
    if warning and r.main:
        logger.warning(warning)
    return result, row


def _stop_if_stuck(r: _Run, result: StepResult, row: dict) -> None:
    """After ``max_nonfinite`` skipped steps in a row: log the step's row, keep the last good
    checkpoints (discard the pending ones) and raise, naming the checkpoint to resume from."""
    run = r.state
    if run.guard.skipped_in_row < r.cfg.max_nonfinite:
        return
    latest = r.out / LATEST
    if r.main:
        append_row(r.out / "metrics.csv", row, r.cols)  # the stop step's row is kept
        for p in (r.out / BEST, latest):  # states every later step rejected
            if _ck.discard_pending(p):
                logger.warning("%s keeps its previous state: no step taken at the "
                               "weights since was applied", p)  # fmt: skip
    raise FloatingPointError(
        f"{run.guard.skipped_in_row} consecutive steps were skipped (last at step {run.step}: "
        f"{result.skipped}); stopping. Lower optim.lr, enable optim.clip, add Jacobian "
        f"regularisation (jac.weight) or weight norm; then {_ck.describe_latest(latest)}."
    )


def _evaluate(r: _Run, row: dict) -> None:
    """Every ``eval_every`` steps and at the last: the task's metrics into ``row``, and
    ``best.pt`` when the selection metric improved."""
    cfg, run, task = r.cfg, r.state, r.task
    if run.step % cfg.eval_every != 0 and run.step != cfg.steps:
        return
    splits = task.final_splits if run.step == cfg.steps else task.periodic_splits
    row.update({k: v for k, v in task.evaluate(r.model, splits).items() if k in r.cols})
    if row[task.select] < run.best:
        run.best = row[task.select]
        _ck.save_best(r.out / BEST, r.model, run.step, task.select, run.best, r.out / LATEST,
                      commit=run.step == r.stop)  # fmt: skip


def _checkpoint(r: _Run) -> None:
    """Every ``ckpt_every`` steps and at the stop: ``latest.pt``, pending until the next step,
    taken at these weights, is applied (an exploded state never replaces the last good
    checkpoint); the run's last state is kept at once."""
    run = r.state
    if run.step % r.cfg.ckpt_every == 0 or run.step == r.stop:
        _ck.save_latest(r.out / LATEST, r.model, r.opt, run, dataclasses.asdict(r.cfg),
                        commit=run.step == r.stop)  # fmt: skip


def _close(r: _Run) -> None:
    if r.log is not None:
        r.log.close()
    if r.world > 1:
        torch.distributed.barrier()
        if r.created:
            torch.distributed.destroy_process_group()


def _start(out: Path, latest: Path, resume: bool, model, opt, device: str) -> RunState:
    """The run state to start from: ``latest.pt`` with ``resume``; step 0 for a new directory,
    or, with ``resume``, for one whose run stopped before its first checkpoint."""
    if resume and not latest.exists():
        if (out / "final.json").exists():
            raise FileNotFoundError(
                f"--resume: {out} holds a finished run (final.json) but no {latest}; there is "
                f"nothing to continue. Choose another out_dir for a new run."
            )
        if (out / "metrics.csv").exists():
            logger.warning(
                "--resume: %s holds no checkpoint (%s does not exist: the run stopped before "
                "its first one); starting it again from step 0 (its metrics.csv is rewritten, "
                "a best.pt of the stopped attempt is replaced at the first evaluation).",
                out, latest,
            )  # fmt: skip
        return RunState()
    if resume:
        run = _ck.resume(latest, model, opt, device)
        logger.info("resumed %s at step %d", out, run.step)
        return run
    if (out / "metrics.csv").exists():
        if not latest.exists() and not (out / "final.json").exists():
            raise FileExistsError(
                f"{out} holds a run but no checkpoint ({latest} does not exist: the run stopped "
                f"before its first one); pass --resume to start it again from step 0, or choose "
                f"another out_dir."
            )
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another out_dir."
        )
    return RunState()


def _row(result: StepResult, run: RunState, task: Task, opt, x, world: int, seconds: float) -> dict:
    """The metrics.csv row of a step (before evaluation metrics and cache hits)."""
    row = {"step": run.step, **result.monitor}
    if result.grad_norm is not None:
        row["grad_norm"] = result.grad_norm
    row.update(
        loss=result.loss, task_loss=result.task_loss, jac_penalty=result.jac_penalty,
        jac_unconverged=result.jac_unconverged,
        fpc_loss=result.fpc_loss, lr=opt.param_groups[0]["lr"], skipped=run.guard.skipped_total,
    )  # fmt: skip
    row[task.throughput.column] = task.throughput.items(x) * world / max(seconds, 1e-9)
    row.update(solution_metrics(result.solutions, backward_ran=result.applied))
    return row


def _finish(cfg: TrainConfig, task: Task, model, run: RunState, row: dict, main: bool):
    """The run's final record (``final.json``): the last row, the best metric, parameters, peak
    memory and the convergence summary."""
    out = Path(cfg.out_dir)
    if not row and (out / "final.json").exists():
        # resumed a run that had already finished: nothing ran, keep its record (whose peak
        # memory is the training process's, not this one's)
        if main:
            logger.info("%s was already complete at step %d; final.json kept", out, run.step)
        return json.loads((out / "final.json").read_text())
    final = {k: v for k, v in row.items() if v is not None}
    final[f"best_{task.select}"] = run.best
    if run.guard.loss_exploded_at is not None:
        final["loss_exploded_at"] = run.guard.loss_exploded_at
    final["parameters"] = sum(p.numel() for p in model.parameters())
    final.update(_peak_memory(cfg.device))
    if main:
        final.update(convergence_summary(read_rows(out / "metrics.csv"), task.steps_per_epoch))
        (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
    return final


def _make_cache(cfg: TrainConfig, model, rank: int):
    """The run's fixed-point cache (``cfg.fp_cache``), attached to the model (``fp_cache``, used
    by its training solves); None if off (a config with ``fp_cache`` names an equilibrium
    model: ``TrainConfig`` checks it)."""
    if not cfg.fp_cache:
        return None
    from ..nn.cache import FixedPointCache

    path = None
    if cfg.fp_cache_path:
        path = cfg.fp_cache_path + (f".rank{rank}" if rank else "")
    model.fp_cache = FixedPointCache(cfg.fp_cache_mib * 2**20, dtype=cfg.fp_cache_dtype, path=path)
    return model.fp_cache


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def _distributed(model, cfg: TrainConfig):
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(cfg.device).index or 0] if cfg.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)
