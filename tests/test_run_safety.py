"""Run directories under stress: a copied run resumes itself, a run killed before its first
checkpoint restarts, an exploded run keeps its last good checkpoint, a full disk gives one
message and leaves the previous checkpoint intact, only rank 0 reports, a corrupt checkpoint
names the intact one."""

import errno
import shutil
from pathlib import Path

import pytest
import torch
from test_train import SMALL as TRAIN_SMALL

from deepeq.__main__ import main
from deepeq.train import checkpoint, load_config, train
from deepeq.train import loop as _loop

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/copy_memory_tiny.toml")
# the tiny runs of tests/test_train.py with 4 steps (a checkpoint and an evaluation at each), on
# one thread (tiny ops: a second thread only waits, and on a loaded machine costs 10x)
BASE = [*TRAIN_SMALL, "--steps=4", "--threads=1"]
# lstm_tiny: fast; what is tested here does not depend on the model
SMALL = [*BASE, "--model.name=lstm_tiny", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """train() sets torch's thread count (--threads=1): give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(run: Path) -> list[int]:
    return [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]


def _step(path: Path) -> int:
    return checkpoint.load(path)["step"]


def _largest_weight(path: Path) -> float:
    model = checkpoint.load(path)["model"]
    return max(float(t.abs().max()) for t in model.values() if t.is_floating_point())


def _files(run: Path) -> dict:
    """The run's files (TensorBoard events aside) and their bytes."""
    files = [*run.iterdir(), *(run / "checkpoints").iterdir()]
    return {p.name: p.read_bytes() for p in files if p.is_file()}


def test_resume_of_a_copied_run_directory_continues_the_copy(tmp_path, caplog):
    """Item 7: `deepeq train COPY/config.toml --resume` resumes COPY (the stored out_dir names
    the original, which must not change); an explicit --out_dir still wins."""
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    assert main(["train", TINY, *SMALL, "--until-step=2", f"--out_dir={orig}"]) == 0
    shutil.copytree(orig, copy)
    before = _files(orig)
    assert main(["train", str(copy / "config.toml"), "--resume", "--no-progress"]) == 0
    assert _files(orig) == before  # the original run is untouched
    assert _step(copy / "checkpoints/latest.pt") == 4 and _rows(copy) == [1, 2, 3, 4]
    assert str(copy) in caplog.text and str(orig) in caplog.text  # which directory, and why
    assert load_config(copy / "config.toml").out_dir == str(copy)
    # the command as the original run's own config: nothing to redirect
    assert load_config(orig / "config.toml").out_dir == str(orig)
    # an explicit --out_dir is obeyed (here: continue the original from the copy's config)
    assert main(["train", str(copy / "config.toml"), "--resume", "--no-progress",
                 f"--out_dir={orig}", "--steps=3"]) == 0  # fmt: skip
    assert _step(orig / "checkpoints/latest.pt") == 3 and _rows(orig) == [1, 2, 3]


def _kill_at(monkeypatch, at_step: int):
    """Make the training loop die (as a kill would) when it reaches ``at_step`` (0-based)."""
    real = _loop.train_step

    def dying(*args, step, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt
        return real(*args, step=step, **kwargs)

    monkeypatch.setattr(_loop, "train_step", dying)


def test_a_run_killed_before_its_first_checkpoint_restarts(tmp_path, monkeypatch, capsys, caplog):
    """Item 8: no checkpoint yet -> --resume starts the run again from step 0 (with a message);
    without --resume the error says that --resume does this."""
    args = ["train", TINY, *SMALL, "--ckpt_every=100", "--eval_every=100", f"--out_dir={tmp_path}"]
    with monkeypatch.context() as m:
        _kill_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    assert _rows(tmp_path) == [1, 2] and not (tmp_path / "checkpoints/latest.pt").exists()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--resume" in err and "step 0" in err
    assert main([*args, "--resume"]) == 0
    assert "no checkpoint" in caplog.text and "step 0" in caplog.text
    assert _rows(tmp_path) == [1, 2, 3, 4] and _step(tmp_path / "checkpoints/latest.pt") == 4


def test_an_exploded_run_keeps_its_last_good_checkpoint(tmp_path):
    """Item 9: a good run continued with lr 1e30: the first update makes the weights ~1e28
    (finite), every later step is skipped as non-finite and the run stops. latest.pt and best.pt
    must still hold the last state a step was applied at (step 3), the message must name it, and
    resuming it with the good lr must train on."""
    base = [*BASE, "--steps=8", "--max_nonfinite=3", f"--out_dir={tmp_path}"]
    good = load_config(TINY, base)  # the DEQ-Transformer: lr 1e30 makes its solves non-finite
    train(good, progress=False, until_step=3)
    bad = load_config(TINY, [*base, "--optim.lr=1e30", "--optim.clip=0"])
    with pytest.raises(FloatingPointError) as err:
        train(bad, progress=False, resume=True)
    latest, best = tmp_path / "checkpoints/latest.pt", tmp_path / "checkpoints/best.pt"
    assert _rows(tmp_path)[-1] > 4  # it did run into the explosion
    assert _step(latest) == 3 and _step(best) <= 3
    assert _largest_weight(latest) < 1e3 and _largest_weight(best) < 1e3
    assert f"resume from {latest} (step 3)" in str(err.value)
    assert not list((tmp_path / "checkpoints").glob("*.pending"))
    final = train(good, progress=False, resume=True)  # no FloatingPointError
    assert final["step"] == 8 and final["skipped"] == 0


def _error_line(err: str) -> str:
    """The CLI's one error line (stderr also carries the run's log), and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("deepeq train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _full_disk(monkeypatch, exc: Exception, after: int = 0):
    """After ``after`` good calls, torch.save writes a few bytes, then fails as on a full
    disk."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after:
            return real(obj, f, *args, **kwargs)
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04partial")
        else:
            Path(f).write_bytes(b"PK\x03\x04partial")
        raise exc

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # what torch.save(obj, PATH) raises on a full disk
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    ],
    ids=["oserror", "torch"],
)
def test_a_full_disk_gives_one_message_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, capsys, exc
):
    """Item 10: a checkpoint write that fails (disk full) stops the run with one line naming
    the file and saying that the previous checkpoint is intact; no temporary file is left."""
    args = ["train", TINY, *SMALL, f"--out_dir={tmp_path}"]
    assert main([*args, "--until-step=2"]) == 0
    latest = tmp_path / "checkpoints/latest.pt"
    intact = latest.read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        _full_disk(m, exc, after=1)  # step 3: best.pt is written (pending), latest.pt fails
        assert main([*args, "--resume"]) == 2  # one line, no traceback
    err = _error_line(capsys.readouterr().err)
    assert f"while writing {latest}; the previous latest.pt (step 2) is intact" in err
    if isinstance(exc, OSError):
        assert "no space left on device" in err
    assert latest.read_bytes() == intact and _step(latest) == 2
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    # a stale temporary (a run killed while writing) is removed at the next start
    (tmp_path / "checkpoints/latest.pt.tmp").write_bytes(b"PK\x03\x04partial")
    assert main([*args, "--resume"]) == 0
    assert not list((tmp_path / "checkpoints").glob("*.tmp")) and _step(latest) == 4


