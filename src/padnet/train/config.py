"""``TrainConfig``: one flat set of training options, read from YAML and ``--key value`` flags.

Every key of a YAML config is a field of :class:`TrainConfig` and can be overridden on the
command line (``--lr 0.05``, ``--dynamic-ratio=0.3``; dashes and underscores are equivalent).
Strings are converted with the field's type; ``none``/``null`` give None where a field allows it;
lists are written ``0,2,4``. Unknown keys and bad values raise ValueError naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["CHOICES", "TrainConfig", "load_config", "parse_overrides"]

#: allowed values of string-valued keys (the ``imp_*`` ones come from :mod:`padnet.partition`)
CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("none", "dyconv", "condconv", "odconv", "moe"),
    "imp_mode": ("none", "oneshot", "interleaved"),
    "imp_schedule": ("exponential", "linear"),
    "imp_scope": ("global", "layer"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "linear", "constant"),
    "amp": ("none", "bf16", "fp16"),
    "scale_mode": ("both", "s", "d", "none", "prune"),
    "init": ("copy", "copy_noise", "kaiming"),
}


@dataclass
class TrainConfig:
    """All options of a training run (flat; each key is also a ``--key`` flag)."""

    # model
    model: str = "resnet8"  # registry name (`padnet list`), "minilm", or a Hugging Face model dir
    pretrained: bool = False
    width: int | None = None  # ResNet width (None: the model's default)
    width_mult: float | None = None  # MobileNetV2 width multiplier
    in_chans: int | None = None  # None: from the data
    method: str = "none"  # none, dyconv, condconv, odconv, moe
    num_kernels: int = 4
    num_experts: int = 8
    top_k: int = 2
    moe_layers: list[int] | None = None  # FFN blocks to convert (None: all)
    init: str = "copy"  # dynamize init: copy, copy_noise, kaiming
    dynamic_ratio: float = 1.0  # kappa; below 1 without IMP the mask is random
    scale_mode: str = "both"
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    temperature_anneal_epochs: float = 10.0
    aux_weight: float = 1.0  # weight of the MoE auxiliary losses
    # iterative mode partition
    imp_mode: str = "none"  # none, oneshot (before training), interleaved (during training)
    imp_iterations: int = 5
    imp_warmup_fraction: float = 0.3  # interleaved IMP runs over this fraction of the steps
    imp_num_batches: int = 4  # scoring batches per IMP iteration
    imp_score: str = "taylor"
    imp_granularity: str = "element"
    imp_schedule: str = "exponential"
    imp_scope: str = "global"
    imp_static_init: str = "keep"
    # data
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    subset: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    image_size: int | None = None
    channels: int | None = None
    max_length: int = 128
    text_column: str = "text"
    label_column: str = "label"
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 2 * batch_size
    num_workers: int = 0
    # optimisation
    optimizer: str = "sgd"  # sgd, adamw
    lr: float = 0.1
    min_lr: float = 0.0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    epochs: int = 10
    schedule: str = "cosine"  # cosine, linear, constant (after warm-up)
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_epochs
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    label_smoothing: float = 0.0
    amp: str = "none"  # none, bf16, fp16 (CUDA only; ignored on CPU)
    # run
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    out_dir: str = "runs/run"
    eval_every: int = 1  # epochs
    save_every: int = 0  # optimizer steps between checkpoints; 0 = at each epoch end only
    stop_after: int = 0  # stop as if interrupted after this many steps (0 = never)

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The valid keys, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys raise ValueError listing the valid ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a config must be a mapping of keys to values, got "
                             f"{type(data).__name__}")
        values = {_key(k): v for k, v in data.items()}
        hints = typing.get_type_hints(cls)
        cfg = cls(**{k: coerce(k, v, hints[k]) for k, v in values.items()})
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some keys changed (values coerced like YAML values)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{key: value}`` (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML text, keys in declaration order."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first key whose value is not allowed."""
        from padnet.partition import OPTIONS

        choices = {**CHOICES, "imp_score": OPTIONS["score"],
                   "imp_granularity": OPTIONS["granularity"],
                   "imp_static_init": OPTIONS["static_init"]}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        _check(self, "dynamic_ratio", 0.0 <= self.dynamic_ratio <= 1.0, "in [0, 1]")
        _check(self, "imp_warmup_fraction", 0.0 < self.imp_warmup_fraction <= 1.0, "in (0, 1]")
        _check(self, "val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")
        _check(self, "test_fraction", 0.0 <= self.test_fraction < 1.0, "in [0, 1)")
        _check(self, "label_smoothing", 0.0 <= self.label_smoothing < 1.0, "in [0, 1)")
        _check(self, "lr", self.lr > 0, "> 0")
        for key in ("num_kernels", "num_experts", "top_k", "imp_iterations", "imp_num_batches",
                    "batch_size", "epochs", "eval_every", "max_length"):
            _check(self, key, getattr(self, key) >= 1, ">= 1")
        for key in ("min_lr", "weight_decay", "momentum", "warmup_epochs", "warmup_steps",
                    "grad_clip", "aux_weight", "num_workers", "save_every", "stop_after",
                    "temperature_anneal_epochs"):
            _check(self, key, getattr(self, key) >= 0, ">= 0")
        for key in ("temperature_start", "temperature_end"):
            _check(self, key, getattr(self, key) > 0, "> 0")
        for key in ("width", "in_chans", "subset", "image_size", "channels", "eval_batch_size"):
            _check(self, key, getattr(self, key) is None or getattr(self, key) >= 1,
                   ">= 1 or none")
        _check(self, "top_k", self.top_k <= self.num_experts, f"<= num_experts "
               f"({self.num_experts})")
        if self.imp_mode != "none" and self.method == "none":
            raise ValueError(f"imp_mode={self.imp_mode!r} needs a dynamic method "
                             f"(method is 'none')")
        if self.imp_mode == "oneshot" and self.init == "copy" and self.imp_score == "taylor":
            warnings.warn(
                "imp_mode='oneshot' right after init='copy' scores a model whose dynamic and "
                "static kernels are identical: every Taylor score is zero and the mask is "
                "arbitrary; use init='copy_noise' or imp_mode='interleaved'",
                UserWarning, stacklevel=2)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


