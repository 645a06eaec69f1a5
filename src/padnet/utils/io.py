"""Files written safely and read back checked.

Atomic writes: a file is either its old version or its complete new version, never half; it gets
the usual permissions (``0666`` less the umask). A write killed half-way leaves a temporary file
``.NAME.XXXXXXXX.tmp`` beside ``NAME``; :func:`remove_stale_temporaries` clears those.

Safetensors files written by :func:`save_safetensors` record the sha256 of every tensor's bytes
in their metadata (key :data:`TENSOR_DIGESTS`); :func:`load_safetensors` checks them and turns
a truncated, damaged or foreign file into a :class:`CorruptFileError` naming the file and the
fix. Nothing is ever unpickled.

:func:`fault_point` is a hook for the fault-tolerance tests: with ``PADNET_FAULT=NAME[@N]`` in
the environment, the N-th pass through the point ``NAME`` kills the process with SIGKILL.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FAULT_ENV", "TENSOR_DIGESTS", "CorruptFileError", "atomic_write", "fault_point",
           "load_safetensors", "read_safetensors_metadata", "remove_stale_temporaries",
           "save_csv", "save_json", "save_safetensors", "tensor_sha256"]

#: safetensors metadata key: JSON ``{tensor name: sha256 of its bytes}``
TENSOR_DIGESTS = "padnet_tensor_sha256"
#: environment variable of :func:`fault_point` (tests only)
FAULT_ENV = "PADNET_FAULT"
#: the temporary files of :func:`atomic_write` (``mkstemp``: 8 characters of [a-z0-9_])
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class CorruptFileError(ValueError, RuntimeError):
    """A file is truncated, damaged or not of the expected kind. A ValueError (a problem with the
    user's files: ``padnet`` prints the message) and, for older callers, a RuntimeError."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was; an OSError (disk
    full, permission denied) names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600, and some writers (safetensors) replace the file: set the usual
        # permissions on what was written
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        fault_point("atomic_write")
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename != str(path):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``directory``; returns
    them. Nothing else is touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if _TEMPORARY.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
            removed.append(entry)
    return removed


def save_json(path: str | Path, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    return atomic_write(path, write)


def save_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """Write ``rows`` (mappings; missing or ``None`` values become empty cells) as CSV with the
    header ``columns``, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def tensor_sha256(tensor: Any) -> str:
    """The sha256 of a tensor's bytes (as stored: contiguous, on CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(_uint8()).numpy()).hexdigest()


def _uint8() -> Any:
    import torch

    return torch.uint8


def save_safetensors(path: str | Path, state_dict: dict, metadata: dict | None = None, *,
                     digests: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically (tensors made contiguous, on CPU), with the
    sha256 of every tensor in the metadata (:data:`TENSOR_DIGESTS`); ``digests`` gives them
    when the caller computed them already (:func:`tensor_sha256` of each tensor)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if digests is None:
        digests = {k: tensor_sha256(v) for k, v in tensors.items()}
    meta[TENSOR_DIGESTS] = json.dumps(digests)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _unreadable(path: Path, err: Exception, fix: str) -> CorruptFileError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CorruptFileError(f"{path} is not a readable safetensors file (truncated or damaged: "
                            f"{reason}){_fix(fix)}")


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise CorruptFileError(f"{path} is a directory, not a safetensors file")


def read_safetensors_metadata(path: str | Path, *, fix: str = "") -> dict[str, str]:
    """The metadata of a safetensors file (its header only; the header and the file size are
    checked, the tensors are not)."""
    from safetensors import safe_open

    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except OSError:
        raise
    except Exception as err:  # SafetensorError and what a foreign file makes the parser raise
        raise _unreadable(path, err, fix) from None


def load_safetensors(path: str | Path, *, fix: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, loaded without pickle on CPU; the sha256 of
    every tensor is checked when the file records them (:func:`save_safetensors` does).

    Raises FileNotFoundError, or :class:`CorruptFileError` naming the file (and ``fix``, the
    remedy to suggest) when it is truncated, damaged or not a safetensors file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_safetensors_metadata(path, fix=fix)
    try:
        tensors = load_file(path)
    except OSError:
        raise
    except Exception as err:
        raise _unreadable(path, err, fix) from None
    if TENSOR_DIGESTS in meta:
        _verify(path, tensors, meta[TENSOR_DIGESTS], fix)
    return tensors, meta


def _verify(path: Path, tensors: dict[str, Any], recorded: str, fix: str) -> None:
    try:
        digests = json.loads(recorded)
        if not isinstance(digests, dict):
            raise ValueError("not a mapping")
    except ValueError:
        raise CorruptFileError(f"{path} is damaged: its record of tensor checksums is "
                               f"unreadable{_fix(fix)}") from None
    if set(digests) != set(tensors):
        odd = sorted(set(digests) ^ set(tensors))[:3]
        raise CorruptFileError(f"{path} is damaged: its tensors do not match the ones recorded "
                               f"when it was written (e.g. {odd}){_fix(fix)}")
    for name, tensor in tensors.items():
        if tensor_sha256(tensor) != digests[name]:
            raise CorruptFileError(
                f"{path} is damaged: the bytes of tensor {name!r} do not match the sha256 "
                f"recorded when it was written{_fix(fix)}")


def fault_point(name: str) -> None:
    """Fault injection for tests: when ``PADNET_FAULT`` is ``name`` or ``name@N``, the N-th
    (default: first) call with this ``name`` in this process kills it with SIGKILL."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, count = spec.partition("@")
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict[str, int] = {}
