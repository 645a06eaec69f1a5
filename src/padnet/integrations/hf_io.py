"""The Hugging Face round trip of a converted model: ``model.save_pretrained(dir)`` and one call
back, :func:`load_pretrained` (also ``padnet.from_pretrained``).

The conversion record (:mod:`padnet.integrations.record`) travels in ``config.json`` under the
key ``padnet`` -- an extra field of the model's config, which transformers writes with the rest
of ``config.json`` and reads back into ``config.padnet``. :func:`attach_record` puts it there;
:func:`save_pretrained` attaches and saves in one call, and the training callbacks attach it
before every save. The weights, mode masks, scale factors and router temperatures are tensors of
the model's state dict and travel in ``model.safetensors`` (or its shards).

Loading reads ``config.json`` with transformers' ``AutoConfig`` and the weights with
:mod:`safetensors` only (a pickled ``pytorch_model.bin`` is never read), builds the model class
named in ``config.architectures`` from the config, rebuilds the recorded PAD layers, loads every
tensor strictly (tied weights excepted: transformers stores one of each tied group) and returns
the model in eval mode, ready for ``transformers.pipeline(..., model=model)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from padnet.deploy.io import state_mismatch
from padnet.integrations.record import check_record, conversion_record

__all__ = ["CONFIG_KEY", "attach_record", "load_pretrained", "save_pretrained"]

#: The key of the conversion record in ``config.json``.
CONFIG_KEY = "padnet"

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        raise TypeError(f"model must be a Hugging Face model (with a .config), got "
                        f"{type(model).__name__}")
    return config


def attach_record(model: nn.Module) -> dict[str, Any]:
    """Write the conversion record of ``model`` into ``model.config.padnet`` (so that
    ``model.save_pretrained`` stores it in ``config.json``) and return it.

    Call it after the last change to the model's structure or scale modes and before saving;
    :func:`save_pretrained` and the training callbacks do it for you. A model without PAD layers
    gets a record with no layers. Raises ValueError for PAD layers the record does not know."""
    config = _config_of(model)
    record = conversion_record(model)
    setattr(config, CONFIG_KEY, record)
    return record


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """:func:`attach_record`, then ``model.save_pretrained(directory, **kwargs)`` (safetensors;
    transformers writes ``config.json`` and the weights). Returns the directory."""
    attach_record(model)
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


# ---- load --------------------------------------------------------------------------------------
def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards of an index)."""
    single, index = directory / _WEIGHTS, directory / _INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is damaged ({err}); save the model again") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing[:3]}")
        return files
    pickled = [p.name for p in directory.glob("*.bin")]
    extra = (f" (it holds {', '.join(pickled)}: padnet never reads pickled weights; load and "
             "save it with transformers' save_pretrained to get safetensors)") if pickled else ""
    raise FileNotFoundError(f"{directory} has no {_WEIGHTS} or {_INDEX}{extra}")


def _read_tensors(files: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except Exception as err:  # safetensors' own format checks
            raise ValueError(f"{path} is not a readable safetensors file ({err}); save the "
                             "model again") from None
    return tensors


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
            raise TypeError(f"model_class must be a transformers model class, got "
                            f"{model_class!r}")
        return model_class
    names = getattr(config, "architectures", None) or []
    if not names:
        raise ValueError("config.json names no architecture (config.architectures is empty): "
                         "pass model_class=, e.g. transformers.BertForSequenceClassification")
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no model class "
                         f"{names[0]!r} (config.architectures); pass model_class=")
    return cls


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """State-dict keys grouped by the tensor they are (tied weights share one)."""
    by_ptr: dict[tuple[int, int], set[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if value.numel():
            by_ptr.setdefault((value.untyped_storage().data_ptr(), value.storage_offset()),
                              set()).add(key)
    return {k: keys for keys in by_ptr.values() for k in keys}


def _check_keys(directory: Path, model: nn.Module, tensors: dict[str, Tensor],
                record: dict[str, Any] | None) -> None:
    missing, unexpected, shapes = state_mismatch(model.state_dict(), tensors, _aliases(model))
    if not (missing or unexpected or shapes):
        return
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:3])}" for what, keys in (
        ("missing in the file", missing), ("not in the model", unexpected),
        ("other shapes", shapes)) if keys]
    hint = ("config.json has no padnet record: if the model was converted with padnet.dynamize, "
            "save it with padnet.integrations.hf.save_pretrained(model, dir), or call "
            "padnet.integrations.hf.attach_record(model) before model.save_pretrained(dir)"
            if record is None else "the weights do not fit the recorded conversion (config.json "
            "and the weights come from different models?)")
    raise ValueError(f"{directory}: the weights do not fit the model ({'; '.join(parts)}); "
                     f"{hint}")


def load_pretrained(directory: str | os.PathLike, *, model_class: Any = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """A converted Hugging Face model from its ``save_pretrained`` directory, in eval mode.

    Builds ``model_class`` (default: the class in ``config.architectures``) from
    ``config.json``, rebuilds the PAD layers of the ``padnet`` record (a directory without one
    loads as a plain model), loads the safetensors weights strictly and moves the model to
    ``device``. The float dtype is the weights' own when they have one.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors weights in ``directory``.
        ValueError: a damaged record or weights file, or weights that do not fit the model.
    """
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("loading a Hugging Face directory needs transformers: pip install "
                          "'padnet[text]'") from None

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no "
                                "config.json)")
    files = _weight_files(directory)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    record = getattr(config, CONFIG_KEY, None)
    if record is not None:
        check_record(record, f"the '{CONFIG_KEY}' field of {directory / 'config.json'}")
    model = _model_class(config, model_class)(config)
    if record is not None:
        from padnet.integrations.record import apply_record

        apply_record(model, record)
        attach_record(model)  # the record as applied (dynamize wrote a fresh one meanwhile)
    tensors = _read_tensors(files)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    _check_keys(directory, model, tensors, record)
    model.load_state_dict(tensors, strict=False)  # every key checked above; tied ones share
    if device is not None:
        model.to(device)
    return model.eval()
