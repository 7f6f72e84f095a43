"""Checkpoints that load safely: tensors and plain containers only, read with
``torch.load(..., weights_only=True)``, so opening a downloaded run directory never executes code.

A checkpoint is a dict with ``"format": FORMAT``; the run's config is stored as plain data
(``dataclasses.asdict``), never as a pickled class, and the RNG state as a uint8 tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..models._migrate import migrate_state_dict
from .guard import GuardState

FORMAT = "deepeq-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unsafe to load, or not one deepeq wrote."""


class WriteError(CheckpointError):
    """A run directory that cannot be written (disk full, read-only file system, no
    permission); the message names the file and says what is intact."""


def pending(path: Path) -> Path:
    """Where ``save(..., commit=False)`` leaves a checkpoint until ``commit_pending(path)``."""
    return path.with_suffix(path.suffix + ".tmp")


def save(obj: dict, path: Path, *, commit: bool = True) -> None:
    """Write ``obj`` (plus the format tag) atomically: a crash leaves the previous file. With
    ``commit=False`` the new checkpoint stays in ``pending(path)`` until ``commit_pending(path)``
    (or ``discard_pending(path)``). A failed write removes its temporary file and raises
    ``WriteError``."""
    tmp, out = pending(path), _Recorder()
    try:
        with open(tmp, "wb") as fh:
            out.fh = fh
            torch.save({"format": FORMAT, **obj}, out)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and out.error is None and "inline_container" not in str(e):
            raise  # not a failed write (torch's writer says "[enforce fail at inline_container")
        raise write_error(out.error or e, path) from None
    if commit:
        commit_pending(path)


class _Recorder:
    """A file for ``torch.save`` that keeps the first OSError of a write: torch's writer
    reports a failed write (ENOSPC) as ``RuntimeError: [enforce fail ...] unexpected pos``."""

    def __init__(self):
        self.fh, self.error = None, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def commit_pending(path: Path) -> bool:
    """Replace ``path`` by its pending checkpoint, if there is one (atomic)."""
    tmp = pending(path)
    if not tmp.exists():
        return False
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path) from None
    return True


def discard_pending(path: Path) -> bool:
    """Delete the pending checkpoint of ``path`` (if any): ``path`` keeps what it held."""
    tmp = pending(path)
    existed = tmp.exists()
    tmp.unlink(missing_ok=True)
    return existed


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_error(e: BaseException, path: Path) -> WriteError:
    """One message for a failed write of ``path`` (a checkpoint or another file of a run):
    what failed, how much space is left, what is intact and what to do."""
    path, mount = Path(path), _mount(path)
    code = e.errno if isinstance(e, OSError) else None
    if code == errno.ENOSPC:
        what = f"no space left on device (the file system at {mount} has {_free(path)} free)"
    elif isinstance(e, OSError) and e.strerror:
        what = e.strerror[0].lower() + e.strerror[1:]
    else:  # torch's writer: "[enforce fail at inline_container.cc:...] ..."
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = f"the write failed ({first}; the file system at {mount} has {_free(path)} free)"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"Make {path.parent} writable (or choose another out_dir)"
    else:
        fix = f"Free space on the file system at {mount}"
    if path.suffix != ".pt":
        return WriteError(f"{what} while writing {path}. {fix}.")
    step = _readable_step(path)
    intact = (
        f"the previous {path.name} (step {step}) is intact"
        if step is not None
        else f"no earlier readable {path.name} exists"
    )
    return WriteError(f"{what} while writing {path}; {intact}. {fix}, then continue with --resume.")


@contextlib.contextmanager
def writes_to(out: Path):
    """Inside the block, an OSError of a write under ``out`` (disk full, read-only, no
    permission) becomes one ``WriteError``; anything else passes unchanged."""
    try:
        yield
    except OSError as e:
        name = e.filename
        inside = name is not None and Path(os.path.abspath(name)).is_relative_to(
            os.path.abspath(out)
        )
        if e.errno not in WRITE_ERRNOS or not inside:
            raise
        raise write_error(e, Path(name)) from None


