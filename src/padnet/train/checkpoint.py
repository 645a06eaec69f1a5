"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint directory holds ``model.safetensors`` (the weights), ``optimizer.safetensors``
(every other tensor: optimizer moments, RNG states, IMP state) and ``state.json`` (the rest of
those states, with ``{"__tensor__": key}`` where a tensor was). Each file is written atomically,
``state.json`` last, into ``checkpoint.new/``, which then replaces ``checkpoint/``; a kill at any
moment leaves at least one complete checkpoint, and :func:`find_checkpoint` picks the newest
complete one (all three files readable, with the same step). Nothing is ever unpickled.

The safetensors files record the sha256 of every tensor (:func:`padnet.utils.io.save_safetensors`),
checked by :func:`load_checkpoint`; :func:`load_latest_checkpoint` falls back to an older complete
checkpoint past a damaged one. :func:`settle_checkpoints` tidies a run directory after a kill: the
newest complete checkpoint becomes ``checkpoint/``, older and partial copies and stale temporary
files go, and a damaged ``checkpoint/`` is kept as ``checkpoint.damaged/``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from padnet.utils.io import (
    CorruptFileError,
    fault_point,
    load_safetensors,
    read_safetensors_metadata,
    remove_stale_temporaries,
    save_json,
    save_safetensors,
)

__all__ = [
    "CHECKPOINT_NAMES",
    "checkpoint_step",
    "find_checkpoint",
    "flatten_state",
    "load_checkpoint",
    "load_latest_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "settle_checkpoints",
    "unflatten_state",
]

FORMAT = "padnet-checkpoint-1"
_NAMES = ("checkpoint", "checkpoint.new", "checkpoint.old")
_DAMAGED = "checkpoint.damaged"
#: the checkpoint directories a run may hold
CHECKPOINT_NAMES = (*_NAMES, _DAMAGED)
_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


