"""Command line (``deepeq ...`` or ``python -m deepeq ...``).

deepeq train CONFIG.toml [--section.key=value ...] [--resume]
deepeq eval RUN_DIR [--max-steps 5,10,20,40]
deepeq generate RUN_DIR --prompt TEXT
deepeq plot RUN_DIR
deepeq analyze {convergence,nfe,gradient} ...
deepeq demo | version

One argparse tree (``build_parser``); each command is a function of its parsed arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._solution import ConvergenceWarning
from .analysis import plots
from .train.checkpoint import CheckpointError
from .train.config import ConfigError


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    if args.help_config is not None:
        from .train.config_help import help_config

        if args.config is None and args.help_config.endswith(".toml"):  # --help-config X.toml
            args.config, args.help_config = args.help_config, "all"
        print(help_config(load_config(args.config, args.rest), args.help_config))
        return 0
    if args.config is None:
        raise ConfigError(
            "deepeq train needs a config file: deepeq train CONFIG.toml [--section.key=value ...] "
            "(configs/*.toml; deepeq train --help-config lists every key)."
        )
    cfg = load_config(
        args.config, args.rest
    )  # unknown keys / wrong types fail here, before any work
    metrics = train(
        cfg, resume=args.resume, progress=not args.no_progress, until_step=args.until_step
    )
    if _rank_zero():  # under torchrun only rank 0 reports (the others lack the evaluation)
        _report_run(cfg, metrics)
    return 0


def _report_run(cfg, metrics: dict) -> None:
    """The final lines of ``deepeq train``: the metrics, a summary, convergence, a warning."""
    from .train.convergence import convergence_line

    print(
        f"run {cfg.out_dir}: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if not isinstance(v, list)
        )
    )
    keys = [k for k in metrics if k.startswith(("valid_", "test_"))]
    keys += ["fwd_nfe", "bwd_nfe", "fwd_converged", "peak_rss_mib", "cuda_peak_mib"]
    print(
        "summary: "
        + " | ".join(f"{k} {metrics[k]:.4g}" for k in keys if metrics.get(k) is not None)
    )
    line = convergence_line(metrics, cfg)
    if line:
        print(line)
    if metrics.get("loss_exploded_at") is not None:
        print(
            f"warning: the training loss exploded at step {metrics['loss_exploded_at']} (see the "
            f"log); this result is probably useless."
        )


def _rank_zero() -> bool:
    """False in the processes other than rank 0 of a ``torchrun`` launch (``RANK`` set)."""
    import os

    return int(os.environ.get("RANK", "0") or 0) == 0


def _eval(args: argparse.Namespace) -> int:
    from .train.checkpoint import load_run
    from .train.loop import flush_denormal

    cfg, model, task = load_run(args.run_dir, args.checkpoint)
    caps = [int(v) for v in args.max_steps.split(",") if v] or [None]
    from .analysis.studies import eval_sweep

    with flush_denormal(cfg.flush_denormal):  # as in training
        for line in eval_sweep(model, task, caps):
            print(line)
    return 0


class _BPEPrompt:
    """Prompts of a byte-level BPE corpus: its tokenizer both ways."""

    def __init__(self, corpus):
        self.corpus = corpus

    def encode(self, prompt: str):
        ids = self.corpus.encode(prompt)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: give at least one word to start from.")
        return ids

    def text(self, prompt_ids, new_ids) -> str:
        import torch

        return self.corpus.decode(torch.cat([prompt_ids, new_ids]))


class _VocabPrompt:
    """Prompts of a word- or character-level corpus: tokens of its vocabulary."""

    def __init__(self, corpus):
        self.itos, self.level = corpus.itos, corpus.level
        self.sep = " " if corpus.level == "word" else ""  # between the prompt and the rest

    def encode(self, prompt: str):
        from .generation import encode_prompt

        return encode_prompt(prompt, self.itos, self.level)

    def text(self, prompt_ids, new_ids) -> str:
        from .generation import decode_ids

        new = decode_ids(new_ids, self.itos, self.level)
        return decode_ids(prompt_ids, self.itos, self.level) + self.sep + new


def prompt_codec(corpus) -> _BPEPrompt | _VocabPrompt:
    """How ``deepeq generate`` reads a prompt and writes the text for a corpus (by its level)."""
    return _BPEPrompt(corpus) if corpus.level == "bpe" else _VocabPrompt(corpus)


def _generate(args: argparse.Namespace) -> int:
    from .generation import generate
    from .train.checkpoint import load_run
    from .train.config import load_run_config
    from .train.loop import flush_denormal

    config = Path(args.run_dir) / "config.toml"
    if config.exists() and (task := load_run_config(args.run_dir).data.task) != "lm":
        raise ConfigError(
            f"{args.run_dir} is a {task!r} run; deepeq generate needs a "
            f"language-model run (data.task = 'lm'), e.g. deepeq train configs/ptb_quick.toml."
        )
    cfg, model, task = load_run(args.run_dir, args.checkpoint)
    codec = prompt_codec(task.corpus)
    try:
        ids = codec.encode(args.prompt)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from e
    with flush_denormal(cfg.flush_denormal):
        try:
            out = generate(model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, window=args.window)  # fmt: skip
        except ValueError as e:  # bad sampling options
            raise ConfigError(str(e)) from e
    print(codec.text(ids, out.tokens))
    nfe = sum(out.nfe) / max(1, len(out.nfe))
    print(
        f"# {len(out.tokens)} tokens in {out.seconds:.2f} s ({out.tokens_per_s:.1f} tokens/s), "
        f"forward NFE {nfe:.1f} per token, max residual {out.residual:.1e}",
        file=sys.stderr,
    )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _convergence_rows(args: argparse.Namespace) -> list[dict]:
    """``analyze convergence``: a weight-tied stack's residual against depth, with Broyden's
    trace, for a run's model (its own test images for image runs) or a fresh registered one."""
    from .analysis import studies
    from .models._protocol import equilibrium_layer

    if args.run:
        from .train.checkpoint import load_run

        cfg, model, task = load_run(args.run)
        if equilibrium_layer(model) is None:
            raise ConfigError(
                f"{args.run}: the convergence study needs a DEQ sequence or image model; got "
                f"{cfg.model.name}."
            )
        images = task.analysis_inputs(4)  # image runs: their own test images
    else:
        from .models import create_model

        model, images = create_model(args.model), None
        if equilibrium_layer(model) is None:
            raise ConfigError(
                f"--model {args.model} is not a DEQ sequence or image model, which the "
                f"convergence study needs (a deq_* or mdeq_* name)."
            )
    lengths = [int(v) for v in args.lengths.split(",")]
    return studies.stack_convergence(model, lengths, args.layers, images=images)