def remove_stale(ckdir: Path) -> list[Path]:
    """Delete the temporary files (``*.pt.tmp``) an interrupted run left in ``ckdir``."""
    stale = sorted(ckdir.glob("*.pt.tmp")) if ckdir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _mount(path: Path) -> str:
    p = Path(os.path.abspath(path)).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(_mount(path)).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def load(path: str | Path, map_location: Any = None, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint with ``weights_only=True``. Raises ``CheckpointError`` (one clear
    message) for a missing file, a file that would need arbitrary unpickling (an old deepeq
    checkpoint, which pickled its config, or a foreign one), or one without ``required`` keys."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}.")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is not a readable checkpoint (not a file written by torch.save)."
            ) from None
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{path} does not load with torch.load(weights_only=True), so deepeq will not open "
            f"it (unpickling arbitrary objects can execute code). It is not a checkpoint in "
            f"deepeq's current format ({FORMAT}): an older deepeq pickled the run config into "
            f"it, or another program wrote it. If you trust the file, convert it once with "
            f'`python -c "from deepeq.train.checkpoint import convert_trusted; '
            f"convert_trusted('{path}')\"`. ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}).") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(
            f"{path} is not a deepeq checkpoint: expected a dict with format {FORMAT!r}, got "
            f"{got!r}."
        )
    missing = [k for k in required if k not in ck]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not a training checkpoint.")
    if "model" in ck:  # weights saved by an older model layout (deq.f.* copies of f.*)
        ck["model"] = migrate_state_dict(ck["model"])
    return ck


def convert_trusted(path: str | Path) -> Path:
    """Rewrite a checkpoint written by an older deepeq (pickled config) in the current format,
    in place. Only for files you trust: it loads them with ``weights_only=False``."""
    path = Path(path)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} holds a {type(ck).__name__}, not a checkpoint dict.")
    ck.pop("format", None)
    cfg = ck.get("config")
    if dataclasses.is_dataclass(cfg):
        ck["config"] = dataclasses.asdict(cfg)
    save(ck, path)
    load(path)  # fails loudly if anything unsafe remains
    return path


def parameters_finite(model: torch.nn.Module) -> list[str]:
    """Names of the model's parameters and buffers that hold inf/nan (empty: all finite)."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    bad += [
        n
        for n, b in model.named_buffers()
        if b.is_floating_point() and not bool(torch.isfinite(b).all())
    ]
    return bad


def describe_latest(path: Path) -> str:
    """'resume from PATH (step N)' for an existing checkpoint, or a sentence saying there is none."""
    if not path.exists():
        return (
            f"no checkpoint was written yet ({path} does not exist): start the run again with "
            f"--resume (a run directory without a checkpoint restarts from step 0)"
        )
    try:
        step = load(path, map_location="cpu").get("step")
    except CheckpointError:
        return f"{path} exists but is not readable: start the run again"
    return f"resume from {path} (step {step}) with --resume"


@dataclasses.dataclass
class RunState:
    """The training loop's position in its schedule: everything ``latest.pt`` restores besides
    the weights and the optimiser (step, best selection metric, the model memory carried to the
    next step, the run guards' record)."""

    step: int = 0
    best: float = math.inf
    memory: Any = None
    guard: GuardState = dataclasses.field(default_factory=GuardState)


TRAINING_KEYS = ("model", "optimizer", "step", "best", "rng")


def save_latest(
    path: Path, model, opt, run: RunState, config: dict, *, commit: bool = True
) -> None:
    """The resumable checkpoint: weights, optimiser, RNG, run state and config (plain data).
    ``commit=False``: left pending (``commit_pending``) until a step at these weights is
    applied."""
    check_finite(model, run.step, path)
    save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": run.step,
         "best": run.best, "guard": run.guard.to_dict(), "rng": torch.get_rng_state(),
         "config": config, "state": _to(run.memory, "cpu")},
        path,
        commit=commit,
    )  # fmt: skip


