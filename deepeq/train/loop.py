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
from pathlib import Path

import torch

from ..backward import ImplicitBackward
from ..models import create_model
from ..models._protocol import EquilibriumModel, equilibrium_layer
from ..regularization import JacobianSchedule
from . import checkpoint as _ck
from ._denormal import set_flush_denormal
from .checkpoint import RunState
from .config import TrainConfig, dump_config
from .convergence import convergence_summary
from .metrics import RunLog, append_row, fields, read_rows, solution_metrics
from .optim import lr_factor, make_optimizer
from .step import LossGuard, StepResult, train_step
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


def _train(cfg: TrainConfig, *, resume: bool, progress: bool, until_step: int | None) -> dict:
    out = Path(cfg.out_dir)
    ckdir, latest = out / "checkpoints", out / "checkpoints" / "latest.pt"
    rank, world, created = _setup_distributed(cfg)
    main = rank == 0  # only rank 0 writes logs and checkpoints
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world})."
        )
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    model = create_model(cfg.model.name, **task.model_kwargs(), **cfg.model.overrides)
    model = model.to(cfg.device)
    if main:
        task.report(model)  # data and model sizes; a vocabulary that dominates the model
    _check_jacobian(cfg, model)
    net = _distributed(model, cfg) if world > 1 else model
    cache = _make_cache(cfg, model, rank)
    opt = make_optimizer(cfg, model.parameters())
    j = cfg.jac
    jac = JacobianSchedule(weight=j.weight, final_weight=j.final_weight, ramp_start=j.ramp_start,
                           ramp_end=j.ramp_end, probability=j.probability, seed=cfg.seed)  # fmt: skip
    run = _start(out, latest, resume, model, opt, cfg.device)
    guard = LossGuard(cfg.max_loss_ratio, start=run.loss_start, recent=run.loss_recent,
                      exploded_at=run.loss_exploded_at)  # fmt: skip
    if world > 1:
        torch.distributed.barrier()  # every rank checked the directory before rank 0 writes
    cols, log = fields(task), None
    if main:
        ckdir.mkdir(parents=True, exist_ok=True)
        for p in _ck.remove_stale(ckdir):
            logger.info("removed %s (a checkpoint an interrupted run left unfinished)", p)
        dump_config(cfg, out / "config.toml")
        (out / "git.txt").write_text(git_commit() + "\n")
        log = RunLog(out, cols, cfg.steps, run.step, progress)
    pretrain = isinstance(model, EquilibriumModel)  # the shallow-pretraining switch
    pretrain_steps = getattr(model.config, "pretrain_steps", 0) if pretrain else 0
    t_last, row = time.perf_counter(), {}
    stop = cfg.steps if until_step is None else min(cfg.steps, until_step)
    while run.step < stop:
        step = run.step
        if pretrain:
            model.set_pretraining(step < pretrain_steps)
        for group in opt.param_groups:  # the schedule is a pure function of the step: exact resume
            group["lr"] = cfg.optim.lr * lr_factor(cfg, step)
        x, y, fresh = task.train_batch(step, rank, world)  # this process's share
        batch = (x.to(cfg.device), y.to(cfg.device), fresh)
        keys = task.batch_keys(step, rank, world) if cache is not None else None
        hits0 = cache.hits if cache is not None else 0
        result, run.memory = train_step(cfg, model, net, task, opt, batch, run.memory, step=step,
                                        jac_weight=jac(step), cache_keys=keys, world=world)  # fmt: skip
        run.step += 1
        if main and result.applied:  # a step at the checkpointed weights was applied: keep them
            _ck.commit_pending(ckdir / "best.pt")
            _ck.commit_pending(latest)
        run.skipped_in_row = 0 if result.applied else run.skipped_in_row + 1
        run.skipped_total += 0 if result.applied else 1
        if not result.applied:
            logger.warning("step %d: %s; step skipped (%d in a row)", run.step, result.skipped,
                           run.skipped_in_row)  # fmt: skip
        now = time.perf_counter()
        row = _row(result, run, task, opt, batch[0], world, now - t_last)
        if cache is not None:
            lookups = keys.numel() * max(1, len(result.solutions))
            row["cache_hits"] = (cache.hits - hits0) / max(1, lookups)
        t_last = now
        warning = guard.update(run.step, result.task_loss)
        if warning and main:
            logger.warning(warning)
        if run.skipped_in_row >= cfg.max_nonfinite:
            if main:
                append_row(out / "metrics.csv", row, cols)  # the stop step's row is kept
                for p in (ckdir / "best.pt", latest):  # states every later step rejected
                    if _ck.discard_pending(p):
                        logger.warning("%s keeps its previous state: no step taken at the "
                                       "weights since was applied", p)  # fmt: skip
            raise FloatingPointError(
                f"{run.skipped_in_row} consecutive steps were skipped (last at step {run.step}: "
                f"{result.skipped}); stopping. Lower optim.lr, enable optim.clip, add Jacobian "
                f"regularisation (jac.weight) or weight norm; then {_ck.describe_latest(latest)}."
            )
        if not main:
            continue
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            splits = task.final_splits if run.step == cfg.steps else task.periodic_splits
            row.update({k: v for k, v in task.evaluate(model, splits).items() if k in cols})
            if row[task.select] < run.best:
                run.best = row[task.select]
                _ck.save_best(ckdir / "best.pt", model, run.step, task.select, run.best, latest,
                              commit=run.step == stop)  # fmt: skip
        log.write(row, run.step, cfg.log_every, task.throughput)
        if run.step % cfg.ckpt_every == 0 or run.step == stop:
            run.loss_start, run.loss_recent, run.loss_exploded_at = (
                guard.start, guard.recent, guard.exploded_at,
            )  # fmt: skip
            # pending until the next step, taken at these weights, is applied (an exploded state
            # never replaces the last good checkpoint); the run's last state is kept at once
            _ck.save_latest(latest, model, opt, run, dataclasses.asdict(cfg),
                            commit=run.step == stop)  # fmt: skip
    if log is not None:
        log.close()
    if world > 1:
        torch.distributed.barrier()
        if created:
            torch.distributed.destroy_process_group()
    return _finish(cfg, task, model, run, guard, row, main)


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
        fpc_loss=result.fpc_loss, lr=opt.param_groups[0]["lr"], skipped=run.skipped_total,
    )  # fmt: skip
    n_items = x.numel() if task.throughput == "tokens_per_s" else x.shape[0]
    row[task.throughput] = n_items * world / max(seconds, 1e-9)
    row.update(solution_metrics(result.solutions, backward_ran=result.applied))
    return row