def _gradient_rows(args: argparse.Namespace) -> list[dict]:
    """``analyze gradient``: the training gradient's accuracy against solver caps."""
    from .analysis import studies
    from .train.checkpoint import load_run

    caps = studies.parse_caps(args.caps)
    _, model, task = load_run(args.run, args.checkpoint)
    return studies.gradient_accuracy(
        model, task, caps, step=args.step, dropout=not args.no_dropout,
        b_init=args.b_init, solver=args.solver,
    )  # fmt: skip


def _nfe_rows(args: argparse.Namespace) -> list[dict]:
    """``analyze nfe``: each run's metric against forward NFE and time."""
    from .analysis import studies

    return studies.metric_vs_nfe(args.runs, [int(v) for v in args.max_steps.split(",")])


def _print_files(rows: list[dict], csv: Path, png: Path) -> None:
    print(csv, png)


def _print_gradient_table(rows: list[dict], csv: Path, png: Path) -> None:
    print(
        "| caps fwd/bwd | loss | fwd rel. res. | bwd rel. res. | fwd NFE | bwd NFE | cosine | rel. error | s |"
    )
    print("|---" * 9 + "|")
    for r in rows:
        print(
            f"| {r['f_cap']}/{r['b_cap']}{' shine' if r['b_init'] == 'shine' else ''} | "
            f"{r['loss']:.5f} | {r['fwd_rel_residual']:.2e} | "
            f"{r['bwd_rel_residual']:.2e} | {r['fwd_nfe']} | {r['bwd_nfe']} | "
            f"{r['cosine']:.4f} | {r['rel_error']:.3f} | {r['seconds']:.2f} |"
        )
    ref = rows[0]
    if max(ref["fwd_rel_residual"], ref["bwd_rel_residual"]) > 1e-5:
        print(
            f"warning: the reference solve did not converge (relative residuals "
            f"{ref['fwd_rel_residual']:.1e} / {ref['bwd_rel_residual']:.1e}); cosines and "
            f"errors are relative to an inexact gradient (try --no-dropout or another --step)."
        )