def _check(cfg: TrainConfig, key: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {allowed}, got {getattr(cfg, key)!r}")


def _key(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"config keys must be strings, got {name!r}")
    key = name.replace("-", "_")
    valid = TrainConfig.keys()
    if key not in valid:
        raise ValueError(f"unknown config key {name!r}; valid keys: {', '.join(valid)}")
    return key


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, allows None)`` of a type hint such as ``int | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (a YAML value or a command-line string) to the type hint ``tp``."""
    inner, nullable = _optional(tp)
    is_null_word = isinstance(value, str) and value.strip().lower() in ("none", "null")
    if value is None or (is_null_word and (nullable or inner is not str)):
        if nullable:
            return None
        raise ValueError(f"{key} must not be empty (expects {_name(inner)})")
    try:
        return _convert(value, inner)
    except (TypeError, ValueError):
        raise ValueError(f"{key} expects {_name(tp)}, got {value!r}") from None


def _convert(value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, Sequence):
            raise TypeError("not a list")
        return [_convert(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError("not a boolean")
    if isinstance(value, bool):
        raise TypeError("a boolean where a number or string is expected")
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return int(value) if not isinstance(value, str) else int(value.strip())
    if tp is float:
        result = float(value)
        if math.isnan(result):
            raise ValueError("nan")
        return result
    if tp is str:
        if not isinstance(value, str | int | float):
            raise TypeError("not a string")
        return str(value)
    raise TypeError(f"unsupported type {tp}")


def _name(tp: Any) -> str:
    inner, nullable = _optional(tp)
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        inner, "a comma-separated list" if typing.get_origin(inner) is list else str(inner))
    return name + (" or none" if nullable else "")


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
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of keys to values")
        data = {_key(k): v for k, v in (loaded or {}).items()}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    data.update({_key(k): v for k, v in overrides.items()})
    return TrainConfig.from_dict(data)
