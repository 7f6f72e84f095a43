"""Command line (``deepeq ...`` or ``python -m deepeq ...``).

deepeq train CONFIG.toml [--section.key=value ...] [--resume]
deepeq eval RUN_DIR [--max-steps 5,10,20,40]
deepeq demo
"""

from __future__ import annotations

import argparse
import sys

from .train.checkpoint import CheckpointError
from .train.config import ConfigError


def _train(argv: list[str]) -> int:
    from .train import load_config, train

    p = argparse.ArgumentParser(
        prog="deepeq train", description="Train a model; overrides are --section.key=value."
    )
    p.add_argument("config", help="TOML file listing what differs from the defaults")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in out_dir from checkpoints/latest.pt",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--until-step", type=int, help="stop (with a checkpoint) at this step; --resume continues"
    )
    args, rest = p.parse_known_args(argv)
    cfg = load_config(args.config, rest)  # unknown keys / wrong types fail here, before any work
    metrics = train(
        cfg, resume=args.resume, progress=not args.no_progress, until_step=args.until_step
    )
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
    from .train.convergence import convergence_line

    line = convergence_line(metrics)
    if line:
        print(line)
    if metrics.get("loss_exploded_at") is not None:
        print(
            f"warning: the training loss exploded at step {metrics['loss_exploded_at']} (see the "
            f"log); this result is probably useless."
        )
    return 0


def _eval(argv: list[str]) -> int:
    from .train.loop import flush_denormal, load_run

    p = argparse.ArgumentParser(
        prog="deepeq eval", description="Evaluate a run's best (or latest) checkpoint."
    )
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    p.add_argument(
        "--max-steps", default="", help="comma-separated eval solver caps to sweep (DEQ models)"
    )
    args = p.parse_args(argv)
    cfg, model, task = load_run(args.run_dir, args.checkpoint)
    caps = [int(v) for v in args.max_steps.split(",") if v] or [None]
    from .analysis.studies import eval_sweep

    with flush_denormal(cfg.flush_denormal):  # as in training
        for line in eval_sweep(model, task, caps):
            print(line)
    return 0


