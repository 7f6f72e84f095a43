"""Penn Treebank benchmark at CPU scale: DEQ vs its explicit twins, trained side by side (not a test).

    .venv/bin/python bench/lm.py [--steps 600] [--families transformer,trellisnet,llama] [--threads 2]
        [--variant "solve.dtype=bfloat16"]   # an extra row: the family's DEQ with these overrides
        [--variant "jac.weight=0.5;jac.probability=0.35;solve.f_max_steps=8"]   # ... or with JR
    .venv/bin/python bench/lm.py --time RUN_DIR [--time RUN_DIR ...]   # interleaved timing only

``--time`` takes trained run directories (any config, e.g. the 1-hour runs) and prints their
interleaved time per training step (Jacobian penalty included on its fraction of the steps), the
FLOPs of one such step (``torch.utils.flop_counter``: deterministic, unlike time) and the ratios of
both to the run whose core is untied.

Each model is trained with ``deepeq train configs/ptb_deq_transformer.toml --model.name=...``
(same data order, optimiser, schedule and number of steps; each in its own process, so that its
peak RSS is its own) and evaluated on the whole PTB validation/test streams. Reported per model:

* valid / test perplexity after ``--steps`` steps (equal steps);
* valid perplexity at equal wall-clock: the last evaluation reached within the training time of the
  fastest model of the family (evaluations every steps/4; evaluation time not counted);
* time per training step (median over the run) and its ratios to the untied stack (the DEQ
  slides: DEQ 2.8x vs an 18-layer Transformer) and to the weight-tied twin (the DEQ slides: 2.4x
  vs a 70-layer TrellisNet, which is weight-tied); the runs of a family train one after another,
  so these ratios carry the machine's load changes. The ratio columns "(interleaved)" come from
  one process that loads the family's trained models and times full training steps (forward +
  backward, same batch, warm memory) round-robin, one step per model per round, ``--rounds``
  rounds: load changes hit every model alike;
* mean forward / backward NFE; the share of training steps whose forward solves all met the
  tolerance (``final.json``: ``fwd_converged_steps``);
* bytes saved for backward by the equilibrium core alone (embedding and softmax excluded, as the
  papers count "memory"), for one training batch (B=16, T=70, memory 70), and the ratio to the
  weight-tied twin; peak RSS of the training process.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepeq.analysis import saved_bytes  # noqa: E402
from deepeq.models import create_model  # noqa: E402

FAMILIES = {
    "transformer": (
        "configs/ptb_deq_transformer.toml",
        ["deq_transformer_small", "transformer_tied_small", "transformer_xl_small"],
    ),
    "trellisnet": (
        "configs/ptb_deq_trellisnet.toml",
        ["deq_trellisnet_small", "trellisnet_tied_small"],
    ),
    "llama": (
        "configs/ptb_deq_transformer.toml",
        ["deq_llama_small", "llama_tied_small", "llama_untied_small"],
    ),
}


def core_saved_mib(name: str, overrides: dict | None = None, B: int = 16, T: int = 70) -> float:
    """Bytes saved for backward by the core: a full training forward (with a warm memory of
    mem_len positions) minus the same pass with the core skipped (embedding -> head)."""
    torch.manual_seed(0)
    m = create_model(name, vocab_size=10000, **(overrides or {}))
    x = torch.randint(0, 10000, (B, T))
    with torch.no_grad():
        _, state, _ = m(x)  # a memory, as in the middle of an epoch
    total, _ = saved_bytes(lambda: m(x, state, targets=x)[0])
    emb_head, _ = saved_bytes(
        lambda: m.nll(torch.zeros(B, T, m.state_dim(m.size)) + 0 * m.embed(x).sum(), x)
    )
    return (total - emb_head) / 2**20


def read_run(run: Path) -> dict:
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    final = json.loads((run / "final.json").read_text())
    elapsed, curve, step_times = 0.0, [], []
    for r in rows:
        dt = 16 * 70 / float(r["tokens_per_s"])
        elapsed += dt
        step_times.append(dt)
        if r["valid_ppl"]:
            curve.append((elapsed, float(r["valid_ppl"])))
    num = lambda k: [float(r[k]) for r in rows if r[k]]  # noqa: E731
    return {
        "final": final,
        "curve": curve,
        "train_s": elapsed,
        "step_s": statistics.median(step_times[5:] or step_times),
        "fwd_nfe": statistics.mean(num("fwd_nfe")) if num("fwd_nfe") else None,
        "bwd_nfe": statistics.mean(num("bwd_nfe")) if num("bwd_nfe") else None,
    }


def parse_overrides(text: str) -> dict:
    """``"solve.dtype=bfloat16;solve.f_max_steps=12"`` -> ``{"solve.dtype": "bfloat16",
    "solve.f_max_steps": 12}`` (dotted keys as on the command line; ``nest`` for Python)."""
    out = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--variant needs KEY=VALUE pairs separated by ';'; got {text!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def nest(flat: dict) -> dict:
    """Dotted model overrides as ``create_model`` keywords: ``{"solve.f_rtol": 0.01}`` ->
    ``{"solve": {"f_rtol": 0.01}}``."""
    out: dict = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def run_name(label: str) -> str:
    """Run directory of a row: the label with the override brackets made path-safe."""
    return label.replace("[", "__").replace("]", "").replace("=", "-").replace(",", "_")


def _train_step(model, x, y, state, weight: float, probes: int, weight_u: float = 0.0) -> list:
    """The training loop's step without the optimiser: forward, fixed-point correction, Jacobian
    penalty (scheduled, and on the unconverged outputs: ``jac.unconverged_weight``), backward."""
    from deepeq.models._protocol import equilibrium_layer
    from deepeq.regularization import jacobian_penalty
    from deepeq.train.step import correction_loss, unconverged_penalty

    nll, _, sols = model(x, state, targets=y)
    loss = nll.mean()
    fpc = correction_loss(model, sols, y)
    if fpc is not None:
        loss = loss + fpc
    if weight > 0 and sols:
        pen = sum(jacobian_penalty(s.fz, s.z_leaf, num_samples=probes) for s in sols)
        loss = loss + weight * pen / len(sols)
    if weight_u > 0 and sols:
        pen_u = unconverged_penalty(equilibrium_layer(model), sols, probes)
        if pen_u is not None:
            loss = loss + weight_u * pen_u
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sols


def interleaved_step_s(
    runs: dict[str, Path],
    rounds: int,
    threads: int,
    parts: dict | None = None,
    counts: dict | None = None,
) -> dict[str, float]:
    """Mean seconds per training step of each trained model, timed round-robin in this process.

    A step is the training loop's: forward, the Jacobian penalty when the run's config has one
    (``jac.weight`` > 0; applied on a fraction ``jac.probability`` of the steps, so such a model is
    timed both ways every round and its step time is ``(1 - p) t_plain + p t_penalty``, with the
    run's final weight), backward; subnormal floats flushed to zero or not, as the run's config
    says (``flush_denormal``, default on). Per-kind times are medians over the rounds; ``parts``, when
    given, receives them: ``{(name, weight): seconds}``; ``counts``, when given, receives
    ``{(name, weight): (share of steps, GFLOP, forward NFE, backward NFE)}`` of one such step
    (counted with ``torch.utils.flop_counter`` in the first warm-up round)."""
    import time

    from torch.utils.flop_counter import FlopCounterMode

    from deepeq.models._protocol import equilibrium_layer
    from deepeq.train import load_run
    from deepeq.train._denormal import set_flush_denormal

    if threads:
        torch.set_num_threads(threads)
    models = {}
    for name, run in runs.items():
        cfg, model, task = load_run(run, "latest", device="cpu")
        jac = cfg.jac
        model.train()
        state = None
        with torch.no_grad():  # a warm memory, as in the middle of an epoch
            for step in range(97, 100):
                x, y, _ = task.train_batch(step, 0, 1)
                _, state, _ = model(x, state, targets=y)
        x, y, _ = task.train_batch(100, 0, 1)
        weight = jac.final_weight if jac.final_weight is not None else jac.weight
        if equilibrium_layer(model) is None:  # an explicit twin: no solve, no penalty
            weight = 0.0
        kinds = (
            [(0.0, 1.0)] if weight <= 0 else [(0.0, 1 - jac.probability), (weight, jac.probability)]
        )
        models[name] = (
            model, x, y, state, kinds, jac.num_samples, cfg.flush_denormal, jac.unconverged_weight
        )  # fmt: skip
    times = {(name, w): [] for name, m in models.items() for w, _ in m[4]}
    for r in range(rounds + 2):
        for name, (model, x, y, state, kinds, probes, flush, w_u) in models.items():
            set_flush_denormal(flush)  # as the run trained (config flush_denormal), all threads
            for w, share in kinds:
                torch.manual_seed(r)
                if r == 0 and counts is not None:  # warm-up round: count FLOPs and NFE once
                    with FlopCounterMode(display=False) as fc:
                        sols = _train_step(model, x, y, state, w, probes, w_u)
                    counts[name, w] = (
                        share,
                        fc.get_total_flops() / 1e9,
                        sum(s.stats.nfe for s in sols),
                        sum(s.backward.nfe for s in sols if s.backward is not None),
                    )
                    continue
                t = time.perf_counter()
                _train_step(model, x, y, state, w, probes, w_u)
                if r >= 2:  # two warm-up rounds
                    times[name, w].append(time.perf_counter() - t)
    set_flush_denormal(False)
    if parts is not None:
        parts.update({key: statistics.median(ts) for key, ts in times.items()})
    return {
        name: sum(p * statistics.median(times[name, w]) for w, p in m[4])
        for name, m in models.items()
    }


def time_runs(runs: list[Path], rounds: int, threads: int) -> None:
    """Print the interleaved time per training step of existing runs and their ratios."""
    from deepeq.train.config import load_run_config

    for run in runs:
        if not (run / "checkpoints" / "latest.pt").exists():
            raise SystemExit(f"--time {run}: no checkpoints/latest.pt; train the run first.")
    labels = {str(run): run for run in runs}
    parts: dict = {}
    counts: dict = {}
    inter = interleaved_step_s(labels, rounds, threads, parts, counts)
    cfgs = {label: load_run_config(run) for label, run in labels.items()}
    gflop = {
        label: sum(c[0] * c[1] for (name, _), c in counts.items() if name == label)
        for label in labels
    }
    cores = {}
    for label, cfg in cfgs.items():
        with torch.device("meta"):
            cores[label] = create_model(
                cfg.model.name, vocab_size=10000, **cfg.model.overrides
            ).config.core
    untied = next((label for label, core in cores.items() if core == "untied"), None)
    print(
        f"# bench/lm.py --time  torch {torch.__version__}  threads "
        f"{threads or torch.get_num_threads()}  rounds {rounds}"
    )
    print(
        "| run | model | JR γ / p | s/step (interleaved) | time × untied | s/step without / with "
        "the penalty | GFLOP/step | FLOP × untied | fwd / bwd NFE (timed batch) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, cfg in cfgs.items():
        j = cfg.jac
        deq = cores[label] == "deq"  # explicit twins take no penalty
        jr = f"{j.final_weight or j.weight:g} / {j.probability:g}" if deq and j.weight > 0 else "-"
        if deq and j.unconverged_weight > 0:  # the targeted penalty
            jr += f" + unconverged {j.unconverged_weight:g}"
        ratio = lambda d, k=label: "-" if untied is None else f"{d[k] / d[untied]:.2f}"  # noqa: E731
        split = " / ".join(f"{t:.3f}" for (name, _), t in parts.items() if name == label)
        nfe = next(c for (name, _), c in counts.items() if name == label)
        print(
            f"| {label} | {cfg.model.name} | {jr} | {inter[label]:.3f} | {ratio(inter)} | {split} "
            f"| {gflop[label]:.2f} | {ratio(gflop)} | {nfe[2] or '-'} / {nfe[3] or '-'} |"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--families", default="transformer,trellisnet")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--config",
        default=None,
        help="train every family from this config instead of its own (e.g. "
        "configs/ptb_deq_transformer_capped.toml: the DEQs with capped, unconverged solves)",
    )
    p.add_argument("--out", default="runs/bench_lm")
    p.add_argument("--reuse", action="store_true", help="report existing runs without training")
    p.add_argument("--rounds", type=int, default=20, help="rounds of the interleaved timing")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[;KEY=VALUE]",
        help="an extra row: each family's DEQ with these model overrides (repeatable), e.g. "
        "solve.dtype=bfloat16; keys starting with 'jac.' set the Jacobian regularisation "
        "(jac.weight=0.5;jac.probability=0.35)",
    )
    p.add_argument(
        "--time",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="only time these trained runs' steps, interleaved (repeatable; ratios to the run "
        "whose core is untied, if any)",
    )
    args = p.parse_args(argv)
    if args.time:
        time_runs([Path(r) for r in args.time], args.rounds, args.threads)
        return
    print(
        f"# bench/lm.py  torch {torch.__version__}  CPU ({platform.processor() or platform.machine()})"
        f"  threads {args.threads or torch.get_num_threads()}  steps {args.steps}  B=16 T=70"
    )
    print(
        "| model | core | non-emb. params | valid ppl | test ppl | valid ppl @ equal time | "
        "s/step | time × untied | time × tied | s/step (interleaved) | time × untied (interleaved) | "
        "time × tied (interleaved) | fwd NFE | bwd NFE | fwd converged steps | core saved MiB | "
        "saved × tied | peak RSS MiB |"
    )
    print("|---" * 18 + "|")
    for fam in args.families.split(","):
        config, models = FAMILIES[fam]
        config = args.config or config
        rows = [(name, name, {}) for name in models]  # (label, model, overrides)
        for v in args.variant:
            ov = parse_overrides(v)
            label = models[0] + "[" + ",".join(f"{k}={x}" for k, x in ov.items()) + "]"
            rows.insert(1, (label, models[0], ov))
        names = [label for label, _, _ in rows]
        res = {}
        for label, name, ov in rows:
            run = ROOT / args.out / run_name(label)
            if not args.reuse:
                cmd = [
                    sys.executable, "-m", "deepeq", "train", config, f"--model.name={name}",
                    f"--steps={args.steps}", f"--eval_every={max(1, args.steps // 4)}",
                    f"--optim.warmup_steps={min(200, args.steps // 10)}", f"--out_dir={run}",
                    f"--threads={args.threads}", "--no-progress",
                    *(
                        f"--{k}={x}" if k.startswith("jac.") else f"--model.overrides.{k}={x}"
                        for k, x in ov.items()
                    ),
                ]  # fmt: skip
                if (run / "metrics.csv").exists():
                    cmd.append("--resume")
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            res[label] = read_run(run)
            mov = nest({k: x for k, x in ov.items() if not k.startswith("jac.")})  # model
            res[label]["saved"] = core_saved_mib(name, mov)
            with torch.device("meta"):
                m = create_model(name, vocab_size=10000, **mov)
            res[label]["core"] = m.config.core
            res[label]["params"] = m.non_embedding_parameters()
        inter = interleaved_step_s(
            {label: ROOT / args.out / run_name(label) for label in names}, args.rounds, args.threads
        )
        budget = min(r["train_s"] for r in res.values())
        untied = next((n for n, r in res.items() if r["core"] == "untied"), None)
        tied = next((n for n, r in res.items() if r["core"] == "tied"), None)

        def ratio(v: float, ref: str | None, key: str, res=res) -> str:
            return "-" if ref is None else format(v / res[ref][key], ".2f")

        for name in names:
            res[name]["inter_s"] = inter[name]
        for name, r in res.items():
            f = r["final"]
            at_budget = [ppl for t, ppl in r["curve"] if t <= budget * 1.001]
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            print(
                f"| {name} | {r['core']} | {r['params']:,} | {f['valid_ppl']:.1f} | {f['test_ppl']:.1f} | "
                f"{fmt(at_budget[-1] if at_budget else None, '.1f')} | {r['step_s']:.3f} | "
                f"{ratio(r['step_s'], untied, 'step_s')} | {ratio(r['step_s'], tied, 'step_s')} | "
                f"{r['inter_s']:.3f} | {ratio(r['inter_s'], untied, 'inter_s')} | "
                f"{ratio(r['inter_s'], tied, 'inter_s')} | "
                f"{fmt(r['fwd_nfe'], '.1f')} | {fmt(r['bwd_nfe'], '.1f')} | "
                f"{fmt(f.get('fwd_converged_steps'), '.0%')} | {r['saved']:.2f} | "
                f"{ratio(r['saved'], tied, 'saved')} | {f['peak_rss_mib']:.0f} |"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
