"""padnet.utils.io: atomic writes with the usual permissions, safetensors files that record a
sha256 per tensor and are checked on load, stale temporary files, the fault-injection hook."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from padnet.utils import io


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_safetensors_files_get_the_usual_permissions(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = io.save_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_save_safetensors_records_a_sha256_per_tensor(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16),
             "c": torch.tensor(3), "empty": torch.zeros(0)}
    path = io.save_safetensors(tmp_path / "w.safetensors", state, {"k": "v"})
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    digests = json.loads(meta[io.TENSOR_DIGESTS])
    assert set(digests) == set(state) and meta["k"] == "v"
    assert digests["a"] == io.tensor_sha256(state["a"]) and len(digests["a"]) == 64


def test_load_safetensors_returns_tensors_and_metadata(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    path = io.save_safetensors(tmp_path / "w.safetensors", state, {"k": "v"})
    tensors, meta = io.load_safetensors(path)
    assert meta["k"] == "v" and set(tensors) == {"a", "b"}
    assert torch.equal(tensors["a"], state["a"]) and torch.equal(tensors["b"], state["b"])


def flip_last_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_is_detected(tmp_path):
    path = io.save_safetensors(tmp_path / "w.safetensors",
                               {"a": torch.zeros(4), "b": torch.ones(4)})
    flip_last_data_byte(path)
    with pytest.raises(io.CorruptFileError, match=r"w\.safetensors.*damaged.*tensor 'b'"):
        io.load_safetensors(path, fix="write it again")


def test_the_error_names_the_fix(tmp_path):
    path = io.save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(4)})
    flip_last_data_byte(path)
    with pytest.raises(io.CorruptFileError, match="use the backup"):
        io.load_safetensors(path, fix="use the backup")


def test_a_truncated_file_is_a_corrupt_file_error(tmp_path):
    path = io.save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(100)})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(io.CorruptFileError, match=r"w\.safetensors.*truncated or damaged"):
        io.load_safetensors(path)
    with pytest.raises(io.CorruptFileError, match=r"w\.safetensors"):
        io.read_safetensors_metadata(path)


def test_a_file_without_recorded_digests_still_loads(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, tmp_path / "plain.safetensors")
    tensors, meta = io.load_safetensors(tmp_path / "plain.safetensors")
    assert torch.equal(tensors["a"], torch.ones(2)) and io.TENSOR_DIGESTS not in meta


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        io.load_safetensors(tmp_path / "nothing.safetensors")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = io.save_json(tmp_path / "x.json", {"v": 1})

    def disk_full(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        io.atomic_write(path, disk_full)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".model.safetensors.a1b2c3_d.tmp").write_text("x")
    (tmp_path / ".state.json.zzzzzzzz.tmp").write_text("x")
    keep = ["model.safetensors", "notes.tmp", ".hidden", ".x.toolongname.tmp", "a.json"]
    for name in keep:
        (tmp_path / name).write_text("x")
    removed = io.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".model.safetensors.a1b2c3_d.tmp",
                                               ".state.json.zzzzzzzz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert io.remove_stale_temporaries(tmp_path / "missing") == []


def test_the_fault_hook_kills_the_process_at_the_named_point(tmp_path):
    code = ("from padnet.utils.io import fault_point\n"
            "for i in range(3):\n    print(i, flush=True)\n    fault_point('here')\n")
    env = {**os.environ, io.FAULT_ENV: "here@2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -9 and done.stdout.split() == ["0", "1"]


def test_the_fault_hook_does_nothing_without_the_variable(monkeypatch):
    monkeypatch.delenv(io.FAULT_ENV, raising=False)
    io.fault_point("here")
