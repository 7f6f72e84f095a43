"""Metrics of a run: the ``metrics.csv`` columns, the solver statistics of a step's solutions
(shared with the benchmarks and analysis), and the CSV / TensorBoard / progress-bar writers."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from .._solution import Solution
from .tasks import Task

logger = logging.getLogger("deepeq")

BASE_FIELDS = [
    "step", "loss", "task_loss", "jac_penalty", "jac_unconverged", "fpc_loss", "lr", "grad_norm",
    "fwd_nfe", "bwd_nfe", "fwd_res_max", "fwd_res_mean", "fwd_converged", "bwd_res_max", "bwd_converged", "bwd_fallbacks",
    "cache_hits", "skipped",
]  # fmt: skip
MONITOR_FIELDS = ["jac_fro", "spectral_radius"]


def fields(task: Task) -> list[str]:
    """The metrics.csv columns of a task's runs."""
    return [*BASE_FIELDS, task.throughput.column, *task.eval_fields, *MONITOR_FIELDS]


def solution_metrics(sols: list[Solution], backward_ran: bool = True) -> dict:
    """Forward statistics of a step's solves (NFE summed over subsequence chunks; residuals:
    max / mean over samples; the share of samples that met the tolerance) and, when the
    backward pass ran, the backward ones. Empty for an explicit model (no solves)."""
    if not sols:
        return {}
    out = {
        "fwd_nfe": sum(s.stats.nfe for s in sols),
        "fwd_res_max": max(s.stats.rel_residual.max().item() for s in sols),
        "fwd_res_mean": sum(s.stats.rel_residual.mean().item() for s in sols) / len(sols),
        "fwd_converged": sum(s.stats.converged.float().mean().item() for s in sols) / len(sols),
    }
    b = [s.backward for s in sols]
    if backward_ran and b[0] is not None and b[0].calls:
        out["bwd_nfe"] = sum(x.nfe for x in b)
        out["bwd_fallbacks"] = sum(int(x.fallback.sum()) for x in b)
        if all(x.rel_residual is not None for x in b):  # None: no backward iterations
            out["bwd_res_max"] = max(x.rel_residual.max().item() for x in b)
            out["bwd_converged"] = sum(x.converged.float().mean().item() for x in b) / len(b)
    return out


def truncate_rows(path: Path, upto: int, cols: list[str]) -> None:
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


def append_row(path: Path, row: dict, cols: list[str]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def read_rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


class RunLog:
    """Where a step's row goes: ``metrics.csv``, TensorBoard (when installed) and the tqdm bar
    (when enabled). Only rank 0 keeps one."""

    def __init__(self, out: Path, cols: list[str], total: int, start: int, progress: bool):
        self.path, self.cols = out / "metrics.csv", cols
        truncate_rows(self.path, upto=start, cols=cols)
        self.writer = _tensorboard(out)
        self.bar = _progress(total, start, progress)

    def write(self, row: dict, step: int, log_every: int, throughput: str) -> None:
        append_row(self.path, row, self.cols)
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(1)
            if step % log_every == 0:
                keys = ("loss", "fwd_nfe", "bwd_nfe", "fwd_res_max", throughput)
                self.bar.set_postfix({k: f"{row[k]:.3g}" for k in keys if row.get(k) is not None})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


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