# ---- nested state <-> (tensors, JSON) ------------------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings) into a flat
    ``{name: tensor}`` dict and a JSON-serialisable structure referring to the tensors by name.

    Dicts whose keys are not all plain strings (e.g. ``optimizer.state_dict()['state']`` with int
    keys) are stored as ``{"__items__": [[key, value], ...]}`` and tuples as ``{"__tuple__": []}``
    so :func:`unflatten_state` restores them exactly. Other types raise TypeError.
    """
    tensors: dict[str, Tensor] = {}
    return tensors, _encode(obj, prefix.rstrip("/"), tensors)


def _encode(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        name = path or "tensor"
        while name in tensors:
            name += "_"
        tensors[name] = obj.detach()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        join = (lambda k: f"{path}/{k}") if path else str
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, join(k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, join(f"key{i}"), tensors), _encode(v, join(k), tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple | list):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        return _encode(torch.from_numpy(np.ascontiguousarray(obj)), path, tensors)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '<root>'!r} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"checkpoint is missing the tensor {obj['__tensor__']!r}")
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_hashable(unflatten_state(k, tensors)): unflatten_state(v, tensors)
                for k, v in obj["__items__"]}
    return {k: unflatten_state(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


# ---- random number generators ------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """States of the torch (CPU and initialised CUDA), Python and NumPy generators."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state` (CUDA ones when CUDA is available)."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    random.setstate(_hashable(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [t.to(torch.uint8) for t in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ---- checkpoint directories --------------------------------------------------------------
def _unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of tensors that share storage with an earlier one (safetensors refuses those)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out


def save_checkpoint(
    run_dir: str | Path, model_state: dict[str, Tensor], state: dict[str, Any], *, step: int,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint/`` (see the module doc) and return its path.

    ``state`` is any nested state accepted by :func:`flatten_state` (optimizer, scheduler, RNG,
    IMP, loop counters); :func:`load_checkpoint` returns it with its tensors restored.
    ``metadata`` goes into the header of ``model.safetensors``. The directory is settled first
    (:func:`settle_checkpoints`), so the newest complete checkpoint is never removed before the
    new one has replaced it.
    """
    run_dir = Path(run_dir)
    cur, new, old = (run_dir / n for n in _NAMES)
    settle_checkpoints(run_dir)
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    meta = {"format": FORMAT, "step": str(step)}
    tensors, encoded = flatten_state(state)
    save_safetensors(new / "model.safetensors", _unshared(model_state), {**(metadata or {}),
                                                                          **meta})
    save_safetensors(new / "optimizer.safetensors", _unshared(tensors), meta)
    save_json(new / "state.json", {"format": FORMAT, "step": step, "state": encoded})
    fault_point("checkpoint_written")
    shutil.rmtree(old, ignore_errors=True)
    if cur.exists():
        os.rename(cur, old)
    fault_point("checkpoint_swapped")
    os.rename(new, cur)
    shutil.rmtree(old, ignore_errors=True)
    return cur


def _complete_step(directory: Path) -> int | None:
    """The step of a complete checkpoint directory (its three files readable, with the same
    step; the tensors' checksums are not read), or None."""
    try:
        step = int(json.loads((directory / "state.json").read_text())["step"])
        for name in ("model.safetensors", "optimizer.safetensors"):
            meta = read_safetensors_metadata(directory / name)
            if int(meta.get("step", -1)) != step:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step


def checkpoint_step(directory: str | Path) -> int | None:
    """The step of a complete checkpoint directory, or None (tensors not read)."""
    return _complete_step(Path(directory))


def _complete(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run (or ``run_dir`` itself when it is one), newest first
    (``checkpoint/`` before a copy of the same step)."""
    order = [run_dir, *(run_dir / n for n in _NAMES)]
    found = [(s, d) for d in order if d.is_dir() and (s := _complete_step(d)) is not None]
    return sorted(found, key=lambda sd: (-sd[0], order.index(sd[1])))


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run (or ``run_dir`` itself when it is one)."""
    found = _complete(Path(run_dir))
    return found[0][1] if found else None


def settle_checkpoints(run_dir: str | Path) -> Path | None:
    """Tidy the checkpoints of a run after a kill; returns ``run_dir/checkpoint`` when it now
    holds the newest complete checkpoint, else None (then nothing is changed but stale
    temporaries).

    The newest complete checkpoint becomes ``checkpoint/``; ``checkpoint.new/`` and
    ``checkpoint.old/`` (older copies or a write cut short) are removed; a ``checkpoint/`` that is
    not complete while an older copy is, is kept as ``checkpoint.damaged/``.
    """
    run_dir = Path(run_dir)
    cur, new, old = (run_dir / n for n in _NAMES)
    for d in (cur, new, old):
        remove_stale_temporaries(d)
    complete = [d for _, d in _complete(run_dir) if d.parent == run_dir]
    if not complete:
        return None
    best = complete[0]
    if best != cur:
        if cur in complete:
            shutil.rmtree(cur)
        elif cur.exists():
            shutil.rmtree(run_dir / _DAMAGED, ignore_errors=True)
            os.rename(cur, run_dir / _DAMAGED)
            warnings.warn(f"{cur} is not a complete checkpoint: kept as {run_dir / _DAMAGED}, "
                          f"continuing from {best.name}", UserWarning, stacklevel=2)
        os.rename(best, cur)
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)
    return cur


def _fix(directory: Path) -> str:
    return (f"the checkpoint in {directory} cannot be used: restore the file from a backup, "
            "or start the run again with --overwrite")


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], int]:
    """``(model state dict, state, step)`` of a checkpoint directory, loaded without pickle and
    checked against the sha256 recorded for every tensor (:class:`CorruptFileError` naming the
    damaged file otherwise)."""
    directory = Path(directory)
    step = _complete_step(directory)
    if step is None:
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (model.safetensors, "
                                "optimizer.safetensors and state.json with the same step)")
    state_file = directory / "state.json"
    data = json.loads(state_file.read_text())
    tensors, _ = load_safetensors(directory / "optimizer.safetensors", fix=_fix(directory))
    weights, _ = load_safetensors(directory / "model.safetensors", fix=_fix(directory))
    try:
        state = unflatten_state(data["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{state_file} is damaged ({err}); {_fix(directory)}") from None
    return weights, state, step


def _problems(run_dir: Path) -> list[str]:
    """What is wrong with the checkpoint directories of a run that hold no complete one."""
    problems = []
    for d in (run_dir, *(run_dir / n for n in _NAMES)):
        if not d.is_dir() or (d == run_dir and not (d / "state.json").exists()):
            continue
        for name in _FILES:
            path = d / name
            if not path.exists():
                problems.append(f"{path} is missing")
                continue
            try:
                if name == "state.json":
                    json.loads(path.read_text())["step"]
                else:
                    read_safetensors_metadata(path)
            except (OSError, ValueError, KeyError, TypeError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                problems.append(f"{path} is unreadable ({reason})")
        if not any(p.startswith(str(d)) for p in problems):
            problems.append(f"{d} holds files of different steps")
    return problems


def load_latest_checkpoint(
    run_dir: str | Path,
) -> tuple[Path, dict[str, Tensor], dict[str, Any], int]:
    """``(directory, model state dict, state, step)`` of the newest checkpoint of a run that
    loads and passes its checks; a damaged newer one is skipped with a warning. Raises
    FileNotFoundError when the run has no checkpoint, :class:`CorruptFileError` naming the
    damaged files when it has no complete one, or the first CorruptFileError when none loads."""
    run_dir = Path(run_dir)
    found = _complete(run_dir)
    if not found:
        problems = _problems(run_dir)
        if problems:
            raise CorruptFileError(f"no complete checkpoint to resume in {run_dir}: "
                                   f"{'; '.join(problems)}; restore the files from a backup, "
                                   "or start the run again with --overwrite")
        raise FileNotFoundError(f"no complete checkpoint to resume in {run_dir}")
    errors: list[CorruptFileError] = []
    for _, directory in found:
        try:
            weights, state, step = load_checkpoint(directory)
        except CorruptFileError as err:
            errors.append(err)
            continue
        for err in errors:
            warnings.warn(f"{err}; resuming from the older checkpoint in {directory}",
                          UserWarning, stacklevel=2)
        return directory, weights, state, step
    raise errors[0]