def test_a_read_only_run_directory_gives_one_message(tmp_path, monkeypatch, capsys):
    """Item 10: writing the run directory fails (read-only file system): one line, not an
    OSError traceback."""

    def read_only(cfg, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(_loop, "dump_config", read_only)
    assert main(["train", TINY, *SMALL, f"--out_dir={tmp_path}"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "read-only file system" in err
    assert str(tmp_path / "config.toml") in err


def test_only_rank_0_prints_the_summary(tmp_path, monkeypatch, capsys):
    """Item 17: under torchrun (RANK set) only rank 0 reports the run."""
    monkeypatch.setenv("RANK", "1")
    assert main(["train", TINY, *SMALL, "--steps=1", f"--out_dir={tmp_path / 'r1'}"]) == 0
    assert "summary:" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert main(["train", TINY, *SMALL, "--steps=1", f"--out_dir={tmp_path / 'r0'}"]) == 0
    assert "summary:" in capsys.readouterr().out


def test_a_corrupt_checkpoint_names_the_intact_one(tmp_path, capsys):
    """Item 18: a truncated latest.pt (resume, eval --checkpoint latest) or best.pt (eval):
    the error says which checkpoint is intact and the exact flag that uses it."""
    args = ["train", TINY, *SMALL, "--steps=2", f"--out_dir={tmp_path}"]
    assert main(args) == 0
    latest, best = tmp_path / "checkpoints/latest.pt", tmp_path / "checkpoints/best.pt"
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{best} (step 2) is intact" in err
    assert f"deepeq eval {tmp_path} --checkpoint best" in err
    assert main(["eval", str(tmp_path), "--checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"{best} (step 2) is intact" in err and "--checkpoint best" in err
    latest.write_bytes(good)
    best.write_bytes(best.read_bytes()[:100])
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{latest} (step 2) is intact" in err and "--checkpoint latest" in err
