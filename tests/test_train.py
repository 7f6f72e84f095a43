"""The training system: configs and overrides, the copy-memory task, 2-step runs of every
config, exact resume, kill-and-resume, the non-finite guard, the CLI."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepeq.__main__ import main
from deepeq.data import copy_memory
from deepeq.models import _registry
from deepeq.train import (
    ConfigError,
    TrainConfig,
    checkpoint,
    dump_config,
    load_config,
    load_run,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("copy_memory_*.toml"))
SMALL = [
    "--steps=2",
    "--data.seq_len=10",
    "--data.n_train=32",
    "--data.n_test=16",
    "--batch_size=8",
    "--eval_every=1",
    "--ckpt_every=1",
    "--eval_batch_size=16",
]


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(
        ROOT / "configs/copy_memory_tiny.toml",
        [
            "--optim.lr=5e-4",
            "--model.name=lstm_tiny",
            "--model.overrides.hidden=12",
            "--jac.final_weight=2",
            "--device=cpu",
        ],
    )
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.name == "lstm_tiny" and cfg.model.overrides == {"hidden": 12}
    assert cfg.jac.final_weight == 2.0 and cfg.steps == 4  # from the file
    # Free-form model overrides read TOML values as a config file would (true, 1e-2, [..]),
    # Python literals, or else the word itself.
    free = load_config(
        None,
        [
            "--model.overrides.pre_ln=true",
            "--model.overrides.solve.b_rtol=1e-2",
            "--model.overrides.cutoffs=[20, 40]",
            "--model.overrides.tie_weights=False",
            "--model.overrides.solve.dtype=bfloat16",
        ],
    ).model.overrides
    assert free == {
        "pre_ln": True,
        "solve": {"b_rtol": 0.01, "dtype": "bfloat16"},
        "cutoffs": [20, 40],
        "tie_weights": False,
    }
    with pytest.raises(
        ConfigError,
        match=r"Unknown config key 'optim.lrr'; valid keys at optim: \['optim.name', 'optim.lr'",
    ):
        load_config(None, ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"data.seq_len: cannot parse 'abc' as int"):
        load_config(None, ["--data.seq_len=abc"])
    with pytest.raises(ConfigError, match=r"steps: expected an int; got 2.5"):
        load_config(None, ["--steps=2.5"])
    with pytest.raises(ConfigError, match=r"--section\.key=value"):
        load_config(None, ["steps=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError, match=r"\['optim.learning_rate'\] at optim; valid keys"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "missing.toml")
    # The resolved config round-trips through TOML.
    dump_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg
    assert dataclasses.is_dataclass(TrainConfig())


def test_copy_memory_matches_the_spec():
    x, y = copy_memory(500, 30, seed=7)
    assert x.shape == y.shape == (500, 50)
    assert ((x[:, :10] >= 1) & (x[:, :10] <= 8)).all()
    assert (x[:, 39] == 9).all()  # the delimiter x_{T+10} (1-based)
    others = torch.ones(50, dtype=torch.bool)
    others[:10] = False
    others[39] = False
    assert (x[:, others] == 0).all()
    assert (y[:, :40] == 0).all() and torch.equal(y[:, 40:], x[:, :10])
    assert torch.equal(copy_memory(500, 30, seed=7)[0], x) and not torch.equal(
        copy_memory(500, 30, seed=8)[0], x
    )
    assert len(set(x[:, :10].flatten().tolist())) == 8  # all eight symbols occur


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_two_steps_of_every_config(config, tmp_path):
    cfg = load_config(config, [*SMALL, f"--out_dir={tmp_path}"])
    metrics = train(cfg, progress=False)
    assert metrics["step"] == 2 and metrics["test_loss"] > 0 and 0 <= metrics["test_acc"] <= 1
    assert (tmp_path / "checkpoints/latest.pt").exists() and (
        tmp_path / "checkpoints/best.pt"
    ).exists()
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,loss")
    assert load_config(tmp_path / "config.toml") == cfg  # resolved config written
    assert any((tmp_path / "tb").iterdir())  # TensorBoard events
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, progress=False)


LM_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.toml") if load_config(p).data.task == "lm"
)


@pytest.mark.parametrize("config", LM_CONFIGS, ids=lambda p: p.stem)
def test_two_steps_of_every_language_model_config(config, tmp_path):
    """Every LM config trains 2 steps on CPU (paper-size models at a reduced width; WikiText
    configs on generated files in the official layout)."""
    cfg = load_config(config)
    over = [
        "--steps=2", "--batch_size=2", "--data.seq_len=6", "--data.eval_limit=40",
        "--eval_every=1", "--eval_batch_size=2", "--device=cpu", f"--out_dir={tmp_path / 'run'}",
        "--data.cache_dir=", "--model.overrides.solve.f_max_steps=3", "--model.overrides.solve.b_max_steps=3",
        "--model.overrides.solve.eval_max_steps=3",
    ]  # fmt: skip
    if cfg.data.corpus.startswith("wikitext"):
        wt = tmp_path / "wt"
        wt.mkdir()
        text = "".join(f" = w{i} = \n \n a b c w{i % 7} d e f g h , . \n" for i in range(40))
        for s in ("train", "valid", "test"):
            (wt / f"wiki.{s}.tokens").write_text(text)
        over += [f"--data.path={wt}", "--model.overrides.cutoffs=[4, 8, 16]"]
    if "paper" in config.stem or "wt103" in config.stem:
        over += ["--model.overrides.d_model=40", "--model.overrides.d_embed=40"]
        over += ["--model.overrides.n_heads=4"] if "wt103" in config.stem else []
    m = train(load_config(config, over), progress=False)
    assert m["step"] == 2 and m["valid_loss"] > 0 and m["test_loss"] > 0, config.stem
    assert (tmp_path / "run" / "final.json").exists()


def _params(path):
    return torch.load(path / "checkpoints/latest.pt", weights_only=True)["model"]


def test_resume_is_bit_identical(tmp_path):
    common = [
        "--steps=6",
        "--data.seq_len=10",
        "--data.n_train=32",
        "--data.n_test=16",
        "--batch_size=8",
        "--eval_every=3",
        "--ckpt_every=3",
        "--model.overrides.dropout=0.1",
        "--jac.weight=0.5",
        "--jac.probability=0.5",
    ]
    a = load_config(
        ROOT / "configs/copy_memory_tiny.toml", [*common, f"--out_dir={tmp_path / 'a'}"]
    )
    b = load_config(
        ROOT / "configs/copy_memory_tiny.toml", [*common, f"--out_dir={tmp_path / 'b'}"]
    )
    train(a, progress=False)
    train(b, progress=False, until_step=3)
    assert torch.load(tmp_path / "b/checkpoints/latest.pt", weights_only=True)["step"] == 3
    train(b, progress=False, resume=True)
    pa, pb = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert (tmp_path / "a/metrics.csv").read_text().splitlines()[1:] != []
    la = [r.split(",")[1] for r in (tmp_path / "a/metrics.csv").read_text().splitlines()[1:]]
    lb = [r.split(",")[1] for r in (tmp_path / "b/metrics.csv").read_text().splitlines()[1:]]
    assert la == lb  # identical losses at every step
    # resuming the finished run runs nothing and keeps its record (it used to overwrite
    # final.json with one that had lost the final evaluation)
    before = (tmp_path / "a/final.json").read_text()
    again = train(a, progress=False, resume=True)
    assert (tmp_path / "a/final.json").read_text() == before
    assert again["step"] == 6 and again["test_loss"] > 0
    assert (tmp_path / "a/metrics.csv").read_text().splitlines()[1:][-1].split(",")[1] == la[-1]


def test_flush_denormal_reaches_the_worker_threads():
    """torch.set_flush_denormal alone sets the calling thread only: with 2 threads half of a
    parallel product keeps its subnormals. deepeq's setter also sets torch's OpenMP workers."""
    from deepeq.train._denormal import _runtime, flushed_on_all_threads, set_flush_denormal

    if _runtime() is None:
        pytest.skip(
            "torch's OpenMP runtime is not libgomp here (flags set on the main thread only)"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        flushed_on_all_threads()  # make sure the worker pool exists
        torch.set_flush_denormal(False)
        assert not flushed_on_all_threads()
        assert set_flush_denormal(True) and flushed_on_all_threads()
        assert set_flush_denormal(False) and not flushed_on_all_threads()
        x = torch.full((1 << 18,), 0x007FFFFF, dtype=torch.int32).view(torch.float32)
        assert bool(((x * 1.0) != 0).all())  # off again on every thread
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_holds_during_training_only(flush, tmp_path, monkeypatch):
    from deepeq.train._denormal import _runtime, flushed_on_all_threads

    if _runtime() is None:
        pytest.skip(
            "torch's OpenMP runtime is not libgomp here (flags set on the main thread only)"
        )

    seen, calls = [], []
    real_set = torch.set_flush_denormal

    def record(on):
        calls.append(on)
        return real_set(on)

    real_step = torch.optim.Adam.step

    def step(self, *a, **k):  # what a training step sees, on both of its threads
        seen.append(flushed_on_all_threads())
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch, "set_flush_denormal", record)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cfg = load_config(
        ROOT / "configs/copy_memory_tiny.toml",
        [*SMALL, f"--out_dir={tmp_path}", f"--flush_denormal={str(flush).lower()}", "--threads=2"],
    )
    assert cfg.optim.name == "adam"
    threads = torch.get_num_threads()
    try:
        train(cfg, progress=False)
        if not real_set(True):  # a CPU without FTZ/DAZ: nothing to check
            pytest.skip("this CPU cannot flush denormals")
        real_set(False)
        assert seen == [flush] * 2  # flushed in every training step iff configured
        assert calls == ([True, False] if flush else [])
        assert not flushed_on_all_threads()  # torch's default restored afterwards
        calls.clear()
        assert main(["eval", str(tmp_path)]) == 0  # `deepeq eval` follows the run's setting
        assert calls == ([True, False] if flush else [])
    finally:
        torch.set_num_threads(threads)


def test_kill_then_resume_loses_at_most_one_interval(tmp_path):
    args = [
        sys.executable,
        "-m",
        "deepeq",
        "train",
        str(ROOT / "configs/copy_memory_tiny.toml"),
        "--steps=400",
        "--data.seq_len=10",
        "--data.n_train=64",
        "--batch_size=8",
        "--eval_every=1000",
        "--ckpt_every=5",
        f"--out_dir={tmp_path}",
        "--no-progress",
        "--model.name=lstm_tiny",
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    csv = tmp_path / "metrics.csv"
    deadline = time.time() + 60
    while time.time() < deadline:
        if csv.exists() and len(csv.read_text().splitlines()) > 13:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(csv.read_text().splitlines()) - 1
    ck = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)["step"]
    assert 0 < done - ck <= 5 or done == ck  # at most one checkpoint interval lost
    subprocess.run(
        [*args, "--resume"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    rows = csv.read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 401))


def _nan_model(**overrides):
    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, tokens, state=None):
            return self.w * torch.full((*tokens.shape, 10), float("nan")), None, []

    return NaNModel()


def test_jacobian_regularisation_needs_the_implicit_backward(tmp_path):
    args = [*SMALL, "--jac.weight=1", "--jac.probability=0.01", f"--out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"jac.weight = 1 / .* differentiate f\(z\*\)"):
        load_config(
            ROOT / "configs/copy_memory_tiny.toml",
            [*args, "--model.overrides.solve.backward=phantom"],
        )
    # a config built in Python (not loaded) is checked the same way, when it is made
    cfg = load_config(ROOT / "configs/copy_memory_tiny.toml", args)
    phantom = dataclasses.replace(cfg.model, overrides={"solve": {"backward": "phantom"}})
    with pytest.raises(ConfigError, match=r"jac.weight = 1 / .* differentiate f\(z\*\)"):
        dataclasses.replace(cfg, model=phantom)


def test_shine_backward_without_iterations_trains(tmp_path):
    """b_init="shine", b_max_steps=0: the gradient comes from the forward Broyden solver's
    inverse estimate with no vector-Jacobian product; the log has bwd_nfe 0 and no residual."""
    import csv

    args = [*SMALL, "--model.overrides.solve.b_init=shine", "--model.overrides.solve.b_max_steps=0",
            "--model.overrides.solve.causal=false"]  # fmt: skip
    with pytest.raises(ValueError, match=r"Anderson does not keep.*solve.solver = 'broyden'"):
        train(load_config(ROOT / "configs/copy_memory_tiny.toml", [*args, f"--out_dir={tmp_path}"]))
    cfg = load_config(
        ROOT / "configs/copy_memory_tiny.toml",
        [*args, "--model.overrides.solve.solver=broyden", f"--out_dir={tmp_path / 'run'}"],
    )
    train(cfg, progress=False)
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["bwd_nfe"] for r in rows] == ["0", "0"]
    assert all(r["bwd_res_max"] == "" and r["fwd_nfe"] not in ("", "0") for r in rows)
    assert all(float(r["grad_norm"]) > 0 for r in rows)


def test_nonfinite_guard(tmp_path, caplog, monkeypatch):
    # registered for this test only, so that other modules' model lists never see it
    entry = _registry.ModelEntry("nan_model", None, {}, _nan_model)
    monkeypatch.setitem(_registry._MODELS, "nan_model", entry)
    cfg = load_config(
        ROOT / "configs/copy_memory_tiny.toml",
        [
            *SMALL,
            "--steps=10",
            "--max_nonfinite=3",
            "--model.name=nan_model",
            f"--out_dir={tmp_path}",
        ],
    )
    with pytest.raises(
        FloatingPointError,
        match=r"3 consecutive steps were skipped \(last at step 3: non-finite loss or solve\); "
        r"stopping.*no checkpoint was written yet .*start the run again with --resume",
    ):
        train(cfg, progress=False)
    assert "step skipped" in caplog.text
    # no step was ever applied: nothing is checkpointed (a state the guard rejected never is)
    assert not list((tmp_path / "checkpoints").iterdir())


def _nan_grad_model(**overrides):
    """A finite loss whose gradient is NaN (sqrt at 0 in the backward pass)."""

    class NaNGradModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.emb = torch.nn.Parameter(torch.zeros(10))

        def forward(self, tokens, state=None):
            logits = self.emb + torch.sqrt(self.w * 0.0) * 0.0  # d/dw sqrt(0) = inf, * 0 = NaN
            return logits.expand(*tokens.shape, 10), None, []

    return NaNGradModel()


def test_nan_gradient_of_a_finite_loss_is_skipped_and_never_checkpointed(
    tmp_path, caplog, monkeypatch
):
    import csv

    entry = _registry.ModelEntry("nan_grad_model", None, {}, _nan_grad_model)
    monkeypatch.setitem(_registry._MODELS, "nan_grad_model", entry)
    cfg = load_config(
        ROOT / "configs/copy_memory_tiny.toml",
        [*SMALL, "--steps=4", "--max_nonfinite=3", "--model.name=nan_grad_model",
         f"--out_dir={tmp_path}"],
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"last at step 3: non-finite gradient"):
        train(cfg, progress=False)
    assert "non-finite gradient (finite loss); step skipped" in caplog.text
    # no step was applied, so no state was checkpointed (the guard rejected every one)
    assert not list((tmp_path / "checkpoints").iterdir())
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3"]  # the stop step's row is logged
    assert [r["skipped"] for r in rows] == ["1", "2", "3"]


def test_divergent_lr_stops_naming_a_checkpoint_that_exists(tmp_path):
    import csv

    cfg = load_config(
        ROOT / "configs/copy_memory_quick.toml",
        ["--optim.lr=1e30", "--optim.clip=0", "--data.n_train=64", "--data.n_test=16",
         "--batch_size=16", "--eval_every=1000", "--ckpt_every=1000", f"--out_dir={tmp_path}"],
    )  # fmt: skip
    with pytest.raises(FloatingPointError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    latest = tmp_path / "checkpoints/latest.pt"
    assert latest.exists() == (str(latest) in msg and "resume from" in msg)
    if not latest.exists():
        assert "no checkpoint was written yet" in msg
    with open(tmp_path / "metrics.csv") as fh:
        last = list(csv.DictReader(fh))[-1]
    stop_step = int(msg.split("last at step ")[1].split(":")[0]) if "last at step" in msg else None
    assert stop_step is None or int(last["step"]) == stop_step


def test_exploding_loss_warns(tmp_path, caplog):
    args = [*SMALL, "--steps=40", "--eval_every=100", "--ckpt_every=100", "--optim.clip=0"]
    cfg = load_config(ROOT / "configs/copy_memory_tiny.toml",
                      [*args, "--optim.lr=1e3", f"--out_dir={tmp_path / 'a'}"])  # fmt: skip
    final = train(cfg, progress=False)
    assert "the training loss exploded" in caplog.text and "max_loss_ratio" in caplog.text
    assert 11 <= final["loss_exploded_at"] <= 40  # the first full window of 10 steps after step 1
    caplog.clear()
    cfg = load_config(ROOT / "configs/copy_memory_tiny.toml",
                      [*args, "--optim.lr=1e-3", f"--out_dir={tmp_path / 'b'}"])  # fmt: skip
    assert "loss_exploded_at" not in train(cfg, progress=False)
    assert "exploded" not in caplog.text


def test_checkpoints_load_with_weights_only(tmp_path):
    cfg = load_config(ROOT / "configs/copy_memory_tiny.toml", [*SMALL, f"--out_dir={tmp_path}"])
    train(cfg, progress=False)
    for name in ("latest", "best"):
        ck = torch.load(tmp_path / f"checkpoints/{name}.pt", weights_only=True)
        assert ck["format"] == checkpoint.FORMAT
    assert isinstance(ck_cfg := checkpoint.load(tmp_path / "checkpoints/latest.pt")["config"], dict)
    assert ck_cfg["model"]["name"] == cfg.model.name
    # an old-style checkpoint (a pickled config object) gets one clear error, and converts
    old = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    old.pop("format")
    old["config"] = cfg
    torch.save(old, tmp_path / "checkpoints/latest.pt")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"does not load with torch.load\(weights_only=True\)"
    ):
        train(cfg, resume=True, progress=False)
    checkpoint.convert_trusted(tmp_path / "checkpoints/latest.pt")
    train(dataclasses.replace(cfg, steps=3), resume=True, progress=False)
    # a foreign file
    torch.save([1, 2], tmp_path / "checkpoints/best.pt")
    with pytest.raises(checkpoint.CheckpointError, match="is not a deepeq checkpoint"):
        load_run(tmp_path)


def test_main_reports_checkpoint_errors_in_one_line(tmp_path, capsys):
    cfg = str(ROOT / "configs/copy_memory_tiny.toml")
    assert main(["train", cfg, *SMALL, f"--out_dir={tmp_path}", "--no-progress"]) == 0
    (tmp_path / "checkpoints/best.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err


def test_cli_train_and_eval(tmp_path, capsys):
    cfg = str(ROOT / "configs/copy_memory_tiny.toml")
    assert main(["train", cfg, *SMALL, f"--out_dir={tmp_path}", "--no-progress"]) == 0
    assert "best_test_loss" in capsys.readouterr().out
    # The same command again: one clear line on stderr, exit code 2, no traceback.
    assert main(["train", cfg, *SMALL, f"--out_dir={tmp_path}", "--no-progress"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--max-steps", "2,8"]) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "| 8 |" in out
    assert main(["train", cfg, "--optim.nope=1", f"--out_dir={tmp_path / 'x'}"]) == 2
    assert "Unknown config key 'optim.nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # failed before any work
    assert main(["plot", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    # no Jacobian terms logged; the per-epoch convergence shares are drawn
    assert pngs == ["convergence.png", "loss.png", "metric.png", "nfe.png", "residual.png"]


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_gradient(tmp_path):
    """`torchrun --nproc_per_node=2 -m deepeq train ...` (DistributedDataParallel, gloo): one SGD
    step with lr 1 moves the parameters by minus the gradient, which must equal the gradient of
    the single-process run on the same global batch."""
    common = [
        str(ROOT / "configs/copy_memory_tiny.toml"),
        "--no-progress",
        "--steps=1",
        "--data.seq_len=10",
        "--data.n_train=32",
        "--batch_size=8",
        "--optim.name=sgd",
        "--optim.momentum=0.0",
        "--optim.lr=1.0",
        "--optim.schedule=constant",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(29500 + os.getpid() % 1000)
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "deepeq",
            "train",
            *common,
            f"--out_dir={tmp_path / 'ddp'}",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [sys.executable, "-m", "deepeq", "train", *common, f"--out_dir={tmp_path / 'one'}"],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    torch.manual_seed(0)  # the initial parameters of both runs (train() seeds with cfg.seed = 0)
    from deepeq.models import create_model

    init = create_model("deq_transformer_tiny", vocab_size=10).state_dict()
    a, b = _params(tmp_path / "one"), _params(tmp_path / "ddp")
    for k in a:
        ga, gb = init[k] - a[k], init[k] - b[k]
        # float32 round-off: the fused attention kernel blocks a batch of 4 and one of 8
        # differently (~1e-7), which the capped solves amplify (measured: up to 1.5e-5 on
        # entries ~0.35); a wrong reduction is off by O(|g|)
        torch.testing.assert_close(gb, ga, atol=5e-5, rtol=1e-4, msg=k)
    assert not (tmp_path / "ddp" / "checkpoints" / "rank1").exists()
    assert ddp.stdout.count(b"summary:") == 1  # rank 0 reports, rank 1 does not
    assert (
        len((tmp_path / "ddp" / "metrics.csv").read_text().splitlines()) == 2
    )  # rank 0 wrote one row


def test_coerce_checks_values_against_annotations():
    from deepeq._coerce import coerce

    assert coerce(3, float, "k") == 3.0 and isinstance(coerce(3, float, "k"), float)
    assert coerce([4, 8], tuple[int, ...], "k") == (4, 8)
    assert coerce([0.5, 1], tuple[float, ...], "k") == (0.5, 1.0)
    assert coerce(None, int | None, "k") is None
    with pytest.raises(TypeError, match=r"k\[1\]: expected an int; got 'a' \(str\)"):
        coerce([1, "a"], tuple[int, ...], "k")
    with pytest.raises(TypeError, match=r"k: expected a list; got 3 \(int\)"):
        coerce(3, tuple[int, ...], "k")
    with pytest.raises(TypeError, match=r"k: expected int or None; got 'x'"):
        coerce("x", int | None, "k")
    with pytest.raises(TypeError, match=r"k: expected an int; got True"):
        coerce(True, int, "k")


def test_convergence_summary_by_epoch():
    from deepeq.train.convergence import convergence_line, convergence_summary

    rows = [
        {"step": str(i + 1), "fwd_converged": str(v), "fwd_res_max": str(r),
         "bwd_converged": "" if i == 0 else "1.0", "bwd_res_max": "" if i == 0 else "1e-5"}
        for i, (v, r) in enumerate([(1.0, 1e-4), (1.0, 2e-4), (0.5, 3e-2), (0.25, 5e-2), (1.0, 1e-4)])
    ]  # fmt: skip
    s = convergence_summary(rows, steps_per_epoch=2)
    assert s["fwd_converged_steps"] == 3 / 5
    assert s["fwd_converged_steps_by_epoch"] == [1.0, 0.0, 1.0]  # epochs (1, 2), (3, 4), (5)
    assert s["bwd_converged_steps"] == 1.0 and s["bwd_converged_steps_by_epoch"] == [1.0, 1.0, 1.0]
    assert s["fwd_res_max_last_epoch"] == 1e-4
    assert "60% of training steps (100% in the last epoch" in convergence_line(s)
    s2 = convergence_summary(rows[:4], steps_per_epoch=2)
    assert "warning: in the last epoch only 0%" in convergence_line(s2)
    assert convergence_summary([{"step": "1", "fwd_converged": ""}], 2) == {}


def test_final_summary_reports_convergence(tmp_path, capsys):
    cfg = str(ROOT / "configs/copy_memory_tiny.toml")
    # cap 1: no forward solve meets the tolerance, and the summary says so
    args = [
        *SMALL,
        "--model.overrides.solve.f_max_steps=1",
        f"--out_dir={tmp_path}",
        "--no-progress",
    ]
    assert main(["train", cfg, *args]) == 0
    out = capsys.readouterr().out
    assert "convergence: forward solves met their tolerance on 0% of training steps" in out
    assert "warning: in the last epoch only 0% of the forward solves" in out
    import json

    final = json.loads((tmp_path / "final.json").read_text())
    assert final["fwd_converged_steps"] == 0.0 and final["steps_per_epoch"] == 4
    # the evaluation solves are reported too (default eval cap 20 here): the share of test
    # samples whose solve met the tolerance, against the solutions recorded by a hook
    from deepeq.train.checkpoint import load_run

    _, model, task = load_run(tmp_path, "latest")
    for cap, rtol in ((1, 1e-9), (1000, 1e-2), (4, 1e-2)):  # one sample needs 219 steps
        twin = model.with_solve(
            dataclasses.replace(model.config.solve, eval_max_steps=cap, eval_rtol=rtol)
        )
        seen = []
        hook = twin.register_forward_hook(
            lambda m, i, o, seen=seen: seen.extend(s.stats for s in o[2])
        )
        got = task.evaluate(twin)
        hook.remove()
        conv = torch.cat([st.converged for st in seen])
        assert len(conv) == 16  # one solve per test sample
        assert got["test_fwd_converged"] == conv.float().mean().item()
        assert got["test_fwd_res_max"] == max(st.rel_residual.max().item() for st in seen)
        assert got["test_fwd_nfe"] == sum(st.nfe for st in seen) / len(seen)
        if cap == 1:
            assert got["test_fwd_converged"] == 0.0
        if cap == 1000:
            assert got["test_fwd_converged"] == 1.0 and got["test_fwd_res_max"] <= 1e-2
    assert "evaluation solves that met their tolerance: test " in out
    assert f"test {100 * final['test_fwd_converged']:.1f}% (max residual" in out


def test_unconverged_jacobian_penalty_in_training(tmp_path):
    import csv

    cfg = str(ROOT / "configs/copy_memory_tiny.toml")
    args = [*SMALL, "--no-progress", "--jac.unconverged_weight=0.5"]
    # cap 1: every step has unconverged outputs, each pays the penalty (logged per step)
    assert main(["train", cfg, *args, "--model.overrides.solve.f_max_steps=1",
                 f"--out_dir={tmp_path / 'a'}"]) == 0  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "a" / "metrics.csv").read_text().splitlines()))
    assert rows and all(float(r["jac_unconverged"]) > 0 for r in rows)
    assert all(r["jac_penalty"] == "" for r in rows)  # the scheduled penalty stays off
    for r in rows:  # ... and the logged penalty is part of the loss, at its weight
        want = float(r["task_loss"]) + 0.5 * float(r["jac_unconverged"])
        assert abs(float(r["loss"]) - want) <= 1e-5 * abs(want)
    # a loose tolerance that every solve meets: nothing to penalise, nothing logged
    assert main(["train", cfg, *args, "--model.overrides.solve.f_rtol=0.5",
                 f"--out_dir={tmp_path / 'b'}"]) == 0  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "b" / "metrics.csv").read_text().splitlines()))
    assert rows and all(r["jac_unconverged"] == "" for r in rows)
    assert all(float(r["fwd_converged"]) == 1.0 for r in rows)
    with pytest.raises(ConfigError, match="unconverged_weight"):
        load_config(cfg, ["--jac.unconverged_weight=1", "--model.overrides.solve.backward=phantom"])
    with pytest.raises(ConfigError, match="unconverged_weight must be a float >= 0"):
        load_config(cfg, ["--jac.unconverged_weight=-1"])
