"""``TrainConfig``: the options of a training run, read from YAML and ``--key value`` flags.

The keys are flat: every YAML key is a config key and a command-line flag (``--lr 0.05``,
``--dynamic-ratio=0.3``, ``--imp-score taylor``; dashes and underscores are equivalent). Related
options live in nested groups of the dataclass (``cfg.imp.score``) whose flat keys carry the
group's prefix (``imp_score``): :meth:`TrainConfig.from_dict` maps them into the group and
:meth:`TrainConfig.to_dict` flattens them back. Strings are converted with the field's type
(:mod:`padnet.train.coerce`). Unknown keys and bad values raise ValueError naming the key, the
value and what is allowed; the allowed strings come from the tables that define them
(:func:`config_choices`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from padnet.train.coerce import coerce
from padnet.utils.checks import check_choice, check_int, check_number, check_optional, check_ratio

__all__ = ["AMP_MODES", "IMP_MODES", "LR_SCHEDULES", "OPTIMIZERS", "RESUME_FREE_KEYS",
           "TOKEN_MODES", "ConfigKey", "ExitConfig", "ImpConfig", "TokenConfig", "TrainConfig",
           "absolute_paths", "config_choices", "config_differences", "load_config",
           "parse_overrides"]

IMP_MODES = ("none", "oneshot", "interleaved")
#: dynamic tokens of text models (docs/method.md §6.1)
TOKEN_MODES = ("none", "select", "merge")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "linear", "constant")
AMP_MODES = ("none", "bf16", "fp16")
#: keys a resumed run may change: where and how often it writes and evaluates, the device,
#: the loader processes and CPU threads; not what it computes (beyond the rounding a thread
#: count changes)
RESUME_FREE_KEYS = ("out_dir", "stop_after", "save_every", "eval_every", "eval_batch_size",
                    "num_workers", "device", "threads")


def _opt(default: Any, help: str) -> Any:
    """A field with a help text (shown by ``padnet train --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ImpConfig:
    """Iterative mode partition options: the ``imp_*`` keys (``imp_score`` is ``score``).

    The defaults (Taylor score, element granularity, global scope, static init ``keep``, 4
    scoring batches) are the choices no alternative beat in the ablations of docs/RESULTS.md
    (§3 and §3b on vision, §3c on text); pruning the static part scored among the lowest on
    both."""

    mode: str = _opt("none", "none, oneshot (before training) or interleaved (during training)")
    iterations: int = _opt(5, "IMP iterations (kappa decreases over them)")
    warmup_fraction: float = _opt(0.3, "interleaved IMP runs over this fraction of the steps")
    num_batches: int = _opt(4, "scoring batches per IMP iteration")
    score: str = _opt("taylor", "importance score of the positions")
    granularity: str = _opt("element", "partition single weights or whole channels")
    schedule: str = _opt("exponential", "decrease of kappa over the iterations")
    scope: str = _opt("global", "rank positions over the whole model or per layer")
    static_init: str = _opt("keep", "value given to positions that become static")


@dataclass
class ExitConfig:
    """Early-exit options: the ``exit_*`` keys (the exit points themselves are ``exits``)."""

    weights: list[float] | None = _opt(None, "loss weight of each exit, the final one last "
                                       "(none: 1 each)")
    distill: float = _opt(0.0, "weight in [0, 1] of distilling the final exit into the others "
                          "(0: cross-entropy only)")
    temperature: float = _opt(1.0, "distillation temperature")
    criterion: str = _opt("max_prob", "exit rule of early-exit inference")
    threshold: float | None = _opt(None, "threshold of the exit rule: max_prob exits at a "
                                   "probability >= it, entropy at an entropy (nats) <= it, "
                                   "patience after this many agreeing exits (none: 0.9, 0.5, 2)")

    def make_criterion(self) -> Any:
        """The exit criterion of these options (:func:`padnet.conditional.make_criterion`)."""
        from padnet.conditional.criteria import make_criterion

        return make_criterion(self.criterion, self.threshold)


@dataclass
class TokenConfig:
    """Dynamic-token options of text models: the ``token_*`` keys (the mode is ``tokens``)."""

    keep: float = _opt(0.5, "tokens=select: fraction of each sequence's tokens a layer processes")
    layers: list[int] | None = _opt(None, "encoder layers that select or merge (none: all)")
    merge_r: int = _opt(4, "tokens=merge: tokens merged per sequence in each layer")
    gate: str = _opt("sigmoid", "tokens=select: gate of the router score on a layer's update")
    aux_coef: float = _opt(0.0, "tokens=select: weight of the router's BCE auxiliary loss")
    merge_metric: str = _opt("keys", "tokens=merge: similarity measured on the keys or the "
                             "attention output")


@dataclass
class TrainConfig:
    """All options of a training run (each flat key is also a ``--key`` flag)."""

    # model
    model: str = _opt("resnet8", "registry name (`padnet list`), minilm, or a Hugging Face "
                      "model directory")
    pretrained: bool = _opt(False, "load pretrained weights")
    width: int | None = _opt(None, "ResNet width (none: the model's default)")
    width_mult: float | None = _opt(None, "MobileNetV2 width multiplier")
    in_chans: int | None = _opt(None, "input channels of the model (none: from the data)")
    method: str = _opt("none", "conversion method (`padnet list`) or none")
    num_kernels: int = _opt(4, "kernels per dynamic convolution")
    num_experts: int = _opt(8, "experts per MoE layer")
    top_k: int = _opt(2, "experts per token")
    moe_layers: list[int] | None = _opt(None, "FFN blocks to convert (none: all)")
    include: list[str] | None = _opt(None, "fnmatch patterns of module names to convert")
    exclude: list[str] | None = _opt(None, "fnmatch patterns of module names to keep static")
    init: str = _opt("copy", "initialisation of the dynamic weights")
    dynamic_ratio: float = _opt(1.0, "kappa, the dynamic fraction; below 1 without IMP the "
                                "mask is random")
    scale_mode: str = _opt("both", "scale factors of the static and dynamic parts")
    temperature_start: float = _opt(30.0, "router temperature at the start")
    temperature_end: float = _opt(1.0, "router temperature after annealing")
    temperature_anneal_epochs: float = _opt(10.0, "epochs of temperature annealing")
    aux_weight: float = _opt(1.0, "weight of the auxiliary losses (MoE, token routers)")
    # conditional computation (docs/method.md §6.1; keys exit_*, token_*)
    exits: list[str] | None = _opt(None, "early exits after these units of the model, e.g. "
                                   "layer1,layer2 or bert.encoder.layer.2 (none: no exits)")
    exit: ExitConfig = field(default_factory=ExitConfig)
    tokens: str = _opt("none", "dynamic tokens of a text model: select (top tokens through a "
                       "layer) or merge (bipartite token merging)")
    token: TokenConfig = field(default_factory=TokenConfig)
    # iterative mode partition (keys imp_mode, imp_iterations, ...)
    imp: ImpConfig = field(default_factory=ImpConfig)
    # data
    dataset: str = _opt("fashion_mnist", "data set name (`padnet list`)")
    data_root: str | None = _opt(None, "data directory or file")
    subset: int | None = _opt(None, "use only this many training examples")
    val_fraction: float = _opt(0.1, "fraction of the training data held out for validation")
    test_fraction: float = _opt(0.0, "fraction held out for testing (data without a test split)")
    image_size: int | None = _opt(None, "resize images to this side length")
    channels: int | None = _opt(None, "convert images to this many channels")
    max_length: int = _opt(128, "tokens per text")
    text_column: str = _opt("text", "text column of a CSV data set")
    label_column: str = _opt("label", "label column of a CSV data set")
    text_encoding: str = _opt("utf-8", "encoding of a CSV/TSV/JSON-lines data file")
    text_delimiter: str | None = _opt(None, "delimiter of a CSV data file: one character or "
                                      "tab, comma, semicolon, pipe, space (none: by extension)")
    batch_size: int = _opt(128, "examples per optimizer step (per process)")
    eval_batch_size: int | None = _opt(None, "evaluation batch size (none: 2 * batch_size)")
    num_workers: int = _opt(0, "data loader worker processes")
    # optimisation
    optimizer: str = _opt("sgd", "optimizer")
    lr: float = _opt(0.1, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the schedule")
    weight_decay: float = _opt(5e-4, "weight decay (not on biases and norms)")
    momentum: float = _opt(0.9, "SGD momentum")
    epochs: int = _opt(10, "training epochs")
    schedule: str = _opt("cosine", "learning-rate decay after the warm-up")
    warmup_epochs: float = _opt(0.0, "epochs of linear learning-rate warm-up")
    warmup_steps: int = _opt(0, "warm-up steps (> 0 overrides warmup_epochs)")
    grad_clip: float = _opt(0.0, "max gradient norm (0: off)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    amp: str = _opt("none", "mixed precision (CUDA only; ignored on CPU)")
    # run
    seed: int = _opt(0, "random seed")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _opt(0, "torch CPU threads (0: torch's default); CPU results are "
                        "deterministic only at a fixed count")
    out_dir: str = _opt("runs/run", "run directory")
    eval_every: int = _opt(1, "evaluate every this many epochs")
    save_every: int = _opt(0, "optimizer steps between checkpoints (0: at epoch ends only)")
    stop_after: int = _opt(0, "stop as if interrupted after this many steps (0: never)")

    # ---- keys ----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The valid flat keys, in declaration order."""
        return list(_key_table())

    @classmethod
    def key_table(cls) -> dict[str, ConfigKey]:
        """``{flat key: ConfigKey}`` in declaration order."""
        return dict(_key_table())

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from flat keys; unknown keys raise ValueError listing the valid ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a config must be a mapping of keys to values, got "
                             f"{type(data).__name__}")
        table = _key_table()
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {g: {} for g in _groups()}
        for name, value in data.items():
            key = table[_key(name)]
            converted = coerce(key.name, value, key.hint)
            (groups[key.group] if key.group else top)[key.attr] = converted
        cfg = cls(**top, **{g: _groups()[g](**kw) for g, kw in groups.items()})
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some flat keys changed (values coerced like YAML values)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{flat key: value}`` (YAML/JSON-serialisable), in declaration order."""
        flat: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if name in _groups():
                flat.update({f"{name}_{k}": v for k, v in value.items()})
            else:
                flat[name] = value
        return flat

    def to_yaml(self) -> str:
        """The config as YAML text, keys in declaration order."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first key whose value is not allowed."""
        flat = self.to_dict()
        for key, allowed in config_choices().items():
            check_choice(flat[key], key, allowed)
        check_ratio(self.dynamic_ratio, "dynamic_ratio")
        check_number(self.imp.warmup_fraction, "imp_warmup_fraction", minimum=0, strict=True,
                     maximum=1)
        for key in ("val_fraction", "test_fraction", "label_smoothing"):
            if not 0.0 <= flat[key] < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {flat[key]!r}")
        check_number(self.lr, "lr", minimum=0, strict=True)
        for key in ("num_kernels", "num_experts", "top_k", "imp_iterations", "imp_num_batches",
                    "batch_size", "epochs", "eval_every", "max_length"):
            check_int(flat[key], key, 1)
        for key in ("num_workers", "warmup_steps", "save_every", "stop_after", "threads"):
            check_int(flat[key], key, 0)
        for key in ("min_lr", "weight_decay", "momentum", "warmup_epochs", "grad_clip",
                    "aux_weight", "temperature_anneal_epochs"):
            check_number(flat[key], key, minimum=0)
        for key in ("temperature_start", "temperature_end"):
            check_number(flat[key], key, minimum=0, strict=True)
        for key in ("width", "in_chans", "subset", "image_size", "channels", "eval_batch_size"):
            check_optional(flat[key], check_int, key, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts ({self.num_experts}), got "
                             f"{self.top_k}")
        self._check_exits()
        self._check_tokens()
        self._check_combinations()

    def _check_exits(self) -> None:
        ex, flat = self.exit, self.to_dict()
        if self.exits is None:
            unused = [k for k, v in flat.items() if k.startswith("exit_") and
                      v != _key_table()[k].default]
            if unused:
                raise ValueError(f"{unused[0]}={flat[unused[0]]!r} needs early exits (exits is "
                                 "none): set exits, e.g. exits: [layer1, layer2]")
            return
        if not self.exits or any(not name.strip() for name in self.exits):
            raise ValueError(f"exits must name at least one unit of the model (e.g. layer1 or "
                             f"bert.encoder.layer.2), or be none; got {self.exits!r}")
        if len(set(self.exits)) != len(self.exits):
            raise ValueError(f"exits names the same unit twice: {self.exits}")
        if ex.weights is not None:
            n = len(self.exits) + 1
            if len(ex.weights) != n:
                raise ValueError(f"exit_weights needs one weight per exit, the final one last "
                                 f"({n} for exits {self.exits}), got {len(ex.weights)}: "
                                 f"{ex.weights}")
            for w in ex.weights:
                check_number(w, "exit_weights", minimum=0)
            if not any(w > 0 for w in ex.weights) or any(w == float("inf") for w in ex.weights):
                raise ValueError(f"exit_weights must be finite, >= 0 and not all zero, got "
                                 f"{ex.weights}")
        check_number(ex.distill, "exit_distill", minimum=0, maximum=1)
        check_number(ex.temperature, "exit_temperature", minimum=0, strict=True)
        if ex.temperature == float("inf"):
            raise ValueError("exit_temperature must be a finite number > 0, got inf")
        if ex.threshold is not None:
            check_number(ex.threshold, "exit_threshold", minimum=0)
            if ex.criterion == "patience" and (ex.threshold < 1 or ex.threshold % 1):
                raise ValueError(f"exit_threshold is the patience of exit_criterion 'patience': "
                                 f"an integer >= 1, got {ex.threshold!r}")

    def _check_tokens(self) -> None:
        tok, flat = self.token, self.to_dict()
        if self.tokens == "none":
            unused = [k for k, v in flat.items() if k.startswith("token_") and
                      v != _key_table()[k].default]
            if unused:
                raise ValueError(f"{unused[0]}={flat[unused[0]]!r} needs dynamic tokens (tokens "
                                 "is none): set tokens to select or merge")
            return
        check_number(tok.keep, "token_keep", minimum=0, strict=True, maximum=1)
        check_int(tok.merge_r, "token_merge_r", 0)
        check_number(tok.aux_coef, "token_aux_coef", minimum=0)
        if tok.layers is not None and not tok.layers:
            raise ValueError("token_layers must name at least one encoder layer, or be none "
                             "(every layer)")
        if self.tokens == "merge" and self.exits is not None:
            raise ValueError("tokens=merge cannot be combined with exits (merged sequences do "
                             "not follow a batch that shrinks as samples exit): use "
                             "tokens=select with exits")

    def _check_combinations(self) -> None:
        mode = self.imp.mode
        if mode != "none" and self.method == "none":
            raise ValueError(f"imp_mode={mode!r} needs a dynamic method (method is 'none')")
        if mode == "oneshot" and self.init == "copy" and self.imp.score == "taylor":
            warnings.warn(
                "imp_mode='oneshot' right after init='copy' scores a model whose dynamic and "
                "static kernels are identical: every Taylor score is zero and the mask is "
                "arbitrary; use init='copy_noise' or imp_mode='interleaved'",
                UserWarning, stacklevel=3)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class ConfigKey:
    """One flat config key: its type hint, default and help text, and where it lives (``group``
    is the nested group holding it, e.g. ``'imp'``, and ``attr`` its field name there)."""

    name: str
    hint: Any
    default: Any
    help: str = ""
    group: str | None = None
    attr: str = ""


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@functools.cache
def _groups() -> dict[str, type]:
    """The nested groups of :class:`TrainConfig`: ``{field name: dataclass}``."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)
            if dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def _key_table() -> dict[str, ConfigKey]:
    hints = typing.get_type_hints(TrainConfig)
    table: dict[str, ConfigKey] = {}
    for f in fields(TrainConfig):
        group = _groups().get(f.name)
        if group is None:
            table[f.name] = ConfigKey(f.name, hints[f.name], _default(f),
                                      f.metadata.get("help", ""), None, f.name)
            continue
        inner = typing.get_type_hints(group)
        for g in fields(group):
            name = f"{f.name}_{g.name}"
            table[name] = ConfigKey(name, inner[g.name], _default(g), g.metadata.get("help", ""),
                                    f.name, g.name)
    return table


def config_choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the string-valued keys, read from the tables that define them: the
    conversion methods, scale modes and inits of :mod:`padnet.convert` and
    :mod:`padnet.layers`, the scores and options of :mod:`padnet.partition`."""
    from padnet.conditional.criteria import CRITERIA
    from padnet.conditional.tokens import GATES, METRICS
    from padnet.convert import method_names
    from padnet.layers import INITS, SCALE_MODE_ALIASES, SCALE_MODES
    from padnet.partition import OPTIONS, SCORES

    return {
        "method": ("none", *method_names()), "init": tuple(INITS),
        "scale_mode": (*SCALE_MODES, *SCALE_MODE_ALIASES), "imp_mode": IMP_MODES,
        "imp_score": tuple(SCORES.names()),
        **{f"imp_{k}": tuple(OPTIONS[k]) for k in ("granularity", "schedule", "scope",
                                                   "static_init")},
        "optimizer": OPTIMIZERS, "schedule": LR_SCHEDULES, "amp": AMP_MODES,
        "exit_criterion": tuple(CRITERIA), "tokens": TOKEN_MODES, "token_gate": GATES,
        "token_merge_metric": METRICS,
    }


def _key(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"config keys must be strings, got {name!r}")
    key = name.replace("-", "_")
    if key not in _key_table():
        raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(_key_table())}")
    return key


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """``['--lr', '0.1', '--amp=bf16']`` -> ``{'lr': '0.1', 'amp': 'bf16'}`` (keys checked)."""
    result: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"expected --key value, got {token!r}")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"option --{name} needs a value")
            value = tokens[i + 1]
            i += 1
        result[_key(name)] = value
        i += 1
    return result


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> TrainConfig:
    """Read a YAML config (``yaml.safe_load``) and apply overrides (a mapping or ``--key value``
    tokens). Without ``path`` the defaults are the base."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of keys to values")
        data = {_key(k): v for k, v in (loaded or {}).items()}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    data.update({_key(k): v for k, v in overrides.items()})
    return TrainConfig.from_dict(data)


def _read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a file; errors name the file, line and column (tags that would
    build Python objects are refused by safe_load, never executed)."""
    import yaml

    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file ({err.reason} at byte {err.start}); a "
                         "config is a YAML file of key: value lines") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = ("; a config holds plain values only (no !!python tags)"
                if "constructor" in problem else "")
        raise ValueError(f"{path}{': ' + where if where else ''}: YAML error: {problem}"
                         f"{hint}") from None


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``data_root`` (and ``model`` when it is a local model directory) made
    absolute, so a saved run's config reads the same data from any working directory."""
    changes: dict[str, Any] = {}
    if cfg.data_root is not None:
        changes["data_root"] = str(Path(cfg.data_root).expanduser().resolve())
    if (Path(cfg.model) / "config.json").is_file() and not Path(cfg.model).is_absolute():
        changes["model"] = str(Path(cfg.model).resolve())
    return cfg.replace(**changes) if changes else cfg


def config_differences(
    recorded: TrainConfig, cfg: TrainConfig, *, ignore: Sequence[str] = RESUME_FREE_KEYS
) -> list[tuple[str, Any, Any]]:
    """``[(key, recorded value, value of cfg)]`` for the keys outside ``ignore`` that differ."""
    a, b = recorded.to_dict(), cfg.to_dict()
    return [(k, a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]]