def _print_nfe_lines(rows: list[dict], csv: Path, png: Path) -> None:
    for r in rows:
        print(
            f"{Path(r['run']).name}: max_steps={r['max_steps']} NFE={r['mean_nfe']:.1f} {r['metric']}={r['value']:.4g} loss={r['test_loss']:.4g} {r['seconds']:.2f}s"
        )


def _path_independence_rows(args: argparse.Namespace) -> list[dict]:
    """``analyze path-independence``: AA per example of a run's model (its own test images for
    image runs; random token sequences otherwise) or of a fresh registered one."""
    from .analysis import studies

    model, images = _study_model(args, "the path-independence study")
    return studies.path_independence_rows(
        model, batch=args.batch, length=args.length, random_starts=args.random_starts,
        shuffled_starts=args.shuffled_starts, scale=args.scale, seed=args.seed, inputs=images,
    )  # fmt: skip


def _study_model(args: argparse.Namespace, what: str):
    """``(model, inputs)`` of ``--run`` (its latest checkpoint, its own test images for image
    runs) or ``--model`` (a fresh registered model); a ConfigError unless it has an
    equilibrium layer."""
    from .models._protocol import equilibrium_layer

    if args.run:
        from .train.checkpoint import load_run

        cfg, model, task = load_run(args.run)
        name, images = cfg.model.name, task.analysis_inputs(args.batch)
    else:
        from .models import create_model

        name, model, images = args.model, create_model(args.model), None
    if equilibrium_layer(model) is None:
        raise ConfigError(f"{what} needs a DEQ model (a deq_* or mdeq_* name); got {name}.")
    return model, images


def _print_alignment(rows: list[dict], csv: Path, png: Path) -> None:
    n = len(rows)
    aa = sum(r["aa"] for r in rows) / n
    diff = sum(r["different"] for r in rows) / n
    conv = sum(r["all_converged"] for r in rows) / n
    print(
        f"path independence over {n} examples: AA {aa:.4f} (1 = every start reaches the same "
        f"equilibrium), {100 * diff:.1f}% of the other starts reached a different one, "
        f"{100 * conv:.0f}% of the examples converged from every start"
    )
    print(csv, png)


@dataclass(frozen=True)
class Study:
    """An ``analyze`` study: its rows from the arguments, the files it writes
    (``<name>.csv`` / ``.png``), the plot and what it prints."""

    rows: Callable[[argparse.Namespace], list[dict]]
    name: str
    plot: Callable[[list[dict], Path], object]
    report: Callable[[list[dict], Path, Path], None]


STUDIES = {
    "convergence": Study(_convergence_rows, "convergence", plots.plot_convergence, _print_files),
    "nfe": Study(_nfe_rows, "metric_vs_nfe", plots.plot_metric_vs_nfe, _print_nfe_lines),
    "path-independence": Study(
        _path_independence_rows,
        "path_independence",
        plots.plot_path_independence,
        _print_alignment,
    ),
    "gradient": Study(
        _gradient_rows, "gradient_accuracy", plots.plot_gradient_accuracy, _print_gradient_table
    ),
}