def _finish(cfg: TrainConfig, task: Task, model, run: RunState, guard, row: dict, main: bool):
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
    if guard.exploded_at is not None:
        final["loss_exploded_at"] = guard.exploded_at
    final["parameters"] = sum(p.numel() for p in model.parameters())
    final.update(_peak_memory(cfg.device))
    if main:
        final.update(convergence_summary(read_rows(out / "metrics.csv"), task.steps_per_epoch))
        (out / "final.json").write_text(json.dumps(final, indent=1) + "\n")
    return final


def _check_jacobian(cfg: TrainConfig, model) -> None:
    """Jacobian regularisation differentiates f(z*) as tracked by the implicit backward only
    (``load_config`` checks the same on the config; this covers configs built in Python)."""
    j, deq = cfg.jac, equilibrium_layer(model)
    on = max(j.weight, j.final_weight or 0.0, j.unconverged_weight) > 0
    if on and deq is not None and not isinstance(deq.backward_rule, ImplicitBackward):
        raise ValueError(
            f"jac.weight = {j.weight:g} / jac.unconverged_weight = {j.unconverged_weight:g} "
            f"needs f(z*) tracked at the equilibrium, which only "
            f"the implicit backward records; this model's backward is "
            f"{type(deq.backward_rule).__name__}. Set model.overrides.solve.backward = "
            f"'implicit' or both weights to 0."
        )


def _make_cache(cfg: TrainConfig, model, rank: int):
    """The run's fixed-point cache (``cfg.fp_cache``), attached to the model's DEQ; None if off."""
    if not cfg.fp_cache:
        return None
    from ..nn.cache import FixedPointCache

    deq = equilibrium_layer(model)
    if deq is None:
        raise ValueError(
            f"fp_cache = true needs an equilibrium model; {cfg.model.name} has no DEQ core. Use a "
            f"deq_* or mdeq_* model, or fp_cache = false."
        )
    path = None
    if cfg.fp_cache_path:
        path = cfg.fp_cache_path + (f".rank{rank}" if rank else "")
    deq.cache = FixedPointCache(cfg.fp_cache_mib * 2**20, dtype=cfg.fp_cache_dtype, path=path)
    return deq.cache


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