def _generate(argv: list[str]) -> int:
    from pathlib import Path

    import torch

    from .generation import decode_ids, encode_prompt, generate
    from .train.config import load_config
    from .train.loop import flush_denormal, load_run

    p = argparse.ArgumentParser(
        prog="deepeq generate",
        description="Sample text from a trained language-model run, token by token.",
    )
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True, help="text to continue (a line break ends a line)")
    p.add_argument("--tokens", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    p.add_argument("--window", type=int, default=None, help="positions of cached memory")
    args = p.parse_args(argv)
    config = Path(args.run_dir) / "config.toml"
    if config.exists() and load_config(config).data.task != "lm":
        raise ConfigError(
            f"{args.run_dir} is a {load_config(config).data.task!r} run; deepeq generate needs a "
            f"language-model run (data.task = 'lm'), e.g. deepeq train configs/ptb_quick.toml."
        )
    cfg, model, task = load_run(args.run_dir, args.checkpoint)
    corpus = task.corpus
    itos, level = corpus.itos, corpus.level
    try:
        if level == "bpe":
            ids = corpus.encode(args.prompt)
            if ids.numel() == 0:
                raise ValueError("the prompt is empty: give at least one word to start from.")
        else:
            ids = encode_prompt(args.prompt, itos, level)
    except ValueError as e:
        raise ConfigError(f"--prompt: {e}") from e
    with flush_denormal(cfg.flush_denormal):
        try:
            out = generate(model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, window=args.window)  # fmt: skip
        except ValueError as e:  # bad sampling options
            raise ConfigError(str(e)) from e
    if level == "bpe":
        print(corpus.decode(torch.cat([ids, out.tokens])))
    else:
        sep = " " if level == "word" else ""
        print(decode_ids(ids, itos, level) + sep + decode_ids(out.tokens, itos, level))
    nfe = sum(out.nfe) / max(1, len(out.nfe))
    print(
        f"# {len(out.tokens)} tokens in {out.seconds:.2f} s ({out.tokens_per_s:.1f} tokens/s), "
        f"forward NFE {nfe:.1f} per token, max residual {out.residual:.1e}",
        file=sys.stderr,
    )
    return 0


def _plot(argv: list[str]) -> int:
    from .train.plot import plot_run

    p = argparse.ArgumentParser(prog="deepeq plot", description="Write PNGs of a run's metrics.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _analyze(argv: list[str]) -> int:
    from pathlib import Path

    from .analysis import studies

    p = argparse.ArgumentParser(
        prog="deepeq analyze", description="Analysis studies; each writes a CSV and a PNG."
    )
    sub = p.add_subparsers(dest="study", required=True)
    c = sub.add_parser(
        "convergence", help="weight-tied stack residual vs depth, with Broyden's trace"
    )
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a registered deq_* model (random initialisation)")
    src.add_argument("--run", help="a run directory (its best checkpoint)")
    c.add_argument("--lengths", default="100,200,400,800")
    c.add_argument("--layers", type=int, default=50)
    c.add_argument("--out", default="runs/analysis")
    n = sub.add_parser(
        "nfe", help="test accuracy/loss vs forward NFE and wall time for one or more runs"
    )
    n.add_argument("runs", nargs="+")
    n.add_argument("--max-steps", default="2,4,8,16,30")
    n.add_argument("--out", default="runs/analysis")
    g = sub.add_parser(
        "gradient",
        help="training-gradient accuracy vs forward/backward solver caps, against a tight solve",
    )
    g.add_argument("run")
    g.add_argument("--caps", default="4/4,8/4,8/8,12/4,12/12", help="FORWARD/BACKWARD pairs")
    g.add_argument("--step", type=int, default=100, help="the training batch of this step")
    g.add_argument("--checkpoint", default="latest", choices=("best", "latest"))
    g.add_argument("--no-dropout", action="store_true", help="f without dropout (eval mode)")
    g.add_argument(
        "--b-init",
        default="v",
        choices=("v", "shine"),
        help="backward start: dL/dz* or the forward Broyden solver's inverse estimate (SHINE)",
    )
    g.add_argument("--solver", default=None, help="forward solver (default: the run's)")
    g.add_argument("--out", default="runs/analysis")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.study == "convergence":
        if args.run:
            from .train.loop import load_run

            cfg, model, task = load_run(args.run)
            if getattr(model, "family", None) == "mdeq":
                images = task.prepare(task.xte[:4])  # the run's own test images
            elif hasattr(model, "embed") and hasattr(model, "deq"):
                images = None
            else:
                raise ConfigError(
                    f"{args.run}: the convergence study needs a DEQ sequence or image model; got "
                    f"{cfg.model.name}."
                )
        else:
            from .models import create_model

            model, images = create_model(args.model), None
        rows = studies.stack_convergence(
            model, [int(v) for v in args.lengths.split(",")], args.layers, images=images
        )
        studies.write_csv(rows, out / "convergence.csv")
        studies.plot_convergence(rows, out / "convergence.png")
        print(out / "convergence.csv", out / "convergence.png")
    elif args.study == "gradient":
        from .train.loop import load_run

        caps = studies.parse_caps(args.caps)
        _, model, task = load_run(args.run, args.checkpoint)
        rows = studies.gradient_accuracy(
            model, task, caps, step=args.step, dropout=not args.no_dropout,
            b_init=args.b_init, solver=args.solver,
        )  # fmt: skip
        studies.write_csv(rows, out / "gradient_accuracy.csv")
        studies.plot_gradient_accuracy(rows, out / "gradient_accuracy.png")
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
    else:
        rows = studies.metric_vs_nfe(args.runs, [int(v) for v in args.max_steps.split(",")])
        studies.write_csv(rows, out / "metric_vs_nfe.csv")
        studies.plot_metric_vs_nfe(rows, out / "metric_vs_nfe.png")
        for r in rows:
            print(
                f"{Path(r['run']).name}: max_steps={r['max_steps']} NFE={r['mean_nfe']:.1f} {r['metric']}={r['value']:.4g} loss={r['test_loss']:.4g} {r['seconds']:.2f}s"
            )
    return 0


# Errors that describe the user's input (bad config, missing file, existing run, unreadable
# checkpoint): one line and exit code 2. Anything else is a bug or a failure inside training and
# keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "analyze": _analyze, "plot": _plot, "train": _train, "eval": _eval, "generate": _generate,
    }  # fmt: skip
    if argv and argv[0] in commands:
        try:
            return commands[argv[0]](argv[1:])
        except USER_ERRORS as e:  # bad config, missing file, existing run: one line, exit code 2
            print(f"deepeq {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="deepeq", description="Deep Equilibrium Models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="solve small DEQ layers with every solver; print stats")
    p_demo.add_argument("--smoke", action="store_true", help="tiny batch, for tests")
    sub.add_parser(
        "train", help="train a model: deepeq train CONFIG.toml [--section.key=value ...] [--resume]"
    )
    sub.add_parser("eval", help="evaluate a run: deepeq eval RUN_DIR [--max-steps 5,10,20]")
    sub.add_parser("plot", help="write PNGs of a run's metrics: deepeq plot RUN_DIR")
    sub.add_parser(
        "generate",
        help="sample text from a language-model run: deepeq generate RUN_DIR --prompt TEXT "
        "[--tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]",
    )
    sub.add_parser(
        "analyze", help="analysis studies: deepeq analyze {convergence,nfe,gradient} ..."
    )
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