def _analyze(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = STUDIES[args.study]
    rows = study.rows(args)
    csv, png = out / f"{study.name}.csv", out / f"{study.name}.png"
    plots.write_csv(rows, csv)
    study.plot(rows, png)
    study.report(rows, csv, png)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from ._demo import demo

    print(
        f"deepeq demo: solve z = f(z, x) for seeded random DEQ layers (torch {torch.__version__}, CPU)"
    )
    print(
        "stopping rule per sample: ||f(z)-z|| <= atol + rtol*||f(z)||, defaults atol=0, rtol=1e-3\n"
    )
    print(demo(smoke=args.smoke))
    return 0


def _version(args: argparse.Namespace) -> int:
    from . import __version__

    print(__version__)
    return 0


def _config_keys() -> str:
    """The config's keys by section, from the dataclasses (``deepeq train --help``)."""
    import dataclasses
    import textwrap

    from .train.config import TrainConfig

    top, tables, cfg = [], [], TrainConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys = ", ".join(g.name for g in dataclasses.fields(value))
            tables.append(f"--{f.name}.KEY: {keys}")
        else:
            top.append(f.name)
    lines = [f"config keys (--KEY=VALUE): {', '.join(top)}", *tables]
    lines.append("(deepeq train --help-config [SECTION]: their types, defaults and meanings)")
    return "\n".join(textwrap.fill(line, 79, subsequent_indent="    ") for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line as one argparse tree (``deepeq COMMAND --help`` for each)."""
    parser = argparse.ArgumentParser(prog="deepeq", description="Deep Equilibrium Models.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model: deepeq train CONFIG.toml [--section.key=value ...] [--resume]",
        description="Train a model; overrides are --section.key=value (every key, its type,\n"
        "default and meaning: deepeq train --help-config).",
        epilog=_config_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", nargs="?", help="TOML file listing what differs from the defaults")
    t.add_argument(
        "--help-config",
        nargs="?",
        const="all",
        metavar="SECTION",
        help="print every config key with its type, default (or this config's value) and "
        "meaning, then exit; SECTION: top, model, data, optim or jac (model: the keys of "
        "--model.name=NAME or of the config's model)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from checkpoints/latest.pt",
    )
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--until-step", type=int, help="stop (with a checkpoint) at this step; --resume continues"
    )
    t.set_defaults(handler=_train, takes_overrides=True)

    e = sub.add_parser(
        "eval",
        help="evaluate a run: deepeq eval RUN_DIR [--max-steps 5,10,20]",
        description="Evaluate a run's best (or latest) checkpoint.",
    )
    e.add_argument("run_dir")
    e.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    e.add_argument(
        "--max-steps", default="", help="comma-separated eval solver caps to sweep (DEQ models)"
    )
    e.set_defaults(handler=_eval)

    g = sub.add_parser(
        "generate",
        help="sample text from a language-model run: deepeq generate RUN_DIR --prompt TEXT "
        "[--tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]",
        description="Sample text from a trained language-model run, token by token.",
    )
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True, help="text to continue (a line break ends a line)")
    g.add_argument("--tokens", type=int, default=50, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    g.add_argument("--window", type=int, default=None, help="positions of cached memory")
    g.set_defaults(handler=_generate)

    pl = sub.add_parser(
        "plot",
        help="write PNGs of a run's metrics: deepeq plot RUN_DIR",
        description="Write PNGs of a run's metrics.",
    )
    pl.add_argument("run_dir")
    pl.set_defaults(handler=_plot)

    a = sub.add_parser(
        "analyze",
        help="analysis studies: deepeq analyze {convergence,nfe,gradient,path-independence} ...",
        description="Analysis studies; each writes a CSV and a PNG.",
    )
    studies = a.add_subparsers(dest="study", required=True)
    c = studies.add_parser(
        "convergence", help="weight-tied stack residual vs depth, with Broyden's trace"
    )
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a registered deq_* model (random initialisation)")
    src.add_argument("--run", help="a run directory (its best checkpoint)")
    c.add_argument("--lengths", default="100,200,400,800")
    c.add_argument("--layers", type=int, default=50)
    c.add_argument("--out", default="runs/analysis")
    n = studies.add_parser(
        "nfe", help="test accuracy/loss vs forward NFE and wall time for one or more runs"
    )
    n.add_argument("runs", nargs="+")
    n.add_argument("--max-steps", default="2,4,8,16,30")
    n.add_argument("--out", default="runs/analysis")
    gr = studies.add_parser(
        "gradient",
        help="training-gradient accuracy vs forward/backward solver caps, against a tight solve",
    )
    gr.add_argument("run")
    gr.add_argument("--caps", default="4/4,8/4,8/8,12/4,12/12", help="FORWARD/BACKWARD pairs")
    gr.add_argument("--step", type=int, default=100, help="the training batch of this step")
    gr.add_argument("--checkpoint", default="latest", choices=("best", "latest"))
    gr.add_argument("--no-dropout", action="store_true", help="f without dropout (eval mode)")
    gr.add_argument(
        "--b-init",
        default="v",
        choices=("v", "shine"),
        help="backward start: dL/dz* or the forward Broyden solver's inverse estimate (SHINE)",
    )
    gr.add_argument("--solver", default=None, help="forward solver (default: the run's)")
    gr.add_argument("--out", default="runs/analysis")
    pi = studies.add_parser(
        "path-independence",
        help="asymptotic alignment: does the equilibrium depend on where the solve starts?",
    )
    src = pi.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a registered deq_* / mdeq_* model (random initialisation)")
    src.add_argument("--run", help="a run directory (its latest checkpoint)")
    pi.add_argument("--batch", type=int, default=8, help="examples")
    pi.add_argument("--length", type=int, default=32, help="sequence length (sequence models)")
    pi.add_argument("--random-starts", type=int, default=2, help="starts drawn from N(0, scale^2)")
    pi.add_argument("--shuffled-starts", type=int, default=2, help="other examples' equilibria")
    pi.add_argument("--scale", type=float, default=1.0)
    pi.add_argument("--seed", type=int, default=0)
    pi.add_argument("--out", default="runs/analysis")
    a.set_defaults(handler=_analyze)

    d = sub.add_parser("demo", help="solve small DEQ layers with every solver; print stats")
    d.add_argument("--smoke", action="store_true", help="tiny batch, for tests")
    d.set_defaults(handler=_demo)
    sub.add_parser("version", help="print the version").set_defaults(handler=_version)
    return parser


# Errors that describe the user's input (bad config, missing file, existing run, unreadable
# checkpoint): one line and exit code 2. Anything else is a bug or a failure inside training and
# keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError)


class _Stderr(logging.Handler):
    """The ``deepeq`` logger on the current ``sys.stderr``: information as it is, warnings and
    errors prefixed with their level."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        print(msg, file=sys.stderr)


def _log_to_stderr() -> None:
    """Show the ``deepeq`` logger's information (data and model sizes, resumes) and warnings."""
    log = logging.getLogger("deepeq")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _log_to_stderr()
    parser = build_parser()
    args, args.rest = parser.parse_known_args(argv)  # train's --section.key=value overrides
    if args.rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    try:
        with warnings.catch_warnings():
            # Capped backward solves are reported per step (metrics.csv: bwd_converged) and in
            # the run's convergence summary; the library's one-time warning would repeat it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return args.handler(args)
    except USER_ERRORS as e:  # bad config, missing file, existing run: one line, exit code 2
        print(f"deepeq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