def save_best(
    path: Path, model, step: int, select: str, value: float, latest: Path, *, commit: bool = True
) -> None:
    """The best weights by the task's selection metric (``commit`` as in ``save_latest``)."""
    check_finite(model, step, latest)
    save({"model": model.state_dict(), "step": step, select: value}, path, commit=commit)


def resume(path: Path, model, opt, device: str) -> RunState:
    """Load ``latest.pt`` into ``model`` and ``opt`` and the RNG; return the run state.

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (the training loop starts such a run
            again from step 0 instead).
        CheckpointError: an unreadable ``latest.pt``; the message names an intact ``best.pt``.
    """
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}.")
    try:
        ck = load(path, required=TRAINING_KEYS)
    except CheckpointError as e:
        run, best = path.parent.parent, path.with_name("best.pt")
        step = _readable_step(best)
        if step is None:
            raise CheckpointError(
                f"{e} The run cannot be resumed and it has no other readable checkpoint; start "
                f"a new run with another --out_dir (without --resume)."
            ) from None
        raise CheckpointError(
            f"{e} The run cannot be resumed from it. {best} (step {step}) is intact: evaluate it "
            f"with `deepeq eval {run} --checkpoint best`; it holds the weights only (no optimiser "
            f"or schedule state), so to train again start a new run with another --out_dir "
            f"(without --resume)."
        ) from None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    return RunState(
        step=ck["step"],
        best=ck["best"],
        memory=_to(ck.get("state"), device),
        guard=GuardState.from_checkpoint(ck),  # older checkpoints: its fields at top level
    )


def check_finite(model: torch.nn.Module, step: int, latest: Path) -> None:
    """Never checkpoint inf/nan weights: raise instead, naming the last good checkpoint."""
    bad = parameters_finite(model)
    if bad:
        raise FloatingPointError(
            f"step {step}: {len(bad)} parameter tensors hold inf/nan (first: {bad[:4]}); this "
            f"state is not checkpointed. Lower optim.lr or enable optim.clip; then "
            f"{describe_latest(latest)}."
        )


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | None = None):
    """(cfg, model with the checkpoint's weights, task) of a run directory.

    ``device`` defaults to the run's own device, or the CPU when that is a GPU this machine lacks
    (a run trained on a GPU can be evaluated and analysed on a CPU)."""
    from ..models import create_model
    from .config import load_run_config
    from .tasks import make_task

    run = Path(run_dir)
    cfg = load_run_config(run)
    if device is None:
        device = (
            cfg.device if not cfg.device.startswith("cuda") or torch.cuda.is_available() else "cpu"
        )
    cfg = dataclasses.replace(cfg, device=device)
    ck_path = run / "checkpoints" / f"{checkpoint}.pt"
    if not ck_path.exists():
        raise FileNotFoundError(f"No checkpoint {ck_path}; train the run first (deepeq train ...).")
    try:
        ck = load(ck_path, map_location=device, required=("model",))
    except CheckpointError as e:
        other = "latest" if checkpoint == "best" else "best"
        step = _readable_step(run / "checkpoints" / f"{other}.pt")
        if step is not None:
            raise CheckpointError(
                f"{e} {run / 'checkpoints' / other}.pt (step {step}) is intact: use it with "
                f"--checkpoint {other} (e.g. `deepeq eval {run} --checkpoint {other}`)."
            ) from None
        raise
    task = make_task(cfg)
    model = create_model(cfg.model.name, **task.model_kwargs(), **cfg.model.overrides).to(device)
    model.load_state_dict(ck["model"])
    return cfg, model, task


def _readable_step(path: Path) -> int | None:
    """The step of a checkpoint that loads, else None (missing or unreadable)."""
    if not path.exists():
        return None
    try:
        return load(path, map_location="cpu").get("step")
    except CheckpointError:
        return None


def _to(state: Any, device: str) -> Any:
    """Move a model memory (tensor, tuple/list of tensors or None) to ``device``."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, list | tuple):
        return type(state)(_to(s, device) for s in state)
    return state
