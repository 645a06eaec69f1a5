"""The padnet file format on top of safetensors: the header's name and version, reading a file
and its header without unpickling anything, and checking the recorded sha256 of the header and
of every tensor (see :mod:`padnet.deploy.io`)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

__all__ = ["DIGEST", "FORMAT", "KEY", "LIST", "MAX_HEADER", "VERSION", "few", "not_padnet",
           "read_file", "read_header", "verify"]

FORMAT = "padnet"
#: the newest format version this padnet reads and writes: 2 adds ``conditional`` (early exits,
#: dynamic tokens); files without it are written as version 1, which older padnet reads
VERSION = 2
KEY = "padnet"
DIGEST = "padnet_sha256"  # of the header text
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
LIST = 5  # names listed in error messages


def not_padnet(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a padnet model file ({why}); padnet.load reads files "
                      "written by padnet.save")


def read_file(path: str | Path) -> tuple[Path, bytes, dict[str, Any], dict[str, Any]]:
    """``(path, file bytes, safetensors header, padnet header)``, checked for format and
    truncation (not for checksums)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}: write one with padnet.save")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; padnet.load takes the .safetensors file "
                         "written by padnet.save")
    data = path.read_bytes()
    if len(data) < 8:
        raise not_padnet(path, f"only {len(data)} bytes, not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or data[8:9] != b"{":
        raise not_padnet(path, "not a safetensors file")
    if 8 + n > len(data):
        raise ValueError(f"{path} is truncated (its header needs {8 + n} bytes, the file has "
                         f"{len(data)}): write it again with padnet.save")
    try:
        st_header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        if DIGEST.encode() in data[8:8 + n]:  # a padnet file, damaged
            raise ValueError(f"{path}: damaged header ({err}); write it again with "
                             "padnet.save") from None
        raise not_padnet(path, f"unreadable safetensors header: {err}") from None
    if not isinstance(st_header, dict):
        raise not_padnet(path, "unreadable safetensors header")
    meta = st_header.get("__metadata__") or {}
    text = meta.get(KEY) if isinstance(meta, dict) else None
    if not isinstance(text, str):
        raise not_padnet(path, "a safetensors file without a padnet header; load it with "
                          "safetensors.torch.load_file and model.load_state_dict")
    if meta.get(DIGEST) != hashlib.sha256(text.encode()).hexdigest():
        raise ValueError(f"{path}: damaged padnet header (checksum mismatch); write it again "
                         "with padnet.save")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: damaged padnet header ({err}); write it again with "
                         "padnet.save") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise not_padnet(path, "the padnet header names another format")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise ValueError(f"{path} has padnet file format version {header.get('version')!r}; "
                         f"this padnet reads up to version {VERSION}: upgrade padnet")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in st_header.items()
                   if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise not_padnet(path, "malformed safetensors header") from None
    if 8 + n + end > len(data):
        raise ValueError(f"{path} is truncated ({len(data)} bytes, the tensors need "
                         f"{8 + n + end}): write it again with padnet.save")
    return path, data, st_header, header


def read_header(path: str | Path) -> dict[str, Any]:
    """The padnet header of a file written by :func:`save` (format checked)."""
    return read_file(path)[3]


def verify(path: Path, data: bytes, st_header: dict[str, Any], header: dict[str, Any]) -> None:
    """Raise ValueError unless every tensor's bytes have their recorded sha256."""
    sums = header.get("tensors")
    if not isinstance(sums, dict):
        raise ValueError(f"{path}: the padnet header has no tensor checksums; write it again "
                         "with padnet.save")
    start = 8 + struct.unpack("<Q", data[:8])[0]
    names = {k for k in st_header if k != "__metadata__"}
    if names != set(sums):
        odd = sorted(names ^ set(sums))
        raise ValueError(f"{path}: the tensors do not match the padnet header ({few(odd)}); "
                         "the file is damaged: write it again with padnet.save")
    view = memoryview(data)
    bad = []
    for k in sorted(names):
        first, last = st_header[k]["data_offsets"]
        rec, desc = sums[k], st_header[k]
        if not isinstance(rec, dict) or hashlib.sha256(
                view[start + first:start + last]).hexdigest() != rec.get("sha256") or \
                list(desc.get("shape", [])) != rec.get("shape"):
            bad.append(k)
    if bad:
        raise ValueError(f"{path}: checksum mismatch in {len(bad)} tensor(s) ({few(bad)}): the "
                         "file is corrupted; write it again with padnet.save")


def few(names: list[str]) -> str:
    more = f", ... ({len(names) - LIST} more)" if len(names) > LIST else ""
    return ", ".join(names[:LIST]) + more
